"""The FLUX.2 VAE (diffusers' AutoencoderKLFlux2) in MLX, with an optional tiled decoder.

Parameter names equal diffusers' so a checkpoint loads after one `sanitize` (conv weights to
MLX's NHWC layout). Activations are NHWC throughout. The same module serves the full VAE
(encoder + decoder) and BFL's small decoder, whose config only changes the decoder's
channels (`decoder_block_out_channels`) and whose checkpoint has no encoder.

Latents at the interface are the *packed, normalised* 128-channel latents the transformer
works on, laid out NHWC as (B, h, w, 128) (token y*w + x of the transformer is pixel (y, x));
images are NHWC float in [0, 1]. Equations: shared/docs/architecture.md §5, §7 steps 7-8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .errors import BonsaiError, ConfigError, WeightsError
from .weights import cast_floats, load_into, load_safetensors_dir, read_json, require

_REQUIRED = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "batch_norm_eps",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "patch_size",
)

# Every GroupNorm of the VAE (resnets, attention, output norms) uses this epsilon in diffusers.
_GROUP_NORM_EPS = 1e-6

# Largest attention score block (queries x keys) one SDPA call may materialise (128 MiB in
# float32). MLX's fused kernels do not cover head dim 512 and the fallback builds the whole
# score matrix: 16384^2 floats (1 GiB) for a 1024^2 image. Splitting the queries is exact.
_ATTENTION_SCORES_PER_CALL = 1 << 25


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]  # the encoder's
    decoder_block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    batch_norm_eps: float
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool

    @property
    def packed_channels(self) -> int:
        """Channels of the 2x2-patchified latents the transformer sees (4 x latent_channels)."""
        return 4 * self.latent_channels

    @property
    def scale_factor(self) -> int:
        """Image pixels per VAE latent pixel (8 for FLUX.2); one packed latent pixel is 2x that."""
        return 2 ** (len(self.decoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "vae config") -> VAEConfig:
        require(config, _REQUIRED, where)

        def positive_int(name: str, value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: '{name}' must be a positive integer, got {value!r}")
            return value

        def channels(name: str) -> tuple[int, ...]:
            value = config[name]
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"{where}: '{name}' must be a non-empty list, got {value!r}")
            out = tuple(positive_int(name, c) for c in value)
            if any(c % groups for c in out):
                raise ConfigError(
                    f"{where}: every entry of '{name}' {list(out)} must be divisible by "
                    f"norm_num_groups ({groups})"
                )
            return out

        def flag(name: str) -> bool:
            if not isinstance(config[name], bool):
                raise ConfigError(f"{where}: '{name}' must be true or false, got {config[name]!r}")
            return config[name]

        groups = positive_int("norm_num_groups", config["norm_num_groups"])
        encoder_channels = channels("block_out_channels")
        if config.get("decoder_block_out_channels") is None:
            decoder_channels = encoder_channels
        else:
            decoder_channels = channels("decoder_block_out_channels")
        if len(decoder_channels) != len(encoder_channels):
            raise ConfigError(
                f"{where}: 'decoder_block_out_channels' has {len(decoder_channels)} entries and "
                f"'block_out_channels' {len(encoder_channels)}; they must have the same length"
            )
        for name, kind in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = config.get(name)
            if types is not None and list(types) != [kind] * len(encoder_channels):
                raise ConfigError(
                    f"{where}: '{name}' must be {len(encoder_channels)} x {kind}, got {types!r}"
                )
        if config.get("act_fn", "silu") != "silu":
            raise ConfigError(f"{where}: 'act_fn' must be 'silu', got {config['act_fn']!r}")
        if list(config["patch_size"]) != [2, 2]:
            raise ConfigError(
                f"{where}: 'patch_size' must be [2, 2] (FLUX.2 packs 2x2 latent patches), "
                f"got {config['patch_size']!r}"
            )
        eps = config["batch_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise ConfigError(f"{where}: 'batch_norm_eps' must be a positive number, got {eps!r}")
        return cls(
            in_channels=positive_int("in_channels", config["in_channels"]),
            out_channels=positive_int("out_channels", config["out_channels"]),
            block_out_channels=encoder_channels,
            decoder_block_out_channels=decoder_channels,
            layers_per_block=positive_int("layers_per_block", config["layers_per_block"]),
            latent_channels=positive_int("latent_channels", config["latent_channels"]),
            norm_num_groups=groups,
            batch_norm_eps=float(eps),
            use_quant_conv=flag("use_quant_conv"),
            use_post_quant_conv=flag("use_post_quant_conv"),
            mid_block_add_attention=flag("mid_block_add_attention"),
        )


# ---------------------------------------------------------------------------------------------
# Latent layout helpers (the pipeline uses these too)


def patchify(latents: mx.array) -> mx.array:
    """(B, 2h, 2w, C) -> (B, h, w, 4C): packed channel c*4 + dy*2 + dx of pixel (y, x) holds
    channel c of latent pixel (2y + dy, 2x + dx)."""
    b, hh, ww, c = latents.shape
    if hh % 2 or ww % 2:
        raise BonsaiError(f"patchify: latent height and width must be even, got {hh}x{ww}")
    x = latents.reshape(b, hh // 2, 2, ww // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, hh // 2, ww // 2, 4 * c)


def unpatchify(latents: mx.array) -> mx.array:
    """Exact inverse of `patchify`: (B, h, w, 4C) -> (B, 2h, 2w, C)."""
    b, h, w, c4 = latents.shape
    if c4 % 4:
        raise BonsaiError(f"unpatchify: packed channels must be a multiple of 4, got {c4}")
    x = latents.reshape(b, h, w, c4 // 4, 2, 2)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c4 // 4)


class LatentBatchNorm(nn.Module):
    """The checkpoint's `bn`: running statistics that (de-)normalise packed latents.

    Only the statistics are used (never updated, no affine), as the FLUX.2 pipeline does; the
    module is frozen so its buffers do not count as trainable parameters.
    """

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
        self.eps = eps
        self.freeze()

    def _std(self) -> mx.array:
        return mx.sqrt(self.running_var.astype(mx.float32) + self.eps)

    def normalize(self, latents: mx.array) -> mx.array:
        """(z - mean) / sqrt(var + eps) per packed channel (last axis), in float32."""
        return (latents.astype(mx.float32) - self.running_mean.astype(mx.float32)) / self._std()

    def denormalize(self, latents: mx.array) -> mx.array:
        """z * sqrt(var + eps) + mean per packed channel (last axis), in float32."""
        return latents.astype(mx.float32) * self._std() + self.running_mean.astype(mx.float32)


# ---------------------------------------------------------------------------------------------
# Building blocks (NHWC)


class GroupNorm(nn.Module):
    """GroupNorm over the last axis with PyTorch's grouping (contiguous channel blocks).

    Statistics are taken in float32 whatever the activation dtype (as PyTorch's kernels
    accumulate). `statistics` and `normalize` are separate so a tiled decode can normalise a
    tile with image-wide statistics instead of the tile's own (see `_TileNorms`).
    """

    def __init__(self, groups: int, channels: int):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.groups = groups

    def statistics(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Mean and (biased) variance per sample and group, each (B, groups), float32.

        Two passes (mean, then centred squares), each summed in contiguous stages: one
        reduction over the strided (pixels, channels-in-group) axes has only B x groups
        outputs, and MLX's CUDA backend ran it ~400x slower (806 ms vs 1.8 ms per norm at
        1024^2 x 128 on an H100; BENCHMARKS.md).
        """
        b, c = x.shape[0], x.shape[-1]
        xf = x.reshape(b, -1, c).astype(mx.float32)
        per_group = c // self.groups
        count = xf.shape[1] * per_group
        mean = self._group_sums(xf) / count
        centred = xf - mx.repeat(mean, per_group, axis=1)[:, None, :]
        return mean, self._group_sums(centred * centred) / count

    def _group_sums(self, a: mx.array) -> mx.array:
        """(B, N, C) -> (B, groups): sums over blocks of pixels, the blocks, then the group."""
        b, n, c = a.shape
        rows = next(r for r in (1024, 256, 64, 16, 4, 1) if n % r == 0)
        per_channel = a.reshape(b, rows, n // rows, c).sum(axis=2).sum(axis=1)
        return per_channel.reshape(b, self.groups, c // self.groups).sum(axis=-1)

    def normalize(self, x: mx.array, mean: mx.array, var: mx.array) -> mx.array:
        per_group = x.shape[-1] // self.groups
        mean = mx.repeat(mean, per_group, axis=1)[:, None, None, :]
        scale = mx.repeat(mx.rsqrt(var + _GROUP_NORM_EPS), per_group, axis=1)[:, None, None, :]
        y = (x - mean) * (scale * self.weight.astype(mx.float32)) + self.bias.astype(mx.float32)
        return y.astype(x.dtype)

    def __call__(self, x: mx.array, norms: _TileNorms | None = None) -> mx.array:
        if norms is not None:
            return norms(self, x)
        return self.normalize(x, *self.statistics(x))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, norms: _TileNorms | None = None) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x, norms)))
        h = self.conv2(nn.silu(self.norm2(h, norms)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) inputs, queries split into bounded calls."""
    scale = q.shape[-1] ** -0.5
    step = max(1, _ATTENTION_SCORES_PER_CALL // k.shape[2])
    if step >= q.shape[2]:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    parts = [
        mx.fast.scaled_dot_product_attention(q[:, :, i : i + step], k, v, scale=scale)
        for i in range(0, q.shape[2], step)
    ]
    return mx.concatenate(parts, axis=2)


class Attention(nn.Module):
    """Single-head self-attention over all positions (head dim = channels), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        n = self.group_norm(x).reshape(b, 1, h * w, c)
        out = attention(self.to_q(n), self.to_k(n), self.to_v(n))
        return x + self.to_out[0](out).reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # Asymmetric padding (right and bottom only), as the FLUX VAE was trained.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        nearest = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(nearest.reshape(b, 2 * h, 2 * w, c))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(layers)
        ]
        self.downsamplers = [Downsample2D(out_channels)] if down else []

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(layers)
        ]
        self.upsamplers = [Upsample2D(out_channels)] if up else []


