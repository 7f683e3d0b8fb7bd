"""Bonsai Image 4B at full size on one GPU: parity, speed and memory of the whole pipeline.

    # on the GPU (MLX CUDA or Metal), full 4B shapes, 512^2 and 1024^2, 4 steps:
    python benchmarks/pipeline.py --cache /tmp/bonsai-4b --json pipeline.json
    # the same machinery at toy size on a CPU (minutes), as a check before a GPU run:
    python benchmarks/pipeline.py --tiny --cache /tmp/bonsai-tiny --json tiny.json
    # print the tables of an earlier run:
    python benchmarks/pipeline.py --report pipeline.json
    # where time and memory go (VAE parts, convolutions and attention vs torch, step memory):
    python benchmarks/pipeline.py --cache /tmp/bonsai-4b --json profile.json --profile
    # the fixes that profile points to, measured as experiments, then the benchmark with them:
    python benchmarks/pipeline.py --cache /tmp/bonsai-4b --json fixes.json --fixes

On the lent NVIDIA machine (MLX's CUDA backend, BENCHMARKS.md "Pipeline" has the exact calls)
diffusers and mlx-lm travel as wheels and install into /tmp/site beside MLX.

Checkpoints (built once into --cache, reused when present): random weights at the exact 4B
shapes (architecture.md §2, §3.11, §4.4), generated directly in packed form, in every layout the
pipeline reads. One binary and one ternary set of codes and scales is drawn; each is written as a
PrismML MLX pack (`transformer-packed-mflux/`, affine bits 1 / 2) and as bonsai-packed v1
(`transformer-bonsai/`), and the ternary one also as its exact dense bf16 dequantization in
diffusers' layout (`transformer/`, the "dense" variant). Shared components, symlinked into every
variant: Qwen3-4B in MLX 4-bit g64 (all 36 layers stored, as published), the FLUX.2 VAE (full,
§2.2), the scheduler config, and the byte-level tokenizer of tests/tiny_text.py (not Qwen3's: no
hub access; prompts are padded to 512 tokens either way, so the compute is the same).

Sections, run in this order, each written to --json as soon as it is done:
1. bf16 matmul rate of this GPU (MLX, 8192^3): the compute floor's denominator.
2. parity at the largest size: our dense bf16 transformer step vs diffusers' on the same weights
   and inputs, and every packed variant vs its dense twin (the generator's own dequantization);
   relative error max|a-b| / max|b| <= 2e-2.
3. timing: per variant, load, then per size a warm-up generation and --repeats measured ones
   (a new prompt each, so the text encoder runs): seconds and MLX peak memory per phase
   (load / encode / each denoise step / decode).
4. --low-memory pipelines (bonsai binary): peak per phase and whole-run peak, fresh per size.
5. diffusers' Flux2KleinPipeline in bf16 on the same GPU (random Qwen3-4B, our dense transformer
   weights and VAE), timed the same way (torch.cuda.synchronize at phase ends).
Then the compute floor: FLOPs of one step (linears + attention, §3.13) / measured matmul rate.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _import_mlx_lm() -> None:
    """mlx_lm's package __init__ pulls in its CLI helpers (and their dependencies); the text
    encoder needs only mlx_lm.models. Where the former fail to import, register the package
    without running its __init__ so the model modules still load."""
    try:
        import mlx_lm  # noqa: F401
    except ImportError as e:
        import importlib.util
        import types

        spec = importlib.util.find_spec("mlx_lm")
        if spec is None or not spec.submodule_search_locations:
            raise
        module = types.ModuleType("mlx_lm")
        module.__path__ = list(spec.submodule_search_locations)
        sys.modules["mlx_lm"] = module
        log(f"mlx_lm's __init__ failed ({e}); using mlx_lm.models directly")


from mlx_bonsai.convert.layout import packed_layers, transformer_shapes  # noqa: E402
from mlx_bonsai.convert.sizes import FULL_CONFIG  # noqa: E402
from mlx_bonsai.packing import GROUP_SIZE, TERNARY_GROUP_BYTES, TRITS_PER_BYTE  # noqa: E402
from mlx_bonsai.transformer import (  # noqa: E402
    Transformer,
    TransformerConfig,
    image_ids,
    load_transformer,
    load_weights,
    text_ids,
)

# -- configurations --------------------------------------------------------------------------

FULL_TRANSFORMER = FULL_CONFIG  # architecture.md §2.1
FULL_TEXT_ENCODER = {  # architecture.md §2.3 (Qwen3-4B)
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
FULL_VAE = {  # architecture.md §2.2
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "batch_norm_eps": 1e-4,
    "sample_size": 1024,
}
TE_BITS, TE_GROUP = 4, 64
N_TXT = 512  # prompts are always padded to 512 tokens
STEPS = 4
TOLERANCE = 2e-2
SEED = 0
BUILD_VERSION = 1  # bump when the generated checkpoints change
PACKED = ("prism-binary", "prism-ternary", "bonsai-binary", "bonsai-ternary")
VARIANTS = ("bonsai-binary", "bonsai-ternary", "dense", "prism-binary", "prism-ternary")
SECTIONS = ("parity", "timing", "low-memory", "diffusers")
SHARED = ("text_encoder-mlx-4bit", "tokenizer", "vae", "scheduler")
PRISM_SKIP = ["x_embedder", "context_embedder", "modulation", "time_guidance_embed", "norm_out",
              "proj_out", "norm_"]
GIB = 2**30


def configs(tiny: bool) -> tuple[dict, dict, dict]:
    """(transformer, text encoder, VAE) configs: the 4B model's, or the test suite's tiny ones."""
    if not tiny:
        return FULL_TRANSFORMER, FULL_TEXT_ENCODER, FULL_VAE
    from tiny_packs import TEXT_ENCODER_CONFIG, TINY_CONFIG, VAE_CONFIG

    te = dict(FULL_TEXT_ENCODER, **TEXT_ENCODER_CONFIG)
    return TINY_CONFIG, te, VAE_CONFIG


# -- logging and results ---------------------------------------------------------------------

T_START = time.perf_counter()
LOG_FILE: Path | None = None


def log(message: str) -> None:
    line = f"[{time.perf_counter() - T_START:7.1f}s] {message}"
    print(line, flush=True)
    if LOG_FILE is not None:
        with LOG_FILE.open("a") as f:
            f.write(line + "\n")


class Results(dict):
    """The run's results, rewritten to `path` (atomically) after every update."""

    def __init__(self, path: Path | None):
        super().__init__(errors=[])
        self.path = path

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def section(self, name: str):
        """Run a section; an exception is logged and recorded, and the run goes on."""
        log(f"== {name}")
        start = time.perf_counter()
        try:
            yield
        except Exception as e:  # one failed section must not lose the others' numbers
            log(f"!! {name} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            self["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()})
        finally:
            log(f"== {name} done in {time.perf_counter() - start:.1f} s")
            free()
            self.save()


def free() -> None:
    gc.collect()
    mx.clear_cache()


# -- random weights, generated in packed form ------------------------------------------------


def _key(*parts: object) -> mx.array:
    return mx.random.key(zlib.crc32(":".join(map(str, parts)).encode()))


def dense_tensor(name: str, shape: tuple[int, ...], seed: int) -> mx.array:
    """bf16: norm weights 1 + 0.1 N(0,1) (so they matter), linears N(0, 1/in)."""
    if len(shape) == 1:
        return (1 + 0.1 * mx.random.normal(shape, key=_key(seed, name))).astype(mx.bfloat16)
    return (mx.random.normal(shape, key=_key(seed, name)) / math.sqrt(shape[1])).astype(
        mx.bfloat16)


