"""The FLUX.2 transformer's tensors as a checkpoint holds them, derived from its diffusers config.

The converter needs the full list up front: to refuse a source with missing or extra tensors
before writing anything, to lay out the output file's header, and to know which linears are
packed (the 12 per double block and 2 per single block that PrismML packs; everything else,
embedders, modulations, norm_out, proj_out and the QK norms, stays dense).
"""

from __future__ import annotations

from typing import Any

from mlx_bonsai.weights import require

DOUBLE_BLOCK_PACKED = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
)
SINGLE_BLOCK_PACKED = ("attn.to_qkv_mlp_proj", "attn.to_out")

REQUIRED_FIELDS = (
    "num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
    "joint_attention_dim", "in_channels",
)


def transformer_shapes(config: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every transformer tensor, in diffusers' order (Linear weights [out, in]).

    Optional fields take diffusers' defaults (out_channels = in_channels, patch_size 1,
    mlp_ratio 3, timestep_guidance_channels 256, guidance_embeds true).
    """
    require(config, REQUIRED_FIELDS, where)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    head = config["attention_head_dim"]
    hidden = int(d * config.get("mlp_ratio", 3.0))
    channels = config.get("timestep_guidance_channels", 256)
    patch = config.get("patch_size", 1)
    out_channels = config.get("out_channels") or config["in_channels"]

    shapes: dict[str, tuple[int, ...]] = {}
    embedders = ["timestep_embedder"]
    if config.get("guidance_embeds", True):
        embedders.append("guidance_embedder")
    for e in embedders:
        shapes[f"time_guidance_embed.{e}.linear_1.weight"] = (d, channels)
        shapes[f"time_guidance_embed.{e}.linear_2.weight"] = (d, d)
    shapes["double_stream_modulation_img.linear.weight"] = (6 * d, d)
    shapes["double_stream_modulation_txt.linear.weight"] = (6 * d, d)
    shapes["single_stream_modulation.linear.weight"] = (3 * d, d)
    shapes["x_embedder.weight"] = (d, config["in_channels"])
    shapes["context_embedder.weight"] = (d, config["joint_attention_dim"])
    for i in range(config["num_layers"]):
        p = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v"):
            shapes[f"{p}.attn.{name}.weight"] = (d, d)
        shapes[f"{p}.attn.norm_q.weight"] = (head,)
        shapes[f"{p}.attn.norm_k.weight"] = (head,)
        shapes[f"{p}.attn.to_out.0.weight"] = (d, d)
        shapes[f"{p}.attn.norm_added_q.weight"] = (head,)
        shapes[f"{p}.attn.norm_added_k.weight"] = (head,)
        for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            shapes[f"{p}.attn.{name}.weight"] = (d, d)
        for ff in ("ff", "ff_context"):
            shapes[f"{p}.{ff}.linear_in.weight"] = (2 * hidden, d)
            shapes[f"{p}.{ff}.linear_out.weight"] = (d, hidden)
    for i in range(config["num_single_layers"]):
        p = f"single_transformer_blocks.{i}.attn"
        shapes[f"{p}.to_qkv_mlp_proj.weight"] = (3 * d + 2 * hidden, d)
        shapes[f"{p}.norm_q.weight"] = (head,)
        shapes[f"{p}.norm_k.weight"] = (head,)
        shapes[f"{p}.to_out.weight"] = (d, d + hidden)
    shapes["norm_out.linear.weight"] = (2 * d, d)
    shapes["proj_out.weight"] = (patch * patch * out_channels, d)
    return shapes


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
