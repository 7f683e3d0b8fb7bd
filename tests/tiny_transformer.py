"""Tiny random FLUX.2 klein transformers saved in diffusers' layout (config + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import Flux2Transformer2DModel

# architecture.md §8 config B: every structural feature of klein 4B at toy size.
TINY = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=96,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(8, 8, 8, 8),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)


def build_transformer(config: dict | None = None, seed: int = 0) -> Flux2Transformer2DModel:
    """A diffusers transformer with random weights; norm weights perturbed so they matter."""
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**(config or TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                # Larger than the default init so every layer moves the output noticeably.
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def write_transformer(directory: Path, config: dict | None = None, seed: int = 0):
    """Save a random transformer as diffusers does; return the torch model."""
    model = build_transformer(config, seed)
    model.save_pretrained(directory, safe_serialization=True)
    return model
