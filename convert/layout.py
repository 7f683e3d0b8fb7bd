"""The FLUX.2 transformer's tensors as a checkpoint holds them, derived from its diffusers config.

The converter needs the full list up front: to refuse a source with missing or extra tensors
before writing anything, to lay out the output file's header, and to know which linears are
packed (the 12 per double block and 2 per single block that PrismML packs; everything else,
embedders, modulations, norm_out, proj_out and the QK norms, stays dense).
"""

from __future__ import annotations

from typing import Any

from mlx_bonsai.transformer import TransformerConfig, checkpoint_shapes

DOUBLE_BLOCK_PACKED = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
)
SINGLE_BLOCK_PACKED = ("attn.to_qkv_mlp_proj", "attn.to_out")


def transformer_shapes(config: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every transformer tensor (Linear weights [out, in]) as a checkpoint holds
    it, derived from the MLX model that the config builds (`transformer.checkpoint_shapes`), so the
    converter and the loader cannot disagree."""
    return checkpoint_shapes(TransformerConfig.from_dict(config, where))


def packed_layers(config: dict[str, Any]) -> list[str]:
    """The layers (names without `.weight`) that the packed formats quantize."""
    names = [
        f"transformer_blocks.{i}.{n}" for i in range(config["num_layers"])
        for n in DOUBLE_BLOCK_PACKED
    ]
    names += [
        f"single_transformer_blocks.{i}.{n}" for i in range(config["num_single_layers"])
        for n in SINGLE_BLOCK_PACKED
    ]
    return names