def packed_codes(name: str, shape: tuple[int, ...], kind: str,
                 seed: int) -> tuple[mx.array, mx.array]:
    """(codes uint32 [out, in], s bf16 [out, in/128]) of one packed linear.

    binary: codes are bits b, w = s * (2b - 1); ternary: codes are trits t, w = s * (t - 1).
    s is drawn so that w has std about 1/sqrt(in), which keeps activations O(1).
    """
    n_out, n_in = shape
    k_codes, k_scales = mx.random.split(_key(seed, kind, name))
    levels = 2 if kind == "binary" else 3
    codes = mx.random.randint(0, levels, shape, key=k_codes).astype(mx.uint32)
    # Var(2b-1) = 1, Var(t-1) = 2/3 for uniform codes.
    spread = 1.0 if kind == "binary" else math.sqrt(1.5)
    u = mx.random.uniform(0.75, 1.25, (n_out, n_in // GROUP_SIZE), key=k_scales)
    return codes, (u * spread / math.sqrt(n_in)).astype(mx.bfloat16)


def dequantize_codes(codes: mx.array, s: mx.array, kind: str) -> mx.array:
    """The dense bf16 weight that the codes and scales stand for (exact: products of +-1 or 0
    with a bf16 scale)."""
    n_out, n_in = codes.shape
    levels = codes.astype(mx.bfloat16) * (2 if kind == "binary" else 1) - 1
    w = levels.reshape(n_out, -1, GROUP_SIZE) * s[..., None]
    return w.reshape(n_out, n_in)


def pack_lsb(codes: mx.array, bits: int) -> mx.array:
    """Codes [out, in] -> uint32 [out, in*bits/32], element k of a word at bit k*bits (MLX affine
    and bonsai binary layout)."""
    n_out, n_in = codes.shape
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    words = codes.reshape(n_out, n_in // per_word, per_word) << shifts
    # The codes occupy disjoint bits, so the sum is an OR.
    return words.sum(axis=-1).astype(mx.uint32)


def pack_trits(trits: mx.array) -> mx.array:
    """Trits [out, in] -> uint8 [out, in/128*26], bonsai ternary (format_spec.md)."""
    n_out, n_in = trits.shape
    g = trits.reshape(n_out, n_in // GROUP_SIZE, GROUP_SIZE).astype(mx.uint16)
    pad = TERNARY_GROUP_BYTES * TRITS_PER_BYTE - GROUP_SIZE
    g = mx.pad(g, [(0, 0), (0, 0), (0, pad)])
    g = g.reshape(n_out, n_in // GROUP_SIZE, TERNARY_GROUP_BYTES, TRITS_PER_BYTE)
    powers = mx.array([3**i for i in range(TRITS_PER_BYTE)], dtype=mx.uint16)
    return (g * powers).sum(axis=-1).astype(mx.uint8).reshape(n_out, -1)


def random_words(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """Uniformly random uint32 words (every bit pattern is a valid 4-bit code run)."""
    halves = mx.random.randint(0, 2**16, (*shape, 2), key=key).astype(mx.uint32)
    return halves[..., 0] | (halves[..., 1] << 16)


def twin_weights(cfg: dict, kind: str, seed: int) -> dict[str, mx.array]:
    """Every transformer tensor, dense bf16, as the `kind` packs encode them."""
    packed = set(packed_layers(cfg))
    out = {}
    for name, shape in transformer_shapes(cfg, "config").items():
        layer = name.removesuffix(".weight")
        if layer in packed:
            out[name] = dequantize_codes(*packed_codes(layer, shape, kind, seed), kind)
        else:
            out[name] = dense_tensor(name, shape, seed)
        mx.eval(out[name])
    return out


def write_transformers(root: Path, cfg: dict, kind: str, seed: int) -> None:
    """prism-<kind>, bonsai-<kind> (and for ternary the dense twin) transformer folders."""
    packed = packed_layers(cfg)
    packed_set = set(packed)
    prism, bonsai, dense = {}, {}, {}
    for name, shape in transformer_shapes(cfg, "config").items():
        layer = name.removesuffix(".weight")
        if layer not in packed_set:
            t = dense_tensor(name, shape, seed)
            prism[name] = bonsai[name] = dense[name] = t
            mx.eval(t)
            continue
        codes, s = packed_codes(layer, shape, kind, seed)
        if kind == "binary":
            words = pack_lsb(codes, 1)
            prism |= {name: words, f"{layer}.scales": 2 * s, f"{layer}.biases": -s}
            bonsai |= {name: words, f"{layer}.scales": s}
        else:
            prism |= {name: pack_lsb(codes, 2), f"{layer}.scales": s, f"{layer}.biases": -s}
            bonsai |= {name: pack_trits(codes), f"{layer}.scales": s}
            dense[name] = dequantize_codes(codes, s, kind)
        mx.eval([prism[name], bonsai[name], dense.get(name, s)])
    config = json.dumps(cfg, indent=2)

    d = root / f"prism-{kind}" / "transformer-packed-mflux"
    d.mkdir(parents=True)
    mx.save_safetensors(str(d / "diffusion_pytorch_model.safetensors"), prism,
                        metadata={"format": "mlx"})
    (d / "config.json").write_text(config)
    (d / "quantization_config.json").write_text(json.dumps(
        {"bits": 1 if kind == "binary" else 2, "group_size": GROUP_SIZE,
         "skip_patterns": PRISM_SKIP}, indent=2))
    prism.clear()

    d = root / f"bonsai-{kind}" / "transformer-bonsai"
    d.mkdir(parents=True)
    mx.save_safetensors(str(d / "model.safetensors"), bonsai,
                        metadata={"format": "bonsai-packed", "version": "1", "variant": kind})
    (d / "config.json").write_text(config)
    (d / "bonsai.json").write_text(json.dumps({
        "format": "bonsai-packed", "version": 1, "variant": kind, "group_size": GROUP_SIZE,
        "scale_dtype": "bfloat16", "dense_dtype": "bfloat16", "packed_layers": packed,
        "source": {"path": f"prism-{kind}", "format": "prismml-mlx",
                   "method": "random codes written directly by benchmarks/pipeline.py"},
        "components": list(SHARED),
    }, indent=2))
    bonsai.clear()

    if kind == "ternary":  # diffusers layout: two shards and their index
        d = root / "dense" / "transformer"
        d.mkdir(parents=True)
        names = list(dense)
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            file = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
            mx.save_safetensors(str(d / file), {k: dense[k] for k in part},
                                metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}, indent=1))
        (d / "config.json").write_text(config)
        (root / "dense" / "model_index.json").write_text(json.dumps(
            {"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1",
             "is_distilled": True}))


def write_text_encoder(directory: Path, cfg: dict, seed: int) -> None:
    """Qwen3 in mlx-lm's 4-bit g64 layout (uint32 codes, bf16 scales and biases, embedding
    quantized too, no lm_head as the embeddings are tied). Codes are uniform in 0..15 (mean 7.5,
    std 4.61): scale = 1/(4.61 sqrt(in)) jittered, bias = -7.5 scale, so w ~ 0 +- 1/sqrt(in)."""
    directory.mkdir(parents=True)
    h, m, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj": (q, h), p + "self_attn.k_proj": (kv, h),
                   p + "self_attn.v_proj": (kv, h), p + "self_attn.o_proj": (h, q),
                   p + "self_attn.q_norm": (d,), p + "self_attn.k_norm": (d,),
                   p + "mlp.gate_proj": (m, h), p + "mlp.up_proj": (m, h),
                   p + "mlp.down_proj": (h, m), p + "input_layernorm": (h,),
                   p + "post_attention_layernorm": (h,)}
    shapes["model.norm"] = (h,)
    code_std = math.sqrt((2**TE_BITS) ** 2 - 1) / math.sqrt(12)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name + ".weight"] = dense_tensor(name, shape, seed)
            continue
        n_out, n_in = shape
        k_codes, k_scales = mx.random.split(_key(seed, "te", name))
        # The embedding's rows have std 1 (it has no fan-in); linears 1/sqrt(in).
        std = 1.0 if name.endswith("embed_tokens") else 1 / math.sqrt(n_in)
        u = mx.random.uniform(0.8, 1.2, (n_out, n_in // TE_GROUP), key=k_scales)
        scales = (u * std / code_std).astype(mx.bfloat16)
        tensors[name + ".weight"] = random_words((n_out, n_in * TE_BITS // 32), k_codes)
        tensors[name + ".scales"] = scales
        tensors[name + ".biases"] = (-(2**TE_BITS - 1) / 2 * scales).astype(mx.bfloat16)
        mx.eval([tensors[name + ".weight"], scales, tensors[name + ".biases"]])
    mx.save_safetensors(str(directory / "model.safetensors"), tensors, metadata={"format": "mlx"})
    quantization = {"group_size": TE_GROUP, "bits": TE_BITS}
    config = dict(cfg, quantization=quantization, quantization_config=quantization,
                  torch_dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def write_vae(directory: Path, cfg: dict, seed: int) -> None:
    """diffusers' AutoencoderKLFlux2 with random weights (norms and BN statistics perturbed, see
    tests/tiny_vae.py), saved in bf16 as the published vae/ folder."""
    import torch
    from tiny_vae import build_vae

    build_vae(cfg, seed).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)


def build(cache: Path, tiny: bool, seed: int, results: Results) -> dict[str, Path]:
    """Build (or reuse) every variant's model directory under `cache`; returns variant -> dir."""
    cfg, te_cfg, vae_cfg = configs(tiny)
    stamp = {"build_version": BUILD_VERSION, "tiny": tiny, "seed": seed}
    stamp_file = cache / "build.json"
    dirs = {v: cache / v for v in VARIANTS}
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        log(f"reusing the checkpoints in {cache}")
        results["build"] = {"reused": True}
    else:
        start = time.perf_counter()
        if cache.exists():
            shutil.rmtree(cache)
        shared = cache / "shared"
        shared.mkdir(parents=True)
        from tiny_packs import SCHEDULER_CONFIG
        from tiny_text import write_tokenizer

        write_tokenizer(shared / "tokenizer")
        (shared / "scheduler").mkdir()
        (shared / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
        write_vae(shared / "vae", vae_cfg, seed)
        log("tokenizer, scheduler, VAE written")
        write_text_encoder(shared / "text_encoder-mlx-4bit", te_cfg, seed)
        free()
        log("text encoder written")
        for kind in ("binary", "ternary"):
            write_transformers(cache, cfg, kind, seed)
            free()
            log(f"{kind} transformers written")
        for d in dirs.values():
            for name in SHARED:
                (d / name).symlink_to(Path("..") / "shared" / name)
        stamp_file.write_text(json.dumps(stamp))
        results["build"] = {"reused": False, "seconds": time.perf_counter() - start}
    results["build"]["bytes"] = {
        name: sum(f.stat().st_size for f in (cache / name).rglob("*") if f.is_file())
        for name in (*[f"{v}/{sub}" for v, sub in _TRANSFORMER_DIRS.items()],
                     *[f"shared/{s}" for s in SHARED])
    }
    return dirs


_TRANSFORMER_DIRS = {
    "prism-binary": "transformer-packed-mflux", "prism-ternary": "transformer-packed-mflux",
    "bonsai-binary": "transformer-bonsai", "bonsai-ternary": "transformer-bonsai",
    "dense": "transformer",
}


def check_converter(dirs: dict[str, Path], scratch: Path) -> dict[str, bool]:
    """The converter run on the PrismML folders must give exactly our bonsai tensors."""
    from mlx_bonsai.convert import convert
    from mlx_bonsai.weights import load_safetensors_dir

    out = {}
    for kind in ("binary", "ternary"):
        target = scratch / f"converted-{kind}"
        convert(str(dirs[f"prism-{kind}"]), target, overwrite=True, progress=False)
        ours = load_safetensors_dir(dirs[f"bonsai-{kind}"] / "transformer-bonsai")
        theirs = load_safetensors_dir(target / "transformer-bonsai")
        out[kind] = ours.keys() == theirs.keys() and all(
            ours[k].dtype == theirs[k].dtype and mx.array_equal(ours[k], theirs[k]).item()
            for k in ours)
        shutil.rmtree(target)
    return out


# -- measurements ----------------------------------------------------------------------------


def matmul_rate(n: int, repeats: int = 5, batch: int = 10) -> dict[str, float]:
    """Best-of-`repeats` bf16 TFLOP/s of `batch` (n x n) @ (n x n) matmuls evaluated together."""
    a = mx.random.normal((n, n), key=mx.random.key(1)).astype(mx.bfloat16)
    b = mx.random.normal((n, n), key=mx.random.key(2)).astype(mx.bfloat16)
    mx.eval(a, b)
    mx.eval([a @ b for _ in range(3)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval([a @ b for _ in range(batch)])
        times.append((time.perf_counter() - start) / batch)
    best = min(times)
    return {"n": n, "ms": best * 1e3, "tflops": 2 * n**3 / best / 1e12}


def step_flops(cfg: dict, n_img: int, n_txt: int = N_TXT) -> float:
    """FLOPs of one transformer call (2 per multiply-add): every linear at its token count, plus
    attention's QK^T and PV (architecture.md §3.13). Norms, RoPE and activations not counted."""
    c = TransformerConfig.from_dict(cfg)
    d, m, s = c.dim, c.mlp_dim, n_img + n_txt
    macs = n_img * (c.in_channels + c.out_channels) * d + n_txt * c.joint_attention_dim * d
    # Per-step vectors (one row each): timestep MLP, three modulations, norm_out.
    macs += c.timestep_guidance_channels * d + d * d + (6 + 6 + 3 + 2) * d * d
    macs += c.num_layers * s * (4 * d * d + 3 * d * m)  # both streams: q,k,v,out + SwiGLU FFN
    macs += c.num_single_layers * s * (d * (3 * d + 2 * m) + (d + m) * d)
    macs += (c.num_layers + c.num_single_layers) * 2 * s * s * d
    return 2.0 * macs


def step_inputs(cfg: dict, size: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Random x tokens (1, N_img, 128), context (1, 512, joint), t and the position ids."""
    rng = np.random.default_rng(seed)
    side = size // 16
    x = rng.standard_normal((1, side * side, cfg["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((1, N_TXT, cfg["joint_attention_dim"])).astype(np.float32)
    t = np.array([0.908], dtype=np.float32)  # step 2 of 4 at 1024^2, rounded in bf16 below
    return x, ctx, t, text_ids(N_TXT), image_ids(side, side)


def mlx_step(model: Transformer, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    x, ctx, t, txt, img = inputs
    bf16 = mx.bfloat16
    out = model(mx.array(x).astype(bf16), mx.array(ctx).astype(bf16), mx.array(t).astype(bf16),
                model.rope(txt, img))
    return np.array(out.astype(mx.float32))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return math.nan
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def model_from_weights(cfg: dict, weights: dict[str, mx.array]) -> Transformer:
    model = Transformer(TransformerConfig.from_dict(cfg))
    load_weights(model, weights, "twin")
    mx.eval(model.parameters())
    return model


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def diffusers_transformer(cfg: dict, dense_dir: Path):
    """diffusers' transformer in bf16 on the GPU holding the dense checkpoint's weights."""
    import torch
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    device = torch_device()
    with default_dtype(torch.bfloat16), device:
        model = Flux2Transformer2DModel(**{k: v for k, v in cfg.items()
                                           if not k.startswith("_")})
    state = {}
    for f in sorted(dense_dir.glob("*.safetensors")):
        state |= load_file(str(f), device=str(device))
    model.load_state_dict(state, strict=True)
    return model.eval().to(torch.bfloat16)


@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def parity(dirs: dict[str, Path], cfg: dict, size: int, seed: int, results: Results,
           with_diffusers: bool) -> None:
    """Transformer-step parity at `size`: ours (dense bf16) vs diffusers, packed vs twin."""
    inputs = step_inputs(cfg, size)
    out: dict[str, Any] = {"size": size, "tolerance": TOLERANCE, "timestep": float(inputs[2][0])}
    results["parity"] = out
    dense = load_transformer(dirs["dense"] / "transformer", mx.bfloat16)
    ours_dense = mlx_step(dense, inputs)
    del dense
    free()
    if with_diffusers:
        import torch

        model = diffusers_transformer(cfg, dirs["dense"] / "transformer")
        x, ctx, t, txt, img = inputs
        dev = torch_device()
        with torch.inference_mode():
            ref = model(hidden_states=torch.from_numpy(x).to(dev, torch.bfloat16),
                        encoder_hidden_states=torch.from_numpy(ctx).to(dev, torch.bfloat16),
                        timestep=torch.from_numpy(t).to(dev, torch.bfloat16),
                        img_ids=torch.from_numpy(img).to(dev),
                        txt_ids=torch.from_numpy(txt).to(dev),
                        return_dict=False)[0]
        ref = ref.float().cpu().numpy()
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        err = rel_err(ours_dense, ref)
        out["dense_vs_diffusers"] = {"rel_err": err, "pass": err <= TOLERANCE,
                                     "max_abs_ref": float(np.abs(ref).max())}
        log(f"dense bf16 vs diffusers bf16 at {size}^2: rel err {err:.3e}")
        results.save()
    for kind in ("binary", "ternary"):
        twin = model_from_weights(cfg, twin_weights(cfg, kind, seed))
        expected = mlx_step(twin, inputs)
        del twin
        free()
        if kind == "ternary":  # the dense checkpoint is this twin, written at build time
            err = rel_err(ours_dense, expected)
            out["dense_checkpoint_vs_ternary_twin"] = {"rel_err": err, "pass": err <= TOLERANCE}
        for layout in ("prism", "bonsai"):
            variant = f"{layout}-{kind}"
            model = load_transformer(dirs[variant] / _TRANSFORMER_DIRS[variant], mx.bfloat16)
            err = rel_err(mlx_step(model, inputs), expected)
            del model
            free()
            out[f"{variant}_vs_twin"] = {"rel_err": err, "pass": err <= TOLERANCE}
            log(f"{variant} vs its dense twin at {size}^2: rel err {err:.3e}")
            results.save()


def steps_from(denoise: float, marks: list[float]) -> list[float]:
    """Per-step seconds from the progress callback's timestamps; step 0 also holds the loop's
    set-up (RoPE tables, schedule), which is what the phase total minus the later steps leaves."""
    later = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    return [denoise - sum(later), *later]


def generate(pipe, size: int, prompt: str) -> dict[str, Any]:
    marks: list[float] = []
    result = pipe(prompt, width=size, height=size, steps=STEPS, seed=SEED,
                  progress=lambda i: marks.append(time.perf_counter()))
    t = result.timings
    return {
        "encode_s": t["encode"], "decode_s": t["decode"], "denoise_s": t["denoise"],
        "steps_s": steps_from(t["denoise"], marks),
        "total_s": t["encode"] + t["denoise"] + t["decode"],
        "load_s": t["load"] or None,
        "peak": {k: v for k, v in result.peak_memory.items() if k != "load" or v},
    }


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Median over measured runs of each phase; the step time is the median of all steps."""
    med = statistics.median
    return {
        "encode_s": med(r["encode_s"] for r in runs),
        "denoise_s": med(r["denoise_s"] for r in runs),
        "decode_s": med(r["decode_s"] for r in runs),
        "total_s": med(r["total_s"] for r in runs),
        "step_s": med(s for r in runs for s in r["steps_s"]),
        "peak": {k: max(r["peak"].get(k, 0) for r in runs)
                 for k in ("encode", "denoise", "decode")},
        "runs": runs,
    }


_PROMPTS = iter(f"a bonsai tree on a wooden table, photograph number {i}" for i in range(10**6))


def time_variant(directory: Path, sizes: list[int], repeats: int, low_memory: bool = False,
                 last: bool = True) -> dict[str, Any]:
    from mlx_bonsai.pipeline import BonsaiPipeline

    pipe = BonsaiPipeline.from_pretrained(str(directory), dtype="bfloat16", low_memory=low_memory)
    out: dict[str, Any] = {"load_s": pipe.load_time, "load_peak": pipe.load_peak}
    for size in sizes:
        warm = generate(pipe, size, next(_PROMPTS))
        runs = [generate(pipe, size, next(_PROMPTS)) for _ in range(repeats)]
        out[str(size)] = summarize(runs) | {"warmup": warm}
        s = out[str(size)]
        log(f"  {directory.name} {size}^2: encode {s['encode_s']:.3f} s, step {s['step_s']:.4f} s,"
            f" decode {s['decode_s']:.3f} s, peak {max(s['peak'].values()) / GIB:.2f} GiB")
    del pipe
    return out


def low_memory_run(directory: Path, size: int, repeats: int) -> dict[str, Any]:
    """A fresh low-memory pipeline: load, a first (cold) generation, then measured ones; the
    whole-run peak covers all of it."""
    free()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = time_variant(directory, [size], repeats, low_memory=True)
    s = out[str(size)]
    phases = [out["load_peak"], *s["warmup"]["peak"].values(),
              *(v for r in s["runs"] for v in r["peak"].values())]
    out["active_before"] = before
    out["whole_run_peak"] = max(phases)
    log(f"  low-memory {size}^2: whole-run peak {out['whole_run_peak'] / GIB:.3f} GiB "
        f"(load {out['load_peak'] / GIB:.3f}, encode {s['peak']['encode'] / GIB:.3f}, denoise "
        f"{s['peak']['denoise'] / GIB:.3f}, decode {s['peak']['decode'] / GIB:.3f})")
    return out


def diffusers_pipeline(dirs: dict[str, Path], cfg: dict, te_cfg: dict):
    """Flux2KleinPipeline in bf16: our dense transformer weights and VAE, a random Qwen3."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

    device = torch_device()
    shared = dirs["dense"]
    te_config = Qwen3Config(**{k: v for k, v in te_cfg.items() if k != "architectures"})
    with default_dtype(torch.bfloat16), device:
        text_encoder = Qwen3ForCausalLM(te_config).eval()
    vae = AutoencoderKLFlux2.from_pretrained(str(shared / "vae"), torch_dtype=torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(shared / "scheduler"))
    pipe = Flux2KleinPipeline(
        scheduler=scheduler, vae=vae.to(device).eval(), text_encoder=text_encoder,
        tokenizer=Qwen2Tokenizer.from_pretrained(str(shared / "tokenizer")),
        transformer=diffusers_transformer(cfg, shared / "transformer"), is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_generate(pipe, size: int, prompt: str) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    peaks = {}

    def reset():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(name):
        if cuda:
            peaks[name] = torch.cuda.max_memory_allocated()

    marks: list[float] = []

    def on_step(pipeline, i, t, kwargs):
        torch_sync()
        marks.append(time.perf_counter())
        return kwargs

    with torch.inference_mode():
        torch_sync()
        reset()
        start = time.perf_counter()
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=torch_device())
        torch_sync()
        encoded = time.perf_counter()
        peak("encode")
        reset()
        generator = torch.Generator(torch_device()).manual_seed(SEED)
        pipe(prompt_embeds=embeds, height=size, width=size, num_inference_steps=STEPS,
             guidance_scale=1.0, generator=generator, output_type="pil",
             callback_on_step_end=on_step)
        torch_sync()
        end = time.perf_counter()
        peak("denoise+decode")
    denoise = marks[-1] - encoded
    return {"encode_s": encoded - start, "denoise_s": denoise,
            "steps_s": steps_from(denoise, marks), "decode_s": end - marks[-1],
            "total_s": end - start, "peak": peaks}


def time_diffusers(dirs: dict[str, Path], cfg: dict, te_cfg: dict, sizes: list[int],
                   repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    pipe = diffusers_pipeline(dirs, cfg, te_cfg)
    torch_sync()
    out: dict[str, Any] = {"build_s": time.perf_counter() - start}
    for size in sizes:
        warm = diffusers_generate(pipe, size, next(_PROMPTS))
        runs = [diffusers_generate(pipe, size, next(_PROMPTS)) for _ in range(repeats)]
        med = statistics.median
        out[str(size)] = {
            "encode_s": med(r["encode_s"] for r in runs),
            "denoise_s": med(r["denoise_s"] for r in runs),
            "decode_s": med(r["decode_s"] for r in runs),
            "total_s": med(r["total_s"] for r in runs),
            "step_s": med(s for r in runs for s in r["steps_s"]),
            "runs": runs, "warmup": warm,
        }
        s = out[str(size)]
        log(f"  diffusers {size}^2: encode {s['encode_s']:.3f} s, step {s['step_s']:.4f} s, "
            f"decode {s['decode_s']:.3f} s, total {s['total_s']:.3f} s")
    del pipe
    return out


# -- profile (--profile): where the time and the memory go -----------------------------------


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of fn() evaluated, after one warm-up call."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_vae(vae_dir: Path, size: int) -> dict[str, Any]:
    """Seconds per part of one decode at `size`, each part evaluated on its own."""
    from mlx_bonsai.vae import load_vae, unpatchify

    vae = load_vae(vae_dir, mx.bfloat16)
    side = size // 16
    latents = mx.random.normal((1, side, side, 128), key=mx.random.key(3)).astype(mx.bfloat16)
    whole = timed(lambda: vae.decode(latents), repeats=2)
    dec = vae.decoder
    mid = dec.mid_block
    parts = [("post_quant_conv", vae._stem_input), ("conv_in", dec.conv_in),
             ("mid.resnet0", mid.resnets[0]), ("mid.attention", mid.attentions[0]),
             ("mid.resnet1", mid.resnets[1])]
    for i, block in enumerate(dec.up_blocks):
        parts += [(f"up{i}.resnet{j}", r) for j, r in enumerate(block.resnets)]
        parts += [(f"up{i}.upsample", u) for u in block.upsamplers]
    parts.append(("norm_out+conv_out", dec.output))
    x = unpatchify(vae.bn.denormalize(latents))
    mx.eval(x)
    out = {"decode_s": whole, "parts_s": {}}
    for name, fn in parts:
        y = fn(x)
        mx.eval(y)  # warm-up (kernel compilation)
        out["parts_s"][name] = timed(lambda fn=fn, x=x: fn(x), repeats=2)
        out["parts_s"][name + " shape"] = list(y.shape)
        x = y
    return out


def conv3x3_as_matmuls(x: mx.array, w: mx.array) -> mx.array:
    """A 3x3 'same' convolution (NHWC, weight (out, 3, 3, in)) as nine shifted matmuls: what
    the convolution would cost at MLX's matmul speed."""
    b, h, wd, c = x.shape
    xp = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    out = None
    for dy in range(3):
        for dx in range(3):
            term = xp[:, dy:dy + h, dx:dx + wd, :] @ w[:, dy, dx, :].T
            out = term if out is None else out + term
    return out


def profile_convs(tiny: bool) -> list[dict[str, Any]]:
    """3x3 convolutions at the FLUX.2 decoder's 1024^2 shapes: MLX conv2d, the same as nine
    MLX matmuls, and torch (cuDNN, channels_last) on the same GPU, all bf16."""
    shapes = ([(32, 32, 16, 16), (64, 64, 16, 8)] if tiny else
              [(128, 128, 512, 512), (256, 256, 512, 512), (512, 512, 512, 512),
               (512, 512, 512, 256), (512, 512, 256, 256), (1024, 1024, 256, 256),
               (1024, 1024, 256, 128), (1024, 1024, 128, 128)])
    out = []
    for h, w, cin, cout in shapes:
        k1, k2 = mx.random.split(mx.random.key(h + cin))
        x = mx.random.normal((1, h, w, cin), key=k1).astype(mx.bfloat16)
        wt = (mx.random.normal((cout, 3, 3, cin), key=k2) / math.sqrt(9 * cin)).astype(
            mx.bfloat16)
        flops = 2 * h * w * 9 * cin * cout
        row: dict[str, Any] = {"shape": [h, w, cin, cout], "gflop": flops / 1e9}
        row["mlx_conv_ms"] = timed(lambda x=x, wt=wt: mx.conv2d(x, wt, padding=1)) * 1e3
        row["mlx_9matmul_ms"] = timed(lambda x=x, wt=wt: conv3x3_as_matmuls(x, wt)) * 1e3
        row["rel_err_9matmul"] = rel_err(np.array(conv3x3_as_matmuls(x, wt).astype(mx.float32)),
                                         np.array(mx.conv2d(x, wt, padding=1).astype(mx.float32)))
        try:
            import torch

            dev = torch_device()
            tx = torch.from_numpy(np.array(x.astype(mx.float32))).to(dev, torch.bfloat16)
            tx = tx.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            tw = torch.from_numpy(np.array(wt.astype(mx.float32))).to(dev, torch.bfloat16)
            tw = tw.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.functional.conv2d
            with torch.inference_mode():
                for _ in range(2):
                    conv(tx, tw, padding=1)
                torch_sync()
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    conv(tx, tw, padding=1)
                    torch_sync()
                    times.append(time.perf_counter() - start)
            row["torch_conv_ms"] = statistics.median(times) * 1e3
        except Exception as e:  # torch is optional here: the MLX numbers stand alone
            row["torch_conv_ms"] = f"unavailable ({type(e).__name__})"
        log(f"  conv {h}x{w} {cin}->{cout}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)))
        out.append(row)
    return out


def profile_attention(cfg: dict, sizes: list[int]) -> list[dict[str, Any]]:
    """The transformer's attention (24 heads of 128, S = 512 + image tokens), MLX's fused SDPA
    vs torch's on the same GPU, bf16: 4 S^2 D FLOPs per call."""
    c = TransformerConfig.from_dict(cfg)
    out = []
    for size in sizes:
        s = N_TXT + (size // 16) ** 2
        shape = (1, c.num_attention_heads, s, c.attention_head_dim)
        q, k, v = (mx.random.normal(shape, key=mx.random.key(i)).astype(mx.bfloat16)
                   for i in range(3))
        row: dict[str, Any] = {"size": size, "tokens": s,
                               "gflop": 4 * s * s * c.dim / 1e9}
        row["mlx_ms"] = timed(lambda q=q, k=k, v=v: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=c.attention_head_dim**-0.5)) * 1e3
        try:
            import torch

            tq, tk, tv = (torch.from_numpy(np.array(a.astype(mx.float32))).to(
                torch_device(), torch.bfloat16) for a in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            with torch.inference_mode():
                sdpa(tq, tk, tv)
                torch_sync()
                start = time.perf_counter()
                for _ in range(5):
                    sdpa(tq, tk, tv)
                torch_sync()
            row["torch_ms"] = (time.perf_counter() - start) / 5 * 1e3
        except Exception as e:  # torch is optional here
            row["torch_ms"] = f"unavailable ({type(e).__name__})"
        log(f"  attention {size}^2: {row}")
        out.append(row)
    return out


def step_memory(directory: Path, size: int, cfg: dict, per_block: bool) -> dict[str, Any]:
    """One transformer step at `size`: seconds and MLX peak above the resident weights, with
    the step evaluated at the end (as the pipeline does) or after every block (per_block)."""
    from mlx_bonsai import transformer as tm

    model = load_transformer(directory, mx.bfloat16)
    mx.eval(model.parameters())
    resident = mx.get_active_memory()
    inputs = step_inputs(cfg, size)
    originals = tm.DoubleBlock.__call__, tm.SingleBlock.__call__
    if per_block:
        def evaluated(call):
            def run(*a, **k):
                out = call(*a, **k)
                mx.eval(out)
                return out
            return run
        tm.DoubleBlock.__call__, tm.SingleBlock.__call__ = map(evaluated, originals)
    try:
        mlx_step(model, inputs)
        times, peaks = [], []
        for _ in range(3):
            mx.synchronize()
            mx.reset_peak_memory()
            start = time.perf_counter()
            mlx_step(model, inputs)
            times.append(time.perf_counter() - start)
            peaks.append(mx.get_peak_memory())
    finally:
        tm.DoubleBlock.__call__, tm.SingleBlock.__call__ = originals
    return {"step_s": statistics.median(times), "resident": resident,
            "peak_above_resident": max(peaks) - resident, "env": {
                k: v for k, v in os.environ.items() if k.startswith("MLX_")}}


STEP_ENVS = ({}, {"MLX_MAX_OPS_PER_BUFFER": "4"}, {"MLX_MAX_MB_PER_BUFFER": "64"},
             {"MLX_USE_CUDA_GRAPHS": "0"})


def profile(dirs: dict[str, Path], cfg: dict, sizes: list[int], args, r: Results) -> None:
    out = r.setdefault("profile", {})
    for size in sizes:
        out[f"vae_{size}"] = profile_vae(dirs["dense"] / "vae", size)
        parts = out[f"vae_{size}"]["parts_s"]
        worst = sorted((v, k) for k, v in parts.items() if isinstance(v, float))[-4:]
        log(f"  VAE {size}^2: decode {out[f'vae_{size}']['decode_s']:.3f} s; slowest parts "
            + ", ".join(f"{k} {v * 1e3:.0f} ms" for v, k in reversed(worst)))
        r.save()
        free()
    out["convs"] = profile_convs(args.tiny)
    r.save()
    free()
    out["attention"] = profile_attention(cfg, sizes)
    r.save()
    free()
    size = max(sizes)
    out["step_memory"] = {}
    for variant in ("bonsai-binary", "dense"):
        for per_block in (False, True):
            key = f"{variant} {size} {'per-block eval' if per_block else 'default'}"
            out["step_memory"][key] = step_memory(
                dirs[variant] / _TRANSFORMER_DIRS[variant], size, cfg, per_block)
            log(f"  {key}: {out['step_memory'][key]}")
            r.save()
            free()
    # MLX reads its buffer limits once, at start: one process per setting.
    import subprocess

    for env in STEP_ENVS[1:]:
        key = f"bonsai-binary {size} default {env}"
        command = [sys.executable, __file__, "--cache", str(args.cache), "--step-memory",
                   "bonsai-binary", str(size)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, env=os.environ | env, capture_output=True, text=True,
                              timeout=300)
        lines = done.stdout.strip().splitlines()
        out["step_memory"][key] = (json.loads(lines[-1]) if done.returncode == 0 and lines
                                   else {"error": done.stderr[-2000:]})
        log(f"  {key}: {out['step_memory'][key]}")
        r.save()


# -- what would close the gaps (--fixes): measured, as experiments, not library changes -------


def _group_sums(per_channel: mx.array, groups: int) -> mx.array:
    b, c = per_channel.shape
    return per_channel.reshape(b, groups, c // groups).sum(axis=-1)


def blocked_statistics(self, x: mx.array) -> tuple[mx.array, mx.array]:
    """GroupNorm mean and variance like `vae.GroupNorm.statistics` (float32, two passes), but
    reduced in two contiguous stages (blocks of pixels, then blocks) so that every reduction
    has many outputs. MLX's CUDA reduction over the strided (pixels, channels-in-group) axes
    has only groups x batch outputs, and its time grows with the pixel count."""
    b, c = x.shape[0], x.shape[-1]
    xf = x.reshape(b, -1, c).astype(mx.float32)
    n = xf.shape[1]
    rows = next(r for r in (1024, 256, 64, 16, 4, 1) if n % r == 0)

    def channel_sums(a: mx.array) -> mx.array:
        return a.reshape(b, rows, n // rows, c).sum(axis=2).sum(axis=1)

    count = n * (c // self.groups)
    mean = _group_sums(channel_sums(xf), self.groups) / count
    centered = xf - mx.repeat(mean, c // self.groups, axis=1)[:, None, :]
    var = _group_sums(channel_sums(centered * centered), self.groups) / count
    return mean, var


def _groupnorm_pieces(h: int, w: int, c: int, groups: int) -> dict[str, Any]:
    from mlx_bonsai.vae import GroupNorm

    norm = GroupNorm(groups, c)
    x = mx.random.normal((1, h, w, c), key=mx.random.key(5)).astype(mx.bfloat16) * 3 + 1
    wt = (mx.random.normal((c, 3, 3, c), key=mx.random.key(6)) / math.sqrt(9 * c)).astype(
        mx.bfloat16)
    mean, var = norm.statistics(x)
    mean2, var2 = blocked_statistics(norm, x)
    return {
        "shape": [h, w, c],
        "stats_ms": timed(lambda: norm.statistics(x)) * 1e3,
        "blocked_stats_ms": timed(lambda: blocked_statistics(norm, x)) * 1e3,
        "normalize_ms": timed(lambda: norm.normalize(x, mean, var)) * 1e3,
        "silu_ms": timed(lambda: x * mx.sigmoid(x)) * 1e3,
        "conv_ms": timed(lambda: mx.conv2d(x, wt, padding=1)) * 1e3,
        "blocked_rel_err_mean": rel_err(np.array(mean2), np.array(mean)),
        "blocked_rel_err_var": rel_err(np.array(var2), np.array(var)),
    }


def profile_groupnorm(tiny: bool) -> list[dict[str, Any]]:
    """The pieces of a VAE resnet at full resolution: GroupNorm statistics (as written, and
    blocked), normalisation, SiLU and the 3x3 conv, each timed alone."""
    shapes = [(64, 64, 16)] if tiny else [(1024, 1024, 128), (512, 512, 256), (256, 256, 512)]
    out = []
    for h, w, c in shapes:
        row = _groupnorm_pieces(h, w, c, 8 if tiny else 32)
        log(f"  GroupNorm pieces {h}x{w}x{c}: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                          row.items() if k != "shape"))
        out.append(row)
    return out


def patch_groupnorm() -> None:
    from mlx_bonsai import vae

    vae.GroupNorm.statistics = blocked_statistics


def fixes(dirs: dict[str, Path], sizes: list[int], args, r: Results) -> None:
    """Measure the two fixes the first run points to, as experiments on this GPU:
    GroupNorm statistics reduced in blocks (VAE time) and MLX_MAX_MB_PER_BUFFER (peak memory),
    then the whole benchmark again with both, in a child process."""
    from mlx_bonsai import vae as vae_module

    out = r.setdefault("fixes", {})
    out["groupnorm"] = profile_groupnorm(args.tiny)
    r.save()
    model = vae_module.load_vae(dirs["dense"] / "vae", mx.bfloat16)
    original = vae_module.GroupNorm.statistics
    for size in sizes:
        side = size // 16
        z = mx.random.normal((1, side, side, 128), key=mx.random.key(3)).astype(mx.bfloat16)
        before = model.decode(z)
        t_before = timed(lambda z=z: model.decode(z), repeats=1)
        patch_groupnorm()
        try:
            after = model.decode(z)
            t_after = timed(lambda z=z: model.decode(z), repeats=2)
        finally:
            vae_module.GroupNorm.statistics = original
        out[f"vae_{size}"] = {"decode_s": t_before, "blocked_decode_s": t_after,
                              "rel_err": rel_err(np.array(after), np.array(before))}
        log(f"  VAE {size}^2 decode: {out[f'vae_{size}']}")
        r.save()
    # Equivalence in float32, where bf16 rounding through 30 layers does not mask it.
    model = vae_module.load_vae(dirs["dense"] / "vae", mx.float32)
    side = min(sizes) // 16
    z = mx.random.normal((1, side, side, 128), key=mx.random.key(3))
    before = np.array(model.decode(z))
    patch_groupnorm()
    try:
        after = np.array(model.decode(z))
    finally:
        vae_module.GroupNorm.statistics = original
    out[f"vae_{min(sizes)}_float32_rel_err"] = rel_err(after, before)
    log(f"  float32 decode, blocked vs original statistics: rel err {rel_err(after, before):.2e}")
    model = None  # release the VAE before the child process runs
    free()
    import subprocess

    child = args.json.with_name("fixes_pipeline.json") if args.json else None
    command = [sys.executable, __file__, "--cache", str(args.cache), "--patch-groupnorm",
               "--skip", "parity", "--variants", "bonsai-binary", "bonsai-ternary", "dense",
               "--sizes", *map(str, sizes)] + (["--json", str(child)] if child else []) + (
               ["--tiny"] if args.tiny else []) + (
               ["--deadline", str(args.deadline)] if args.deadline else [])
    env = os.environ | {"MLX_MAX_MB_PER_BUFFER": "64"}
    log(f"  child: MLX_MAX_MB_PER_BUFFER=64 {' '.join(command)}")
    done = subprocess.run(command, env=env, text=True, timeout=900)
    out["child"] = {"command": command, "env": {"MLX_MAX_MB_PER_BUFFER": "64"},
                    "returncode": done.returncode, "json": str(child)}


# -- report ----------------------------------------------------------------------------------


def _gib(b: float | None) -> str:
    return "-" if not b else f"{b / GIB:.2f}"


def targets(r: dict) -> dict[str, Any]:
    """Each target of issue #8: the numbers it compares and whether it holds."""
    out: dict[str, Any] = {}
    timing, low = r.get("timing", {}), r.get("low_memory", {}).get("bonsai-binary", {})
    for size, limit in (("512", 1.2e9), ("1024", 1.6e9)):
        if size in low:
            peak = low[size]["whole_run_peak"]
            out[f"low_memory_peak_{size}"] = {"peak_bytes": peak, "limit_bytes": limit,
                                              "ratio": peak / limit, "holds": peak <= limit}
    for size in ("512", "1024"):
        dense = timing.get("dense", {}).get(size)
        for v in PACKED:
            run = timing.get(v, {}).get(size)
            if dense and run:
                ratio = run["step_s"] / dense["step_s"]
                out[f"step_{v}_vs_dense_{size}"] = {"ratio": ratio, "limit": 1.10,
                                                     "holds": ratio <= 1.10}
    floor = r.get("floor", {}).get("1024")
    if floor:
        for v, f in floor["variants"].items():
            out[f"floor_{v}_1024"] = {"ratio": f["ratio_to_floor"], "limit": 1.25,
                                      "holds": f["ratio_to_floor"] <= 1.25}
    ref = r.get("diffusers", {}).get("1024")
    if ref:
        for v in VARIANTS:
            run = timing.get(v, {}).get("1024")
            if run:
                ratio = run["total_s"] / ref["total_s"]
                out[f"pipeline_{v}_vs_diffusers_1024"] = {"ratio": ratio, "limit": 1.0,
                                                          "holds": ratio < 1.0}
    return out


def floor_table(r: dict, cfg: dict) -> dict[str, Any]:
    rate = r.get("matmul", {}).get("tflops")
    out = {}
    for size in r.get("args", {}).get("sizes", []):
        flops = step_flops(cfg, (size // 16) ** 2)
        entry: dict[str, Any] = {"flops": flops}
        if rate:
            floor_s = flops / (rate * 1e12)
            entry["floor_s"] = floor_s
            entry["variants"] = {
                v: {"step_s": run[str(size)]["step_s"],
                    "ratio_to_floor": run[str(size)]["step_s"] / floor_s}
                for v, run in r.get("timing", {}).items() if str(size) in run
            }
            ref = r.get("diffusers", {}).get(str(size))
            if ref:
                entry["variants"]["diffusers"] = {"step_s": ref["step_s"],
                                                  "ratio_to_floor": ref["step_s"] / floor_s}
        out[str(size)] = entry
    return out


def report(r: dict) -> str:
    lines = []
    meta = r.get("meta", {})
    lines.append(f"device: {meta.get('device')}  mlx {meta.get('mlx')}  torch {meta.get('torch')}"
                 f"  diffusers {meta.get('diffusers')}")
    if "matmul" in r:
        m = r["matmul"]
        lines.append(f"MLX bf16 matmul {m['n']}^3: {m['tflops']:.0f} TFLOP/s")
    p = r.get("parity", {})
    if p:
        lines.append(f"parity at {p['size']}^2 (tolerance {p['tolerance']}):")
        for k, v in p.items():
            if isinstance(v, dict):
                lines.append(f"  {k:36s} {v['rel_err']:.3e}  {'ok' if v['pass'] else 'FAIL'}")
    timing = r.get("timing", {})
    ref = r.get("diffusers", {})
    for size in [str(s) for s in r.get("args", {}).get("sizes", [])]:
        dense = timing.get("dense", {}).get(size)
        lines.append(f"\n{size}^2, {STEPS} steps (seconds, warm; peak = MLX peak GiB per phase;"
                     " ratios vs our dense bf16 step and vs diffusers' whole pipeline)")
        lines.append(f"{'variant':16s} {'load':>6s} {'encode':>7s} {'step':>7s} {'decode':>7s} "
                     f"{'total':>7s} {'step/dense':>10s} {'tot/diff':>8s} "
                     f"{'peak load/enc/den/dec':>24s}")
        for v in (*VARIANTS, "diffusers"):
            run = timing.get(v, {}).get(size) if v != "diffusers" else ref.get(size)
            if not run:
                continue
            load = timing.get(v, {}).get("load_s") if v != "diffusers" else ref.get("build_s")
            rd = f"{run['step_s'] / dense['step_s']:.2f}" if dense else "-"
            rt = f"{run['total_s'] / ref[size]['total_s']:.2f}" if size in ref else "-"
            pk = run.get("peak", {})
            load_peak = timing.get(v, {}).get("load_peak")
            peaks = "/".join(_gib(x) for x in (load_peak, pk.get("encode"), pk.get("denoise"),
                                                pk.get("decode"))) if v != "diffusers" else \
                "torch " + "/".join(_gib(x) for x in run["runs"][0]["peak"].values())
            lines.append(f"{v:16s} {load or 0:6.2f} {run['encode_s']:7.3f} {run['step_s']:7.4f} "
                         f"{run['decode_s']:7.3f} {run['total_s']:7.3f} {rd:>10s} {rt:>8s} "
                         f"{peaks:>24s}")
    for v, low in r.get("low_memory", {}).items():
        for size, run in low.items():
            s = run[size]
            lines.append(f"low-memory {v} {size}^2: whole-run peak {_gib(run['whole_run_peak'])} "
                         f"GiB (load {_gib(run['load_peak'])}, encode {_gib(s['peak']['encode'])}"
                         f", denoise {_gib(s['peak']['denoise'])}, decode "
                         f"{_gib(s['peak']['decode'])}); step {s['step_s']:.4f} s, total "
                         f"{s['total_s']:.3f} s")
    for size, f in r.get("floor", {}).items():
        if "floor_s" in f:
            ratios = ", ".join(f"{v} {x['ratio_to_floor']:.2f}x"
                               for v, x in f["variants"].items())
            lines.append(f"compute floor {size}^2: {f['flops'] / 1e12:.1f} TFLOP/step -> "
                         f"{f['floor_s'] * 1e3:.1f} ms; step / floor: {ratios}")
    for name, t in r.get("targets", {}).items():
        lines.append(f"target {name}: ratio {t['ratio']:.2f} (limit {t.get('limit', 1.0)}) "
                     f"{'holds' if t['holds'] else 'MISSED'}")
    for e in r.get("errors", []):
        lines.append(f"error in {e['section']}: {e['error']}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def record_warnings(r: Results) -> None:
    """Log every warning (a kernel self-check falling back to the reference, say) and keep it
    in the results."""
    r["warnings"] = []

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message} ({Path(filename).name}:{lineno})"
        if text not in r["warnings"]:
            r["warnings"].append(text)
            log(f"warning: {text}")

    warnings.showwarning = show


def versions() -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    out: dict[str, Any] = {"date": now, "python": platform.python_version(),
                           "mlx": mx.__version__, "mlx_device": str(mx.default_device())}
    for name in ("torch", "diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # a missing package only loses its sections
            out[name] = f"unavailable ({type(e).__name__}: {e})"
    try:
        import torch

        out["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                         else platform.processor() or "cpu")
    except Exception:
        out["device"] = str(mx.default_device())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bonsai-4b"),
                        help="checkpoint folder (built if absent or stale)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sides (default 1024 512; --tiny: 128 64)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--skip", nargs="*", choices=SECTIONS, default=[])
    parser.add_argument("--repeats", type=int, default=2, help="measured runs per size")
    parser.add_argument("--json", type=Path, help="write every number here (as it goes)")
    parser.add_argument("--log", type=Path, help="also append the log here")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU check")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--deadline", type=float,
                        help="start no new section after this many seconds (for time-limited "
                             "machines; what is skipped is listed in the JSON)")
    parser.add_argument("--report", type=Path, help="print the tables of an earlier --json")
    parser.add_argument("--profile", action="store_true",
                        help="only profile: VAE parts, convolutions (MLX vs torch), and the "
                             "memory of one transformer step with and without per-block eval")
    parser.add_argument("--fixes", action="store_true",
                        help="only measure the fixes the first run points to (blocked GroupNorm "
                             "statistics, MLX_MAX_MB_PER_BUFFER=64), then rerun the benchmark "
                             "with both in a child process")
    parser.add_argument("--patch-groupnorm", action="store_true",
                        help="experiment: replace vae.GroupNorm.statistics by the blocked "
                             "reduction of this script (not a library change)")
    parser.add_argument("--step-memory", nargs=2, metavar=("VARIANT", "SIZE"),
                        help=argparse.SUPPRESS)  # one step_memory run, JSON on stdout
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    global LOG_FILE
    LOG_FILE = args.log
    sizes = args.sizes or ([128, 64] if args.tiny else [1024, 512])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _import_mlx_lm()
    cfg, te_cfg, _ = configs(args.tiny)
    if args.step_memory:
        variant, size = args.step_memory
        directory = args.cache / variant / _TRANSFORMER_DIRS[variant]
        print(json.dumps(step_memory(directory, int(size), cfg, per_block=False)))
        return 0
    r = Results(args.json)
    record_warnings(r)
    r["args"] = vars(args) | {"sizes": sizes}
    r["meta"] = versions()
    log(f"{r['meta']}")
    with r.section("matmul rate"):
        r["matmul"] = matmul_rate(256 if args.tiny else 8192)
        log(f"bf16 matmul: {r['matmul']['tflops']:.1f} TFLOP/s")
    dirs = build(args.cache, args.tiny, args.seed, r)
    r.save()
    if args.tiny:
        with r.section("converter"):
            r["converter_equals_direct"] = check_converter(dirs, args.cache)
            log(f"converter output == directly written bonsai packs: "
                f"{r['converter_equals_direct']}")
    with_diffusers = "diffusers" not in args.skip
    deadline = T_START + args.deadline if args.deadline else math.inf

    def due(name: str) -> bool:
        """Whether to start section `name`: not skipped, and there is time left."""
        if time.perf_counter() < deadline:
            return True
        log(f"-- {name}: skipped, past the --deadline")
        r.setdefault("skipped", []).append(name)
        return False

    if args.patch_groupnorm:
        patch_groupnorm()
    if args.fixes:
        with r.section("fixes"):
            fixes(dirs, sizes, args, r)
        return 1 if r["errors"] else 0
    if args.profile:
        with r.section("profile"):
            profile(dirs, cfg, sizes, args, r)
        return 1 if r["errors"] else 0
    if "parity" not in args.skip and due("parity"):
        with r.section("parity"):
            parity(dirs, cfg, max(sizes), args.seed, r, with_diffusers)
    r["timing"], r["low_memory"] = {}, {"bonsai-binary": {}}
    # Priority order: our formats and the dense ceiling, low memory, PrismML's layout, diffusers.
    first = [v for v in args.variants if not v.startswith("prism")]
    later = [v for v in args.variants if v.startswith("prism")]
    for v in first if "timing" not in args.skip else []:
        if due(f"timing {v}"):
            with r.section(f"timing {v}"):
                r["timing"][v] = time_variant(dirs[v], sizes, args.repeats)
    for size in sorted(sizes) if "low-memory" not in args.skip else []:
        if due(f"low-memory {size}"):
            with r.section(f"low-memory {size}"):
                r["low_memory"]["bonsai-binary"][str(size)] = low_memory_run(
                    dirs["bonsai-binary"], size, args.repeats)
    for v in later if "timing" not in args.skip else []:
        if due(f"timing {v}"):
            with r.section(f"timing {v}"):
                r["timing"][v] = time_variant(dirs[v], sizes, args.repeats)
    if with_diffusers and due("diffusers"):
        with r.section("diffusers"):
            r["diffusers"] = time_diffusers(dirs, cfg, te_cfg, sizes, args.repeats)
    r["floor"] = floor_table(r, cfg)
    r["targets"] = targets(r)
    r.save()
    print(report(r), flush=True)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