class Encoder(nn.Module):
    """Image (B, H, W, 3) in [-1, 1] -> posterior moments (B, H/8, W/8, 2 x latent_channels)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, down=i < len(ch) - 1
            )
            for i in range(len(ch))
        ]
        self.mid_block = UNetMidBlock2D(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, 8h, 8w, 3) in about [-1, 1].

    `stem` (conv_in and the mid block) runs at latent resolution and holds the global
    attention; the rest runs as a list of `stages` (each resnet, upsampler, and the output
    norm + conv) so a tiled decode can cut it where activations are small.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.decoder_block_out_channels, cfg.norm_num_groups
        rev = ch[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(
                rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups, up=i < len(ch) - 1
            )
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def stem(self, z: mx.array) -> mx.array:
        return self.mid_block(self.conv_in(z))

    def output(self, x: mx.array, norms: _TileNorms | None = None) -> mx.array:
        return self.conv_out(nn.silu(self.conv_norm_out(x, norms)))

    def stages(self) -> list[_Stage]:
        stages = []
        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                before_upsample = bool(block.upsamplers) and i == len(block.resnets) - 1
                stages.append(_Stage(resnet, 1, 2, resnet.conv2.weight.shape[0], before_upsample))
            for up in block.upsamplers:
                stages.append(_Stage(lambda x, _, up=up: up(x), 2, 1, up.conv.weight.shape[0]))
        stages.append(_Stage(self.output, 1, 1, self.conv_out.weight.shape[0]))
        return stages

    def __call__(self, z: mx.array) -> mx.array:
        x = self.stem(z)
        for stage in self.stages():
            x = stage.run(x, None)
        return x


@dataclass(frozen=True)
class _Stage:
    """One step of the decoder after its stem, with what tiling needs to know about it."""

    run: Callable[[mx.array, _TileNorms | None], mx.array]
    scale: int  # output pixels per input pixel (2 for an upsampler)
    convs: int  # 3x3 convolutions, at the output resolution
    channels: int  # output channels
    block_output: bool = False  # the output of an up block, before its upsampler


# ---------------------------------------------------------------------------------------------
# Tiled decoding
#
# A tiled decode gives the untiled result (to float rounding), not an approximation of it:
#  * the stem always runs whole (its attention is global; at latent resolution it is small);
#  * the stages run in segments. A segment ends wherever its output is no larger than the
#    largest up-block output before an upsample (so the full-size upsampled activations of
#    the last blocks are never stored); its input and output are held whole, and it runs
#    window by window in between. A window is a core tile plus a halo as wide as the
#    segment's receptive field, so the core's output is exact; the cores are pasted into the
#    output (no overlap, nothing to blend).
#  * GroupNorm needs image-wide statistics. Normalising each window with its own would shift
#    colour and contrast per tile wherever the content is not uniform (the classic tiled-VAE
#    seam), and statistics pooled from such a pass are biased. So a segment's norms get their
#    statistics exactly, one sweep over the windows per norm, in order: sweep k normalises
#    norms 0..k-1 with their known image-wide statistics and records norm k's over the core
#    only (MLX evaluates only what the recorded statistics need; the rest of the graph is
#    dropped unevaluated). Cost: about 3.5x the compute of the up blocks for the FLUX.2
#    decoders (most of it in the last segment: the final block, at full resolution).


def _segments(stages: list[_Stage]) -> list[list[_Stage]]:
    sizes, resolution = [], 1
    for stage in stages:
        resolution *= stage.scale
        sizes.append(resolution * resolution * stage.channels)  # per latent pixel
    limit = max((n for n, st in zip(sizes, stages, strict=True) if st.block_output), default=0)
    segments: list[list[_Stage]] = [[]]
    for stage, size in zip(stages, sizes, strict=True):
        segments[-1].append(stage)
        if size <= limit:
            segments.append([])
    return [seg for seg in segments if seg]


def _halo(segment: list[_Stage]) -> int:
    """Input pixels on each side that an output pixel of `segment` depends on: each 3x3 conv
    reaches one pixel further at its own resolution, an upsample halves the reach."""
    reach = 0
    for stage in reversed(segment):
        reach = -(-(reach + stage.convs) // stage.scale)
    return reach


class _TileNorms:
    """GroupNorm statistics of one segment during a tiled decode (see above)."""

    def __init__(self) -> None:
        self.known: list[tuple[mx.array, mx.array]] = []
        self._parts: list[tuple[int, mx.array, mx.array]] = []
        self._call = 0
        self._core = (0, 0, 0, 0)
        self._height = 1

    def start(self, core: tuple[int, int, int, int], height: int) -> None:
        """Before running a window: `core` = (y0, y1, x0, x1) in the window's input pixels."""
        self._call = 0
        self._core = core
        self._height = height

    def recorded(self) -> list[mx.array]:
        return [a for _, mean, var in self._parts for a in (mean, var)]

    def pool(self) -> bool:
        """Merge the cores' statistics of this sweep's norm; False if the sweep found none."""
        if not self._parts:
            return False
        total = sum(n for n, _, _ in self._parts)
        mean = sum(n * m for n, m, _ in self._parts) / total
        var = sum(n * (v + mx.square(m - mean)) for n, m, v in self._parts) / total
        mx.eval(mean, var)
        self.known.append((mean, var))
        self._parts = []
        return True

    def __call__(self, norm: GroupNorm, x: mx.array) -> mx.array:
        i, self._call = self._call, self._call + 1
        if i < len(self.known):
            return norm.normalize(x, *self.known[i])
        if i == len(self.known):
            s = x.shape[1] // self._height  # pixels of this layer per input pixel
            y0, y1, x0, x1 = (s * c for c in self._core)
            self._parts.append(((y1 - y0) * (x1 - x0), *norm.statistics(x[:, y0:y1, x0:x1])))
        # Past the recorded norm the graph is never evaluated; any stand-in will do.
        return x


