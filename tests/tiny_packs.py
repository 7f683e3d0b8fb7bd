"""Tiny model directories in the published layouts, built from random weights.

TINY_CONFIG is architecture.md §8 config B with attention_head_dim 64 (D = 128), so every packed
linear has a multiple of 128 inputs (D = 128, FFN hidden 384, single to_out 512).

- `write_prism_transformer(root, cfg, variant, seed)`: `transformer-packed-mflux/` as PrismML
  publishes it (MLX affine, bits 1 or 2, group 128, bf16 scales/biases, dense tensors bf16),
  plus the other components of a PrismML MLX repo. Returns the dense weights the pack encodes.
- `write_dense_klein(root, cfg, seed, dtype)`: a diffusers directory (`transformer/` in two
  shards, `text_encoder/`, ..., `model_index.json`). Returns the state dict as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from tiny_text import CONFIG_Q4, write_qwen3_dense, write_qwen3_mlx4bit, write_tokenizer
from tiny_vae import write_vae

from mlx_bonsai.convert.layout import packed_layers, transformer_shapes
from mlx_bonsai.packing import GROUP_SIZE, pack_bits

TINY_CONFIG = {
    "_class_name": "Flux2Transformer2DModel",
    "_diffusers_version": "0.42.1",
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 192,  # 3 x the tiny text encoder's hidden size
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [16, 16, 16, 16],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}


def random_state(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """float32 weights in diffusers naming; norm weights near 1, linears ~ N(0, 1/in)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in transformer_shapes(cfg, "tiny").items():
        if len(shape) == 1:
            state[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return state


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round to bfloat16 and back, as float32."""
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


def _save(path: Path, tensors: dict[str, np.ndarray], dtype: mx.Dtype) -> None:
    mx.save_safetensors(str(path), {
        k: mx.array(v).astype(dtype) if v.dtype.kind == "f" else mx.array(v)
        for k, v in tensors.items()
    })


def affine_pack(w: np.ndarray, variant: str) -> tuple[np.ndarray, ...]:
    """A simple PrismML-style quantizer (not ours): per group of 128, s = bf16(mean|w|);
    ternary q = clip(round(w/s) + 1, 0, 2), scale s, bias -s; binary q = (w >= 0), scale 2s,
    bias -s. Returns (uint32 weight, scales, biases, dense w it encodes), floats as float32."""
    n_out, n_in = w.shape
    g = w.reshape(n_out, n_in // GROUP_SIZE, GROUP_SIZE)
    s = _bf16(np.abs(g).mean(axis=-1))
    if variant == "ternary":
        safe = np.where(s > 0, s, 1)[..., None]
        q = np.clip(np.rint(g / safe) + 1, 0, 2).astype(np.uint8)
        scales, biases, bits = s, -s, 2
    else:
        q = (g >= 0).astype(np.uint8)
        scales, biases, bits = 2 * s, -s, 1
    dense = scales[..., None] * q + biases[..., None]
    return (pack_bits(q.reshape(n_out, n_in), bits), scales, biases,
            dense.reshape(n_out, n_in).astype(np.float32))


# The other components of a tiny model, structurally like the real ones: Qwen3 with 28 layers so
# the default hidden-state layers (9, 18, 27) exist, and a 4-level VAE (16 pixels per token).
TEXT_ENCODER_CONFIG = dict(CONFIG_Q4, num_hidden_layers=28)
VAE_CONFIG = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=8,
    sample_size=64,
)
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


def _write_common(root: Path, te_dir: str, seed: int = 0) -> None:
    """Tokenizer, text encoder (4-bit MLX or dense by `te_dir`), VAE and scheduler."""
    write_tokenizer(root / "tokenizer")
    if te_dir.endswith("mlx-4bit"):
        write_qwen3_mlx4bit(root / te_dir, TEXT_ENCODER_CONFIG, seed)
    else:
        write_qwen3_dense(root / te_dir, TEXT_ENCODER_CONFIG, seed)
    write_vae(root / "vae", VAE_CONFIG, seed)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))


def write_prism_transformer(root: Path, cfg: dict, variant: str, seed: int) -> dict:
    """A PrismML MLX repo at `root`; returns name -> float32 dense weight the pack encodes."""
    root = Path(root)
    tdir = root / "transformer-packed-mflux"
    tdir.mkdir(parents=True)
    state = random_state(cfg, seed)
    packed = set(packed_layers(cfg))
    tensors, encoded = {}, {}
    for name, w in state.items():
        layer = name.removesuffix(".weight")
        if layer in packed:
            weight, scales, biases, encoded[name] = affine_pack(w, variant)
            tensors |= {name: weight, f"{layer}.scales": scales, f"{layer}.biases": biases}
        else:
            tensors[name] = encoded[name] = _bf16(w)
    _save(tdir / "diffusion_pytorch_model.safetensors", tensors, mx.bfloat16)
    (tdir / "config.json").write_text(json.dumps(cfg, indent=2))
    (tdir / "quantization_config.json").write_text(json.dumps({
        "bits": 2 if variant == "ternary" else 1,
        "group_size": GROUP_SIZE,
        "skip_patterns": ["x_embedder", "context_embedder", "modulation", "time_guidance_embed",
                          "norm_out", "proj_out", "norm_"],
    }))
    _write_common(root, "text_encoder-mlx-4bit")
    (root / "LICENSE").write_text("license text\n")
    return encoded


def write_dense_klein(root: Path, cfg: dict, seed: int, dtype: mx.Dtype = mx.bfloat16,
                      state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A diffusers klein directory at `root` (transformer in two shards); returns the
    transformer state as written (rounded to `dtype`, as float32)."""
    root = Path(root)
    tdir = root / "transformer"
    tdir.mkdir(parents=True)
    state = random_state(cfg, seed) if state is None else state
    written = {k: np.array(mx.array(v).astype(dtype).astype(mx.float32)) for k, v in state.items()}
    names = list(written)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        _save(tdir / f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors",
              {k: written[k] for k in part}, dtype)
    (tdir / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_common(root, "text_encoder")
    (root / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}\n')
    return written
