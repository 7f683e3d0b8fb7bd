"""Convert a FLUX.2 klein / Bonsai model directory to bonsai-packed v1 (docs/format.md).

Two sources:
- a PrismML MLX pack (`transformer-packed-mflux/`): the 100 affine-packed linears are repacked
  exactly (the variant follows from their bits);
- a dense diffusers directory (`transformer/`, BFL bf16 or PrismML `-unpacked` fp16): the same
  100 linears are quantized by the least-squares rules of `mlx_bonsai.packing`.
Everything else in the transformer stays dense, as in PrismML's packs. The output is a complete
model directory: `transformer-bonsai/` plus copies of the other components of the source.

The source is read lazily and converted tensor by tensor into a safetensors file whose header
is written first, so at most one source tensor (and a few chunks derived from it) is in memory.
All output goes to a hidden directory beside OUTPUT that is renamed into place at the very end.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_bonsai.errors import ConfigError, WeightsError
from mlx_bonsai.packing import (
    GROUP_SIZE,
    SCALE_DTYPES,
    TERNARY_GROUP_BYTES,
    quantize_binary,
    quantize_ternary,
    repack_affine,
)
from mlx_bonsai.weights import load_safetensors_dir, read_json

from .layout import packed_layers, transformer_shapes
from .stream import SafetensorsWriter, TensorSpec, dtype_name

VARIANTS = ("binary", "ternary")
PRISM_TRANSFORMER = "transformer-packed-mflux"
DENSE_TRANSFORMER = "transformer"
OUTPUT_TRANSFORMER = "transformer-bonsai"
COMPONENTS = (
    "text_encoder-mlx-4bit", "text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"
)
LICENSE_GLOBS = ("LICENSE*", "NOTICE*")
DOWNLOAD_PATTERNS = [f"{PRISM_TRANSFORMER}/*", f"{DENSE_TRANSFORMER}/*", "model_index.json",
                     *(f"{c}/*" for c in COMPONENTS[:-1]), *LICENSE_GLOBS]
_BITS_VARIANT = {1: "binary", 2: "ternary"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Rows quantized at once: about 2**20 weights, so the float64 work arrays stay near 50 MB.
_CHUNK_WEIGHTS = 1 << 20


@dataclass
class Source:
    root: Path
    kind: str  # "prismml-mlx" or "diffusers"
    transformer: Path
    config: dict[str, Any]
    bits: int | None  # PrismML packs only


def resolve_source(source: str) -> Path:
    """A local directory as it is; an `owner/name` that is not one is fetched from the Hub."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{source}: the source must be a model directory, not a file")
        return path
    if not _REPO_ID.fullmatch(source):
        raise ConfigError(f"{source}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=source, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # the hub raises many types (offline, 404, auth); report them alike
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{source}: not a local directory, and downloading it from the Hugging Face Hub "
            f"failed ({reason})"
        ) from None


def detect_source(root: Path) -> Source:
    """Which layout `root` has: PrismML MLX pack or dense diffusers directory."""
    prism, dense = root / PRISM_TRANSFORMER, root / DENSE_TRANSFORMER
    if prism.is_dir():
        qpath = prism / "quantization_config.json"
        q = read_json(qpath)
        bits, group = q.get("bits"), q.get("group_size")
        if bits not in _BITS_VARIANT or group != GROUP_SIZE:
            raise ConfigError(f"{qpath}: bits={bits}, group_size={group}; a Bonsai pack has bits "
                              f"1 (binary) or 2 (ternary) and group_size {GROUP_SIZE}")
        return Source(root, "prismml-mlx", prism, read_json(prism / "config.json"), bits)
    if dense.is_dir():
        return Source(root, "diffusers", dense, read_json(dense / "config.json"), None)
    raise ConfigError(f"{root}: unknown source layout; expected a PrismML MLX pack "
                      f"({PRISM_TRANSFORMER}/) or a diffusers directory ({DENSE_TRANSFORMER}/)")


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output}: exists and is not empty; pass --overwrite to replace it")


def _variant_for(src: Source, variant: str | None) -> str:
    if src.kind == "diffusers":
        if variant is None:
            raise ConfigError(f"{src.root}: a dense source needs --variant binary or ternary")
        return variant
    packed = _BITS_VARIANT[src.bits]
    if variant is not None and variant != packed:
        raise ConfigError(
            f"{src.root}: this is a {packed} pack (bits={src.bits}) and converts exactly only "
            f"to {packed}; pass --variant {packed} or leave it out"
        )
    return packed