def _spans(length: int, core: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(core start, core end, window start, window end) of the tiles along one axis."""
    return [
        (a, min(a + core, length), max(a - halo, 0), min(a + core + halo, length))
        for a in range(0, length, core)
    ]


def _run_tiled(segment: list[_Stage], x: mx.array, core: int) -> mx.array:
    """The stages of `segment` applied to `x`, window by window (exactly; see above)."""
    h, w = x.shape[1:3]
    halo = _halo(segment)
    windows = [(ry, rx) for ry in _spans(h, core, halo) for rx in _spans(w, core, halo)]

    def run(ry: tuple[int, ...], rx: tuple[int, ...], norms: _TileNorms) -> mx.array:
        norms.start((ry[0] - ry[2], ry[1] - ry[2], rx[0] - rx[2], rx[1] - rx[2]), ry[3] - ry[2])
        y = x[:, ry[2] : ry[3], rx[2] : rx[3]]
        for stage in segment:
            y = stage.run(y, norms)
        return y

    norms = _TileNorms()
    while True:  # one sweep per GroupNorm of the segment
        for ry, rx in windows:
            run(ry, rx, norms)
            if not norms.recorded():
                break  # every norm is known
            mx.eval(norms.recorded())
        if not norms.pool():
            break

    s = math.prod(stage.scale for stage in segment)
    out = None
    for ry, rx in windows:
        y = run(ry, rx, norms)
        if out is None:
            out = mx.zeros((x.shape[0], h * s, w * s, y.shape[-1]), dtype=y.dtype)
        oy, ox = (ry[0] - ry[2]) * s, (rx[0] - rx[2]) * s
        ny, nx = (ry[1] - ry[0]) * s, (rx[1] - rx[0]) * s
        out[:, ry[0] * s : ry[1] * s, rx[0] * s : rx[1] * s] = y[:, oy : oy + ny, ox : ox + nx]
        mx.eval(out)
    return out


# ---------------------------------------------------------------------------------------------
# The model


class VAE(nn.Module):
    """AutoencoderKLFlux2: `encoder` (absent in a decoder-only checkpoint), `decoder`,
    `quant_conv`, `post_quant_conv` and the latent statistics `bn`."""

    def __init__(self, cfg: VAEConfig, with_encoder: bool = True):
        super().__init__()
        self.config = cfg
        if with_encoder:
            self.encoder = Encoder(cfg)
            if cfg.use_quant_conv:
                self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.bn = LatentBatchNorm(cfg.packed_channels, cfg.batch_norm_eps)

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    # -- encoding -----------------------------------------------------------------------------

    def encode_latents(self, x: mx.array) -> mx.array:
        """Image (B, H, W, 3) in [-1, 1] -> posterior mean (B, H/8, W/8, latent_channels)."""
        if not self.has_encoder:
            raise WeightsError(
                "this VAE checkpoint is decoder-only (no encoder.* weights); encoding images "
                "needs the full FLUX.2 VAE checkpoint"
            )
        moments = self.encoder(x.astype(self.dtype))
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        return moments[..., : self.config.latent_channels]

    def encode(self, image: mx.array) -> mx.array:
        """Image (B, H, W, 3) in [0, 1], H and W multiples of 16 -> normalised packed latents
        (B, H/16, W/16, 128), float32: the mean of the posterior, patchified, BN-normalised.
        (16 = 2 x scale_factor: other sizes for test configs with fewer blocks.)"""
        f = 2 * self.config.scale_factor
        c = self.config.in_channels
        if image.ndim != 4 or image.shape[-1] != c or image.shape[1] % f or image.shape[2] % f:
            raise BonsaiError(
                f"VAE.encode: expected an NHWC image (B, H, W, {c}) with H and W multiples of "
                f"{f}, got shape {tuple(image.shape)}"
            )
        mean = self.encode_latents(image * 2 - 1)
        return self.bn.normalize(patchify(mean))

    # -- decoding -----------------------------------------------------------------------------

    def decode_latents(self, z: mx.array) -> mx.array:
        """De-normalised, unpatchified latents (B, h, w, latent_channels) -> raw decoder output
        (B, 8h, 8w, 3), about [-1, 1], in the model dtype (diffusers' `vae.decode`)."""
        return self.decoder(self._stem_input(z))

    def decode(self, latents: mx.array, tile_size: int | None = None) -> mx.array:
        """Normalised packed latents (B, h, w, 128) -> image (B, 16h, 16w, 3) in [0, 1], float32.

        With `tile_size` (output pixels, a multiple of 8) the up blocks run in tiles of about
        that size when the image is larger, which bounds peak memory at about 3.5x their
        compute; the result equals the untiled decode to float rounding ("Tiled decoding").
        """
        c = self.config.packed_channels
        if latents.ndim != 4 or latents.shape[-1] != c:
            raise BonsaiError(
                f"VAE.decode: expected packed latents (B, h, w, {c}) in NHWC order, "
                f"got shape {tuple(latents.shape)}"
            )
        f = self.config.scale_factor
        if tile_size is not None and (type(tile_size) is not int or tile_size < f or tile_size % f):
            raise BonsaiError(
                f"VAE.decode: tile_size must be a positive multiple of {f} (output pixels), "
                f"got {tile_size!r}"
            )
        z = unpatchify(self.bn.denormalize(latents))
        if tile_size is None or tile_size >= f * max(z.shape[1:3]):
            x = self.decode_latents(z)
        else:
            x = self._decode_tiled(z, tile_size)
        return mx.clip(x.astype(mx.float32) * 0.5 + 0.5, 0.0, 1.0)

    def _stem_input(self, z: mx.array) -> mx.array:
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return z

    def _decode_tiled(self, z: mx.array, tile_size: int) -> mx.array:
        x = self.decoder.stem(self._stem_input(z))
        mx.eval(x)
        resolution = 1  # segment input pixels per latent pixel
        for segment in _segments(self.decoder.stages()):
            x = _run_tiled(segment, x, tile_size * resolution // self.config.scale_factor)
            resolution *= math.prod(stage.scale for stage in segment)
        return x


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map a diffusers checkpoint onto this module: drop BatchNorm's step counter (training
    state) and turn conv weights (out, in, kh, kw) into MLX's (out, kh, kw, in), once."""
    out = {}
    for key, value in weights.items():
        if key == "bn.num_batches_tracked":
            continue
        if value.ndim == 4:
            value = mx.contiguous(value.transpose(0, 2, 3, 1))
        out[key] = value
    return out


def load_vae(directory: str | Path, dtype: mx.Dtype = mx.bfloat16) -> VAE:
    """Build the VAE from `directory/config.json` and load its safetensors weights.

    A checkpoint without `encoder.*` weights (BFL's small decoder) loads decoder-only.
    """
    directory = Path(directory)
    cfg = VAEConfig.from_dict(read_json(directory / "config.json"), str(directory / "config.json"))
    weights = sanitize(load_safetensors_dir(directory))
    model = VAE(cfg, with_encoder=any(k.startswith("encoder.") for k in weights))
    load_into(model, cast_floats(weights, dtype), str(directory))
    mx.eval(model.parameters())
    return model
