"""Peak memory and time of the FLUX.2 VAE decode, untiled vs tiled, on random weights.

    python benchmarks/vae_memory.py --size 1024 --config full
    python benchmarks/vae_memory.py --size 1024 --config small --tile-size 256 --dtype bfloat16

`full` is the FLUX.2 VAE decoder (architecture.md §2.2), `small` BFL's small decoder (block
channels 96/192/384/384) that Bonsai ships. Weights are random (norm affines and BN statistics
perturbed so every part matters); the latents are noise plus smooth structure so that image
regions differ, as in real images (per-tile GroupNorm statistics would then differ too). Peak
memory is MLX's (mx.get_peak_memory, weights included) on the default device.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_bonsai.vae import VAE, VAEConfig

FULL = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "batch_norm_eps": 1e-4,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "patch_size": [2, 2],
}
CONFIGS = {"full": FULL, "small": dict(FULL, decoder_block_out_channels=[96, 192, 384, 384])}


def random_vae(name: str, dtype: mx.Dtype, seed: int) -> VAE:
    mx.random.seed(seed)
    vae = VAE(VAEConfig.from_dict(CONFIGS[name], name), with_encoder=False)
    params = []
    for key, value in tree_flatten(vae.parameters()):
        if "norm" in key and key.endswith(".weight"):
            value = 1 + 0.2 * mx.random.normal(value.shape)
        elif "norm" in key and key.endswith(".bias"):
            value = 0.2 * mx.random.normal(value.shape)
        elif key == "bn.running_mean":
            value = 0.1 * mx.random.normal(value.shape)
        elif key == "bn.running_var":
            value = mx.random.uniform(0.5, 1.5, value.shape)
        params.append((key, value.astype(dtype)))
    vae.update(tree_unflatten(params))
    mx.eval(vae.parameters())
    return vae


def structured_latents(size: int, channels: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    n = size // 16
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    field = np.stack([np.tanh((x - n / 2) / 3), np.sin(y / 5), (x + y) / n], axis=-1)
    lat = rng.standard_normal((1, n, n, channels)) + field @ rng.standard_normal((3, channels))
    return mx.array(lat.astype(np.float32))


def measure(vae: VAE, latents: mx.array, tile_size: int | None) -> tuple[mx.array, float, float]:
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    image = vae.decode(latents, tile_size=tile_size)
    mx.eval(image)
    return image, time.perf_counter() - start, mx.get_peak_memory() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (x16)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--tile-size", type=int, default=512, help="tile side in output pixels")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size % 16:
        parser.error("--size must be a multiple of 16")

    vae = random_vae(args.config, getattr(mx, args.dtype), args.seed)
    weights = mx.get_active_memory() / 2**20
    latents = structured_latents(args.size, vae.config.packed_channels, args.seed)
    measure(vae, latents[:, :2, :2], None)  # warm-up (kernel compilation)

    ref, t_ref, p_ref = measure(vae, latents, None)
    tiled, t_tiled, p_tiled = measure(vae, latents, args.tile_size)
    diff = mx.abs(tiled - ref)

    print(f"device {mx.default_device()}, {args.config} decoder, {args.size}x{args.size}, "
          f"{args.dtype}, weights {weights:.0f} MiB")
    print(f"{'decode':<16}{'time s':>9}{'peak MiB':>11}")
    print(f"{'untiled':<16}{t_ref:>9.2f}{p_ref:>11.0f}")
    print(f"{f'tiled {args.tile_size}':<16}{t_tiled:>9.2f}{p_tiled:>11.0f}")
    print(f"tiled vs untiled: MAE {float(diff.mean()) * 255:.2e}/255, "
          f"max {float(diff.max()) * 255:.2e}/255")


if __name__ == "__main__":
    main()
