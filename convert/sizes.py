"""Bytes of the 4B transformer in each format, from its shapes.

Run `python -m mlx_bonsai.convert.sizes` for the table in docs/format.md.

Ours is the exact size of `transformer-bonsai/model.safetensors` (header included) as the
converter lays it out; PrismML's is the tensor data of its MLX packs (affine weight, bf16
scales and biases, dense tensors bf16), which is what its published 965 / 1425 MB count.
"""

from __future__ import annotations

import math

from mlx_bonsai.packing import GROUP_SIZE

from .converter import output_specs
from .layout import packed_layers, transformer_shapes
from .stream import file_size

# transformer/config.json of FLUX.2 [klein] 4B (diffusers), as in every Bonsai repo.
FULL_CONFIG = {
    "_class_name": "Flux2Transformer2DModel",
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
PARTS = ("packed", "scales", "biases", "dense")


def bonsai_bytes(config: dict, variant: str) -> dict[str, int]:
    """Bytes by part of our model.safetensors, from the converter's own layout; `total` is the
    exact file size, header included."""
    shapes = transformer_shapes(config, "config")
    packed = set(packed_layers(config))
    specs = output_specs(shapes, packed, variant, "bfloat16", "bfloat16")
    parts = dict.fromkeys(PARTS, 0)
    for spec in specs:
        layer, kind = spec.name.rsplit(".", 1)
        parts["scales" if kind == "scales" else "packed" if layer in packed else "dense"] += \
            spec.nbytes
    parts["total"] = file_size(specs, {"format": "bonsai-packed", "version": "1",
                                       "variant": variant})
    return parts


def affine_bytes(config: dict, bits: int, biases: bool = True) -> dict[str, int]:
    """Tensor bytes by part of an MLX affine pack (PrismML's, with biases), bf16 floats."""
    shapes = transformer_shapes(config, "config")
    packed = set(packed_layers(config))
    parts = dict.fromkeys(PARTS, 0)
    for name, shape in shapes.items():
        n = math.prod(shape)
        if name.removesuffix(".weight") in packed:
            parts["packed"] += n * bits // 8
            parts["scales"] += n // GROUP_SIZE * 2
            parts["biases"] += n // GROUP_SIZE * 2 if biases else 0
        else:
            parts["dense"] += 2 * n
    parts["total"] = sum(parts.values())
    return parts


def table(config: dict = FULL_CONFIG) -> str:
    rows = [
        ("binary", "PrismML MLX pack (1-bit affine)", affine_bytes(config, 1)),
        ("binary", "bonsai-packed v1", bonsai_bytes(config, "binary")),
        ("ternary", "PrismML MLX pack (2-bit affine)", affine_bytes(config, 2)),
        ("ternary", "bonsai-packed v1 (base 3)", bonsai_bytes(config, "ternary")),
        ("ternary", "2-bit slots, no biases (not offered)", affine_bytes(config, 2, False)),
    ]
    lines = ["| variant | layout | packed weights | scales | biases | dense (bf16) | total |",
             "|---|---|---|---|---|---|---|"]
    for variant, layout, p in rows:
        cells = " | ".join(f"{p[k] / 1e6:,.1f} MB" for k in PARTS)
        lines.append(f"| {variant} | {layout} | {cells} | "
                     f"**{p['total'] / 1e6:,.1f} MB** ({p['total']:,} B) |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
