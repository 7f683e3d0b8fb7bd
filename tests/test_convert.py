"""The converter: exact repack of PrismML packs, quantization of dense sources, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_packs import (
    TINY_CONFIG,
    random_state,
    write_dense_klein,
    write_prism_transformer,
)

from mlx_bonsai import kernels
from mlx_bonsai.convert import convert, converter, sizes
from mlx_bonsai.convert.layout import packed_layers, transformer_shapes
from mlx_bonsai.convert.sizes import FULL_CONFIG
from mlx_bonsai.packing import fit_ternary, quantize_binary, quantize_ternary
from mlx_bonsai.transformer import Transformer, TransformerConfig, load_weights

ROOT = Path(__file__).resolve().parents[1]
PACKED = packed_layers(TINY_CONFIG)


def _bits(a: mx.array) -> np.ndarray:
    """The raw bits of a float array, for bit-for-bit comparisons."""
    return np.array(mx.view(a, {2: mx.uint16, 4: mx.uint32}[a.itemsize]))


def _unpack(out: dict, layer: str, variant: str, dtype: mx.Dtype) -> mx.array:
    unpack = kernels.unpack_binary if variant == "binary" else kernels.unpack_ternary
    return unpack(out[f"{layer}.weight"], out[f"{layer}.scales"], dtype)


def _load_output(path: Path) -> tuple[dict, dict]:
    tdir = path / "transformer-bonsai"
    return mx.load(str(tdir / "model.safetensors")), json.loads((tdir / "bonsai.json").read_text())


@pytest.mark.parametrize("config", [TINY_CONFIG, FULL_CONFIG], ids=["tiny", "4B"])
def test_layout_matches_diffusers(config):
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**{k: v for k, v in config.items() if k[0] != "_"})
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert transformer_shapes(config, "cfg") == ref
    assert len(packed_layers(config)) == 12 * config["num_layers"] + 2 * config["num_single_layers"]


def _assert_computes(lin, storage: str, encoded: dict, layers: list[str], rows: int) -> None:
    """`lin` is stored as `storage` and multiplies like the float64 concatenation of the encoded
    weights of `layers` (one layer, or the q/k/v that the loader fuses, rows in that order)."""
    assert lin.storage == storage
    w = np.concatenate([encoded[f"{name}.weight"] for name in layers]).astype(np.float64)
    x = mx.array(np.random.default_rng(0).standard_normal((rows, w.shape[1])).astype(np.float32))
    ref = np.array(x, np.float64) @ w.T
    np.testing.assert_allclose(np.array(lin(x)), ref, rtol=0, atol=5e-6 * np.abs(ref).max())


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_prism_pack_repacks_exactly(tmp_path, variant):
    encoded = write_prism_transformer(tmp_path / "src", TINY_CONFIG, variant, seed=1)
    convert(str(tmp_path / "src"), tmp_path / "out", progress=False)
    out, manifest = _load_output(tmp_path / "out")
    source = mx.load(str(tmp_path / "src/transformer-packed-mflux/diffusion_pytorch_model"
                         ".safetensors"))
    assert manifest["format"] == "bonsai-packed" and manifest["version"] == 1
    assert manifest["variant"] == variant and manifest["group_size"] == 128
    assert manifest["scale_dtype"] == "bfloat16" and manifest["packed_layers"] == PACKED
    assert manifest["source"]["format"] == "prismml-mlx"
    bits = 1 if variant == "binary" else 2
    for layer in PACKED:
        src = [source[f"{layer}.{p}"] for p in ("weight", "scales", "biases")]
        assert out[f"{layer}.scales"].dtype == mx.bfloat16
        for dtype in (mx.float32, mx.bfloat16):
            # MLX's own reading of the source pack, in the same dtype, bit for bit.
            ref = mx.dequantize(src[0], src[1].astype(dtype), src[2].astype(dtype),
                                group_size=128, bits=bits)
            np.testing.assert_array_equal(_bits(_unpack(out, layer, variant, dtype)), _bits(ref))
        # ...and the builder wrote the weights it meant to.
        np.testing.assert_array_equal(np.array(ref.astype(mx.float32)), encoded[f"{layer}.weight"])
    for name in transformer_shapes(TINY_CONFIG, "cfg"):
        if name.removesuffix(".weight") not in PACKED:
            np.testing.assert_array_equal(_bits(out[name]), _bits(source[name]))
    assert len(out) == len(source) - len(PACKED)  # the biases are gone
    for rel in ("tokenizer/tokenizer.json", "vae/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json", "text_encoder-mlx-4bit/model.safetensors",
                "LICENSE", "transformer-bonsai/config.json"):
        src_rel = rel.replace("transformer-bonsai", "transformer-packed-mflux")
        assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "src" / src_rel).read_bytes()
    assert not (tmp_path / "out" / "transformer-packed-mflux").exists()

    # The whole output loads strictly through the model's loading path and runs; the fused
    # q/k/v linear multiplies the three packed layers' rows in order.
    model = Transformer(TransformerConfig.from_dict(TINY_CONFIG))
    load_weights(model, out, "out", dtype=mx.float32)
    _assert_computes(model.single_transformer_blocks[1].attn.to_out, variant, encoded,
                     ["single_transformer_blocks.1.attn.to_out"], rows=3)
    _assert_computes(model.transformer_blocks[1].attn.to_qkv, variant, encoded,
                     [f"transformer_blocks.1.attn.to_{p}" for p in "qkv"], rows=3)


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_prism_pack_loads_as_affine(tmp_path, variant):
    """The published pack itself also loads into quant.Linear (affine storage)."""
    encoded = write_prism_transformer(tmp_path / "src", TINY_CONFIG, variant, seed=2)
    tdir = tmp_path / "src/transformer-packed-mflux"
    weights = mx.load(str(tdir / "diffusion_pytorch_model.safetensors"))
    qcfg = json.loads((tdir / "quantization_config.json").read_text())
    model = Transformer(TransformerConfig.from_dict(TINY_CONFIG))
    load_weights(model, weights, str(tdir), qcfg, dtype=mx.float32)
    _assert_computes(model.transformer_blocks[0].ff.linear_out, "affine", encoded,
                     ["transformer_blocks.0.ff.linear_out"], rows=5)
    _assert_computes(model.transformer_blocks[0].attn.add_qkv_proj, "affine", encoded,
                     [f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"], rows=5)


@pytest.mark.parametrize("variant", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_dense_source_is_quantized_by_the_rules(tmp_path, variant, dtype, monkeypatch):
    # Small chunks, so layers are split across several chunks as full-size layers are.
    monkeypatch.setattr(converter, "_CHUNK_WEIGHTS", 50_000)
    written = write_dense_klein(tmp_path / "src", TINY_CONFIG, seed=3, dtype=dtype)
    name = "float16" if dtype == mx.float16 else "bfloat16"
    convert(str(tmp_path / "src"), tmp_path / "out", variant=variant, dense_dtype=name,
            progress=False)
    out, manifest = _load_output(tmp_path / "out")
    assert manifest["source"]["format"] == "diffusers" and manifest["scale_dtype"] == name
    quantize = quantize_binary if variant == "binary" else quantize_ternary
    for layer in PACKED:
        weight, scales = quantize(written[f"{layer}.weight"], name)
        np.testing.assert_array_equal(np.array(out[f"{layer}.weight"]), weight)
        assert out[f"{layer}.scales"].dtype == dtype
        np.testing.assert_array_equal(np.array(out[f"{layer}.scales"].astype(mx.float32)), scales)
    for key, w in written.items():
        if key.removesuffix(".weight") not in PACKED:
            assert out[key].dtype == dtype
            np.testing.assert_array_equal(np.array(out[key].astype(mx.float32)), w)
    assert (tmp_path / "out/model_index.json").is_file()
    assert (tmp_path / "out/text_encoder/model.safetensors").is_file()


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_unpacked_bonsai_weights_requantize_exactly(tmp_path, variant):
    """A dense export of a Bonsai pack (PrismML's `-unpacked`) quantizes back to the same
    weights: each group already is s*t, and that is its own least-squares optimum."""
    encoded = write_prism_transformer(tmp_path / "pack", TINY_CONFIG, variant, seed=4)
    write_dense_klein(tmp_path / "src", TINY_CONFIG, seed=0, dtype=mx.float16, state=encoded)
    convert(str(tmp_path / "src"), tmp_path / "out", variant=variant, progress=False)
    out, _ = _load_output(tmp_path / "out")
    for layer in PACKED:
        np.testing.assert_array_equal(np.array(_unpack(out, layer, variant, mx.float32)),
                                      encoded[f"{layer}.weight"])


def test_quantization_error_is_optimal_per_group(tmp_path):
    """Converter output vs the fit's float64 optimum: only the scale rounding differs."""
    state = random_state(TINY_CONFIG, seed=5)
    written = write_dense_klein(tmp_path / "src", TINY_CONFIG, seed=0, state=state)
    convert(str(tmp_path / "src"), tmp_path / "out", variant="ternary", progress=False)
    out, _ = _load_output(tmp_path / "out")
    layer = "transformer_blocks.1.ff.linear_in"
    w = written[f"{layer}.weight"].astype(np.float64)
    g = w.reshape(w.shape[0], -1, 128)
    t, s = fit_ternary(g)
    best = ((g - s[..., None] * t) ** 2).sum(-1)
    got = ((g - np.array(_unpack(out, layer, "ternary", mx.float32), np.float64)
            .reshape(g.shape)) ** 2).sum(-1)
    k = np.abs(t).sum(-1)
    # Rounding s to bf16 (|ds| <= 2^-8 s: 8 significant bits) adds k*ds^2 to the error,
    # a quadratic in s at its minimum.
    assert (got >= best - 1e-12).all()
    assert (got - best <= k * (s * 2.0**-8) ** 2 + 1e-12).all()


# --- CLI -----------------------------------------------------------------------------------

def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlx_bonsai.convert", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd)


def _assert_refused(result, match):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    # The progress bar may have drawn before; the error is the one last line.
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and match in lines[-1], result.stderr
    assert sum(line.startswith("Error") for line in lines) == 1


def test_cli_bad_inputs(tmp_path):
    write_prism_transformer(tmp_path / "bin", TINY_CONFIG, "binary", seed=6)
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    broken = tmp_path / "broken"
    write_prism_transformer(broken, TINY_CONFIG, "ternary", seed=7)
    f = broken / "transformer-packed-mflux/diffusion_pytorch_model.safetensors"
    tensors = mx.load(str(f))
    del tensors["single_transformer_blocks.1.attn.to_out.biases"]
    mx.save_safetensors(str(f), tensors)
    write_dense_klein(tmp_path / "dense", TINY_CONFIG, seed=8)

    cases = [
        (("empty", "o1"), "unknown source layout"),
        (("nowhere/at/all", "o2"), "no such directory"),
        (("bin", "o3", "--variant", "ternary"), "binary pack (bits=1)"),
        (("broken", "o4"), "'single_transformer_blocks.1.attn.to_out.biases' is missing"),
        (("dense", "o5"), "needs --variant"),
        (("bin", "full"), "exists and is not empty; pass --overwrite"),
    ]
    for args, match in cases:
        _assert_refused(_cli(*args, cwd=tmp_path), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "broken", "dense", "empty",
                                                         "full"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"

    result = _cli("bin", "full", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "full" / "keep.txt").exists()
    assert (tmp_path / "full/transformer-bonsai/model.safetensors").is_file()


def test_missing_dense_tensor_is_refused(tmp_path):
    write_dense_klein(tmp_path / "dense", TINY_CONFIG, seed=9)
    shard = sorted((tmp_path / "dense/transformer").glob("*.safetensors"))[0]
    tensors = mx.load(str(shard))
    del tensors["x_embedder.weight"]
    mx.save_safetensors(str(shard), tensors)
    with pytest.raises(converter.WeightsError, match="'x_embedder.weight' is missing"):
        convert(str(tmp_path / "dense"), tmp_path / "out", variant="binary", progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_no_output(tmp_path):
    """A source that goes bad late (a ternary pack whose last layer is not ternary) fails
    after most of the file is written: nothing appears at OUTPUT, an old OUTPUT survives,
    and no partial directory is left behind."""
    src = tmp_path / "src"
    write_prism_transformer(src, TINY_CONFIG, "ternary", seed=10)
    f = src / "transformer-packed-mflux/diffusion_pytorch_model.safetensors"
    tensors = mx.load(str(f))
    last = PACKED[-1]
    tensors[f"{last}.biases"] = tensors[f"{last}.biases"] * 1.5
    mx.save_safetensors(str(f), tensors)

    _assert_refused(_cli(src, tmp_path / "new"), f"layer '{last}': biases are not -scales")
    assert not (tmp_path / "new").exists()

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.txt").write_text("previous model")
    _assert_refused(_cli(src, tmp_path / "old", "--overwrite"), "biases are not -scales")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["model.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "src"]


def test_interrupt_leaves_no_output(tmp_path, monkeypatch):
    write_prism_transformer(tmp_path / "src", TINY_CONFIG, "binary", seed=11)
    calls = []
    real = converter._pack_layer

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(converter, "_pack_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_must_not_replace_source(tmp_path):
    write_prism_transformer(tmp_path / "src", TINY_CONFIG, "binary", seed=12)
    with pytest.raises(converter.ConfigError, match="would replace the source"):
        convert(str(tmp_path / "src"), tmp_path / "src", overwrite=True, progress=False)
    with pytest.raises(converter.ConfigError, match="would replace the source"):
        convert(str(tmp_path / "src"), tmp_path, overwrite=True, progress=False)


# --- sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_size_formulas_match_real_files(tmp_path, variant):
    write_prism_transformer(tmp_path / "src", TINY_CONFIG, variant, seed=13)
    convert(str(tmp_path / "src"), tmp_path / "out", progress=False)
    ours = tmp_path / "out/transformer-bonsai/model.safetensors"
    assert sizes.bonsai_bytes(TINY_CONFIG, variant)["total"] == ours.stat().st_size
    pack = mx.load(str(tmp_path / "src/transformer-packed-mflux/"
                       "diffusion_pytorch_model.safetensors"))
    bits = 1 if variant == "binary" else 2
    assert sizes.affine_bytes(TINY_CONFIG, bits)["total"] == sum(v.nbytes for v in pack.values())


def test_4b_sizes_meet_the_goals():
    # PrismML's published transformer sizes (checkpoints.md §4) come out of the same shapes.
    assert round(sizes.affine_bytes(FULL_CONFIG, 1)["total"] / 1e6) == 965
    assert round(sizes.affine_bytes(FULL_CONFIG, 2)["total"] / 1e6) == 1425
    assert sizes.bonsai_bytes(FULL_CONFIG, "binary")["total"] <= 0.93e9
    assert sizes.bonsai_bytes(FULL_CONFIG, "ternary")["total"] <= 1.21e9