def _check_tensors(src: Source, tensors: dict[str, mx.array],
                   shapes: dict[str, tuple[int, ...]], packed: list[str]) -> str | None:
    """Refuse missing, extra or misshapen source tensors; returns a pack's scale dtype."""
    where = str(src.transformer)
    # name -> (required dtype, or None for any float dtype; shape)
    want: dict[str, tuple[str | None, tuple[int, ...]]] = {
        name: (None, shape) for name, shape in shapes.items()
    }
    if src.kind == "prismml-mlx":
        for layer in packed:
            if f"{layer}.weight" in tensors and f"{layer}.scales" not in tensors:
                raise WeightsError(f"{where}: layer '{layer}' is not packed in the source")
            n_out, n_in = shapes[f"{layer}.weight"]
            want[f"{layer}.weight"] = ("uint32", (n_out, n_in * src.bits // 32))
            want[f"{layer}.scales"] = want[f"{layer}.biases"] = (None, (n_out, n_in // GROUP_SIZE))
    missing = [name for name in want if name not in tensors]
    if missing:
        raise WeightsError(f"{where}: tensor '{missing[0]}' is missing from the source "
                           f"({len(missing)} missing)")
    extra = [name for name in tensors if name not in want]
    if extra:
        raise WeightsError(f"{where}: unexpected tensor '{extra[0]}' in the source")
    for name, (dtype, shape) in want.items():
        t = tensors[name]
        got = dtype_name(t.dtype)
        dtype_ok = got == dtype if dtype else mx.issubdtype(t.dtype, mx.floating)
        if not dtype_ok or tuple(t.shape) != shape:
            hint = f" ({src.bits}-bit as quantization_config.json says)" if dtype else ""
            raise WeightsError(f"{where}: '{name}' is {got} {tuple(t.shape)}, expected "
                               f"{dtype or 'float'} {shape}{hint}")
    if src.kind == "diffusers":
        return None
    scale_dtypes = {dtype_name(tensors[f"{layer}.{part}"].dtype)
                    for layer in packed for part in ("scales", "biases")}
    if len(scale_dtypes) != 1 or not scale_dtypes <= set(SCALE_DTYPES):
        raise WeightsError(f"{where}: packed scales/biases are {sorted(scale_dtypes)}, expected "
                           f"one of {SCALE_DTYPES} throughout")
    return scale_dtypes.pop()


def output_specs(shapes: dict[str, tuple[int, ...]], packed: set[str], variant: str,
                  scale_dtype: str, dense_dtype: str) -> list[TensorSpec]:
    specs = []
    for name, shape in shapes.items():
        layer = name.removesuffix(".weight")
        if layer not in packed:
            specs.append(TensorSpec(name, dense_dtype, shape))
            continue
        n_out, n_in = shape
        if variant == "binary":
            specs.append(TensorSpec(name, "uint32", (n_out, n_in // 32)))
        else:
            specs.append(TensorSpec(name, "uint8", (n_out, n_in // GROUP_SIZE *
                                                    TERNARY_GROUP_BYTES)))
        specs.append(TensorSpec(f"{layer}.scales", scale_dtype, (n_out, n_in // GROUP_SIZE)))
    return specs


def _row_chunks(n_rows: int, n_cols: int) -> list[slice]:
    step = max(1, _CHUNK_WEIGHTS // n_cols)
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _as_float32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _pack_layer(src: Source, tensors: dict[str, mx.array], layer: str, variant: str,
                scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """One packed linear: pops its source tensors, returns (weight, float32 scales)."""
    weight = tensors.pop(f"{layer}.weight")
    if src.kind == "prismml-mlx":
        scales, biases = tensors.pop(f"{layer}.scales"), tensors.pop(f"{layer}.biases")
        where = f"{src.transformer}: layer '{layer}'"
        parts = [repack_affine(np.array(weight[r]), _as_float32(scales[r]),
                               _as_float32(biases[r]), src.bits, where)
                 for r in _row_chunks(*weight.shape)]
    else:
        quantize = quantize_binary if variant == "binary" else quantize_ternary
        parts = [quantize(_as_float32(weight[r]), scale_dtype)
                 for r in _row_chunks(*weight.shape)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _write_tensors(writer: SafetensorsWriter, src: Source, tensors: dict[str, mx.array],
                   names: list[str], packed: set[str], variant: str, scale_dtype: str,
                   dense_dtype: str, progress: bool) -> None:
    """Convert and write the tensors in `names` order, dropping each source tensor once done."""
    for name in tqdm(names, desc=f"{variant} {OUTPUT_TRANSFORMER}", unit="tensor",
                     disable=not progress):
        layer = name.removesuffix(".weight")
        if layer in packed:
            weight, scales = _pack_layer(src, tensors, layer, variant, scale_dtype)
            writer.write(name, weight)
            writer.write(f"{layer}.scales", mx.array(scales).astype(getattr(mx, scale_dtype)))
        else:
            writer.write(name, tensors.pop(name).astype(getattr(mx, dense_dtype)))
        mx.clear_cache()  # MLX keeps freed buffers for reuse; this tensor's are done


def _copy_components(root: Path, dest: Path) -> list[str]:
    copied = []
    names = list(COMPONENTS) + sorted(
        {p.name for g in LICENSE_GLOBS for p in root.glob(g) if p.is_file()}
    )
    for name in names:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, dest / name)
        elif path.is_file():
            shutil.copy2(path, dest / name)
        else:
            continue
        copied.append(name)
    return copied


def _publish(tmp: Path, output: Path) -> None:
    """Move the finished `tmp` to `output`, replacing what is there only now."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old)
    else:
        tmp.rename(output)


def convert(source: str, output: str | Path, variant: str | None = None,
            dense_dtype: str = "bfloat16", overwrite: bool = False,
            progress: bool = True) -> Path:
    """Convert `source` (directory or Hub repo id) into a bonsai-packed model at `output`.

    For a PrismML pack the scales keep their stored dtype (exact); for a dense source they are
    rounded to `dense_dtype`. Dense tensors are written in `dense_dtype`. Returns the output
    path; raises BonsaiError on bad input, leaving no output behind.
    """
    if variant not in (None, *VARIANTS):
        raise ConfigError(f"variant must be one of {VARIANTS}, not {variant!r}")
    if dense_dtype not in SCALE_DTYPES:
        raise ConfigError(f"dense dtype must be one of {SCALE_DTYPES}, not {dense_dtype!r}")
    output = Path(output).expanduser().resolve()  # absolute, so "." has a name and a parent
    check_output(output, overwrite)
    root = resolve_source(source)
    if output == root.resolve() or output in root.resolve().parents:
        raise ConfigError(f"{output}: the output would replace the source {root}")
    src = detect_source(root)
    variant = _variant_for(src, variant)
    shapes = transformer_shapes(src.config, str(src.transformer / "config.json"))
    layers = packed_layers(src.config)
    packed = set(layers)
    for layer in layers:
        if shapes[f"{layer}.weight"][1] % GROUP_SIZE:
            raise ConfigError(f"{src.transformer / 'config.json'}: layer '{layer}' has "
                              f"{shapes[f'{layer}.weight'][1]} inputs, not a multiple of "
                              f"{GROUP_SIZE}")
    tensors = load_safetensors_dir(src.transformer)
    scale_dtype = _check_tensors(src, tensors, shapes, layers) or dense_dtype
    specs = output_specs(shapes, packed, variant, scale_dtype, dense_dtype)
    manifest = {
        "format": "bonsai-packed",
        "version": 1,
        "variant": variant,
        "group_size": GROUP_SIZE,
        "scale_dtype": scale_dtype,
        "dense_dtype": dense_dtype,
        "packed_layers": layers,
        "source": {
            "path": source,
            "format": src.kind,
            "method": "exact repack" if src.kind == "prismml-mlx" else "least-squares quantization",
        },
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        out_dir = tmp / OUTPUT_TRANSFORMER
        out_dir.mkdir()
        shutil.copy2(src.transformer / "config.json", out_dir / "config.json")
        metadata = {"format": "bonsai-packed", "version": "1", "variant": variant}
        with SafetensorsWriter(out_dir / "model.safetensors", specs, metadata) as writer:
            _write_tensors(writer, src, tensors, list(shapes), packed, variant, scale_dtype,
                           dense_dtype, progress)
        manifest["components"] = _copy_components(root, tmp)
        (out_dir / "bonsai.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
