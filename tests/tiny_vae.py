"""Tiny random FLUX.2 VAEs written in the published diffusers layout (reusable by other tests).

`write_vae` builds a diffusers `AutoencoderKLFlux2` with random weights, makes every part of it
matter (GroupNorm affines away from 1/0, BatchNorm running statistics away from 0/1), and saves
`config.json` + `diffusion_pytorch_model.safetensors` the way the released checkpoints are laid
out. The returned torch model is the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2
from safetensors.torch import save_file

# Architecture.md §8 config B: structurally faithful tiny VAE (32 latent channels -> 128 packed).
CONFIG_B: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=8,
    sample_size=64,
)

# Like BFL's small decoder: the decoder has its own (narrower) channels.
CONFIG_SMALL_DECODER: dict[str, Any] = dict(CONFIG_B, decoder_block_out_channels=(24, 48))


def build_vae(cfg: dict[str, Any], seed: int) -> AutoencoderKLFlux2:
    """A float32 diffusers VAE with random weights and non-trivial norms and BN statistics."""
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "norm" in name and name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
        model.bn.running_mean.normal_(0.0, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.num_batches_tracked.fill_(1000)
    return model


def write_vae(
    directory: str | Path, cfg: dict[str, Any], seed: int = 0, decoder_only: bool = False
) -> AutoencoderKLFlux2:
    """Write `directory/config.json` and `directory/diffusion_pytorch_model.safetensors`.

    decoder_only mirrors BFL's small-decoder file: only `decoder.*`, `post_quant_conv.*` and
    `bn.running_mean/var` are stored (the config is the full diffusers config).
    """
    directory = Path(directory)
    model = build_vae(cfg, seed)
    model.save_pretrained(directory, safe_serialization=True)
    if decoder_only:
        stored = ("decoder.", "post_quant_conv.", "bn.running_mean", "bn.running_var")
        keep = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(stored)}
        save_file(keep, str(directory / "diffusion_pytorch_model.safetensors"))
    return model
