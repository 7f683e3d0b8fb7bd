"""The FLUX.2 [klein] diffusion transformer (diffusers' Flux2Transformer2DModel) in MLX.

Parameter names equal diffusers' so a checkpoint loads as it is. Every projection is a
`quant.Linear`: whether a weight is dense, MLX-affine packed or bonsai-packed is decided at
load time and never seen here. Equations: shared/docs/architecture.md §3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import quant
from .errors import ConfigError, WeightsError
from .weights import cast_floats, load_into, load_safetensors_dir, read_json, require

_REQUIRED = (
    "in_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
)


@dataclass(frozen=True)
class TransformerConfig:
    in_channels: int
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    out_channels: int
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @classmethod
    def from_dict(
        cls, config: dict[str, Any], where: str = "transformer config"
    ) -> TransformerConfig:
        require(config, _REQUIRED, where)
        ints = {k: config[k] for k in _REQUIRED}
        out_channels = config.get("out_channels") or config["in_channels"]
        ints["out_channels"] = out_channels
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"{where}: '{name}' must be a non-negative integer, got {value!r}"
                )
        for name in ("in_channels", "attention_head_dim", "num_attention_heads", "out_channels"):
            if ints[name] == 0:
                raise ConfigError(f"{where}: '{name}' must be positive")
        if config.get("patch_size", 1) != 1:
            raise ConfigError(f"{where}: patch_size must be 1 (tokens are pre-patchified latents)")
        if config.get("guidance_embeds", False):
            raise ConfigError(
                f"{where}: guidance_embeds is true; only guidance-distilled FLUX.2 klein "
                "(guidance_embeds false) is supported"
            )
        axes = tuple(config.get("axes_dims_rope", (32, 32, 32, 32)))
        if any(not isinstance(a, int) or a <= 0 or a % 2 for a in axes):
            raise ConfigError(f"{where}: axes_dims_rope must be positive even integers, got {axes}")
        if sum(axes) != ints["attention_head_dim"]:
            raise ConfigError(
                f"{where}: axes_dims_rope {list(axes)} sums to {sum(axes)}, "
                f"but attention_head_dim is {ints['attention_head_dim']}"
            )
        channels = config.get("timestep_guidance_channels", 256)
        if not isinstance(channels, int) or channels <= 0 or channels % 2:
            raise ConfigError(
                f"{where}: timestep_guidance_channels must be a positive even integer"
            )
        mlp_ratio = float(config.get("mlp_ratio", 3.0))
        if mlp_ratio <= 0:
            raise ConfigError(f"{where}: mlp_ratio must be positive")
        return cls(
            **ints,
            timestep_guidance_channels=channels,
            mlp_ratio=mlp_ratio,
            axes_dims_rope=axes,
            rope_theta=float(config.get("rope_theta", 2000.0)),
            eps=float(config.get("eps", 1e-6)),
        )


# ---------------------------------------------------------------------------------------------
# Positions, RoPE tables and latent packing (host-side, once per image size)


def text_ids(length: int) -> np.ndarray:
    """Position ids (t, h, w, l) = (0, 0, 0, j) of `length` text tokens."""
    ids = np.zeros((length, 4), dtype=np.int32)
    ids[:, 3] = np.arange(length)
    return ids


def image_ids(height: int, width: int) -> np.ndarray:
    """Position ids (0, y, x, 0) of a height x width token grid, row-major."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = np.zeros((height * width, 4), dtype=np.int32)
    ids[:, 1] = y.reshape(-1)
    ids[:, 2] = x.reshape(-1)
    return ids


def rope_tables(
    ids: np.ndarray, axes_dims: tuple[int, ...], theta: float
) -> tuple[mx.array, mx.array]:
    """cos, sin tables (N, head_dim) in float32 for interleaved-pair rotation.

    Frequencies and angles are computed in float64 (as diffusers does on CPU/CUDA), then each
    value is repeated for the two elements of its pair.
    """
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(ids[:, axis].astype(np.float64), freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return (
        mx.array(np.concatenate(cos, axis=1).astype(np.float32)),
        mx.array(np.concatenate(sin, axis=1).astype(np.float32)),
    )


def pack_latents(latents: mx.array) -> mx.array:
    """(B, C, h, w) latents -> (B, h*w, C) tokens, row-major."""
    b, c, h, w = latents.shape
    return latents.transpose(0, 2, 3, 1).reshape(b, h * w, c)


def unpack_latents(tokens: mx.array, height: int, width: int) -> mx.array:
    """(B, h*w, C) tokens -> (B, C, h, w) latents."""
    b, _, c = tokens.shape
    return tokens.reshape(b, height, width, c).transpose(0, 3, 1, 2)


# The elementwise chains below are compiled: MLX fuses each into one kernel, so their float32
# and bf16 temporaries are never written out (12-18% off a dense step, BENCHMARKS.md), and the
# fused kernel rounds to bf16 once instead of after every operation. They are pure functions of
# their arguments; MLX traces them once per shape and dtype.


@mx.compile
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (2j, 2j+1) of x (B, H, S, D) in float32; result in x's dtype:
    (a, b) -> (a cos - b sin, b cos + a sin).

    Only views and elementwise operations (the swapped pair is a reversed-stride view), so MLX
    fuses it all into one kernel: no float32 copy of x is written (a stack would split it)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    cos2 = cos.reshape(*cos.shape[:-1], -1, 2)
    sin2 = sin.reshape(*sin.shape[:-1], -1, 2) * mx.array([-1.0, 1.0])
    out = pairs.astype(mx.float32) * cos2 + pairs[..., ::-1].astype(mx.float32) * sin2
    return out.reshape(x.shape).astype(x.dtype)


def timestep_embedding(t: mx.array, channels: int) -> mx.array:
    """float32 sinusoid of width `channels`: cos half first, frequencies 10000^(-k/half)."""
    half = channels // 2
    freqs = mx.exp((-math.log(10000.0) * mx.arange(half, dtype=mx.float32)) / half)
    angles = t.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


def layer_norm(x: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, None, None, eps)


@mx.compile
def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    return layer_norm(x, eps) * (1 + scale) + shift


@mx.compile
def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """The residual update x + gate * y of every block."""
    return x + gate * y


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Full (unmasked) attention of (B, H, S, D) heads, merged back to (B, S, H*D)."""
    b, h, s, d = q.shape
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))
    return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)


# ---------------------------------------------------------------------------------------------
# Modules


def evaluate_part(*outputs: mx.array) -> None:
    """An evaluation point of the low-memory step: queue this part once all work before it has
    finished and released its buffers, then return, so that Python builds the next part's graph
    while the GPU runs this one. mx.synchronize, not mx.eval: eval returns before MLX has freed
    the finished part's temporaries, and the next part then allocated on top of them (H100,
    binary 512^2: 179 MB above the weights now; 217-227 when each part was evaluated before the
    next was built, 283 when built first and waited for with eval). The step took 2-24% less
    time than with evaluate-then-build in 9 of 10 pairs (BENCHMARKS.md)."""
    mx.synchronize()
    mx.async_eval(*outputs)


class TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = quant.Linear(channels, dim)
        self.linear_2 = quant.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedder(channels, dim)

    def __call__(self, timestep: mx.array) -> mx.array:
        return self.timestep_embedder(
            timestep_embedding(timestep, self.channels).astype(timestep.dtype)
        )


class Modulation(nn.Module):
    """The shift/scale/gate sets shared by all blocks of one kind, computed once per step."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.chunks = 3 * sets
        self.linear = quant.Linear(dim, dim * self.chunks)

    def __call__(self, temb: mx.array) -> list[mx.array]:
        """[shift, scale, gate] per set, each (B, 1, dim) to broadcast over tokens."""
        return mx.split(self.linear(nn.silu(temb))[:, None, :], self.chunks, axis=-1)


class FeedForward(nn.Module):
    """SwiGLU with the gate and up projections fused in `linear_in` (gate first)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = quant.Linear(dim, 2 * hidden)
        self.linear_out = quant.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(swiglu(gate, up))


def _heads(x: mx.array, heads: int, norm: nn.RMSNorm) -> mx.array:
    """(B, S, H*D) -> RMS-normed (B, H, S, D)."""
    b, s, _ = x.shape
    return norm(x.reshape(b, s, heads, -1)).transpose(0, 2, 1, 3)


def _value_heads(x: mx.array, heads: int) -> mx.array:
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1).transpose(0, 2, 1, 3)


class JointAttention(nn.Module):
    """Double-stream attention: image and text streams, each with its own projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = heads
        # Each stream's q, k, v projections as one linear, rows [q; k; v] (see FUSED_QKV).
        self.to_qkv = quant.Linear(dim, 3 * dim)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = [quant.Linear(dim, dim)]
        self.add_qkv_proj = quant.Linear(dim, 3 * dim)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = quant.Linear(dim, dim)

    def __call__(
        self, x: mx.array, c: mx.array, cos: mx.array, sin: mx.array
    ) -> tuple[mx.array, mx.array]:
        h = self.heads
        q_c, k_c, v_c = mx.split(self.add_qkv_proj(c), 3, axis=-1)
        q_x, k_x, v_x = mx.split(self.to_qkv(x), 3, axis=-1)
        # Text tokens first, in the sequence and in the RoPE tables.
        q = mx.concatenate(
            [_heads(q_c, h, self.norm_added_q), _heads(q_x, h, self.norm_q)], axis=2
        )
        k = mx.concatenate(
            [_heads(k_c, h, self.norm_added_k), _heads(k_x, h, self.norm_k)], axis=2
        )
        v = mx.concatenate([_value_heads(v_c, h), _value_heads(v_x, h)], axis=2)
        out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        n_txt = c.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class DoubleBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointAttention(
            cfg.dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps
        )
        self.ff = FeedForward(cfg.dim, cfg.mlp_dim)
        self.ff_context = FeedForward(cfg.dim, cfg.mlp_dim)

    def __call__(
        self, x, c, mod_img, mod_txt, cos, sin, evaluate: bool = False
    ) -> tuple[mx.array, mx.array]:
        """evaluate: compute the attention half, then the feed-forward half (`evaluate_part`), so
        that the step's peak holds one half's temporaries, not both (see Transformer.__call__)."""
        x, c = self._attention(x, c, mod_img[:3], mod_txt[:3], cos, sin)
        if evaluate:
            evaluate_part(x, c)
        (shift, scale, gate), (c_shift, c_scale, c_gate) = mod_img[3:], mod_txt[3:]
        x = gated_add(x, gate, self.ff(modulate(x, shift, scale, self.eps)))
        c = gated_add(c, c_gate, self.ff_context(modulate(c, c_shift, c_scale, self.eps)))
        return x, c

    def _attention(self, x, c, mod_img, mod_txt, cos, sin) -> tuple[mx.array, mx.array]:
        # A method of its own: its temporaries have no Python references left when it returns.
        (shift, scale, gate), (c_shift, c_scale, c_gate) = mod_img, mod_txt
        attn_x, attn_c = self.attn(
            modulate(x, shift, scale, self.eps), modulate(c, c_shift, c_scale, self.eps), cos, sin
        )
        return gated_add(x, gate, attn_x), gated_add(c, c_gate, attn_c)


class ParallelAttention(nn.Module):
    """Single-stream block body: one fused input projection [q|k|v|gate|up], one fused output."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int, eps: float):
        super().__init__()
        self.heads = heads
        self._qkv = 3 * dim  # output features [0, 3 dim) are q, k, v; the rest gate, up
        self.to_qkv_mlp_proj = quant.Linear(dim, 3 * dim + 2 * mlp_dim)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = quant.Linear(dim + mlp_dim, dim)

    def __call__(
        self, s: mx.array, cos: mx.array, sin: mx.array, evaluate: bool = False
    ) -> mx.array:
        """evaluate: compute the MLP half of the fused projection, then its attention half, each
        evaluated on its own, so that the projection's output (the block's largest temporary)
        never exists whole."""
        proj, qkv = self.to_qkv_mlp_proj, self._qkv
        if evaluate:
            hidden = self._mlp(proj(s, outputs=(qkv, proj.out_features)))
            evaluate_part(hidden)
            out = self._attention(proj(s, outputs=(0, qkv)), cos, sin)
            evaluate_part(out)
        else:
            y = proj(s)
            out, hidden = self._attention(y[..., :qkv], cos, sin), self._mlp(y[..., qkv:])
        return self.to_out(mx.concatenate([out, hidden], axis=-1))

    def _attention(self, qkv: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        q, k, v = mx.split(qkv, 3, axis=-1)
        h = self.heads
        q = apply_rope(_heads(q, h, self.norm_q), cos, sin)
        k = apply_rope(_heads(k, h, self.norm_k), cos, sin)
        return attention(q, k, _value_heads(v, h))

    @staticmethod
    def _mlp(gate_up: mx.array) -> mx.array:
        return swiglu(*mx.split(gate_up, 2, axis=-1))


class SingleBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = ParallelAttention(
            cfg.dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_dim, cfg.eps
        )

    def __call__(self, s, mod, cos, sin, evaluate: bool = False) -> mx.array:
        shift, scale, gate = mod
        return gated_add(
            s, gate, self.attn(modulate(s, shift, scale, self.eps), cos, sin, evaluate)
        )


class OutputNorm(nn.Module):
    """norm_out: LayerNorm modulated by (scale, shift) — scale first, unlike the blocks."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = quant.Linear(dim, 2 * dim)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(nn.silu(temb))[:, None, :], 2, axis=-1)
        return modulate(x, shift, scale, self.eps)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.x_embedder = quant.Linear(cfg.in_channels, d)
        self.context_embedder = quant.Linear(cfg.joint_attention_dim, d)
        self.time_guidance_embed = TimeGuidanceEmbed(cfg.timestep_guidance_channels, d)
        self.double_stream_modulation_img = Modulation(d, 2)
        self.double_stream_modulation_txt = Modulation(d, 2)
        self.single_stream_modulation = Modulation(d, 1)
        self.transformer_blocks = [DoubleBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_transformer_blocks = [SingleBlock(cfg) for _ in range(cfg.num_single_layers)]
        self.norm_out = OutputNorm(d, cfg.eps)
        self.proj_out = quant.Linear(d, cfg.out_channels)

    def rope(self, txt_ids: np.ndarray, img_ids: np.ndarray) -> tuple[mx.array, mx.array]:
        """RoPE tables for the joint sequence [text; image]; compute once per image size."""
        cfg = self.config
        return rope_tables(np.concatenate([txt_ids, img_ids]), cfg.axes_dims_rope, cfg.rope_theta)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        timestep: mx.array,
        rope: tuple[mx.array, mx.array],
        evaluate_blocks: bool = False,
    ) -> mx.array:
        """Velocity (B, N_img, out) for image tokens x (B, N_img, in), text context
        (B, N_txt, joint_attention_dim), timestep sigma (B,) in [0, 1], RoPE tables from `rope`.

        evaluate_blocks: compute each block in two or three parts, one after the other
        (`evaluate_part`). MLX keeps the buffers an operation reads until the GPU has finished
        the batch of work it was sent with, so an unevaluated step holds several blocks'
        temporaries at once; evaluating per part bounds the step's peak memory by one part's
        (costs a CPU-GPU round trip per part; not inside mx.compile)."""
        cos, sin = rope
        # diffusers scales sigma by 1000 in the hidden dtype (this rounds it in bf16).
        temb = self.time_guidance_embed(timestep.astype(x.dtype) * 1000)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        x = self.x_embedder(x)
        c = self.context_embedder(context)
        for block in self.transformer_blocks:
            x, c = block(x, c, mod_img, mod_txt, cos, sin, evaluate_blocks)
            if evaluate_blocks:
                evaluate_part(x, c)
        n_txt = c.shape[1]
        s = mx.concatenate([c, x], axis=1)
        del x, c  # s holds the streams now: no second copy through the single blocks
        for block in self.single_transformer_blocks:
            s = block(s, mod_single, cos, sin, evaluate_blocks)
            if evaluate_blocks:
                evaluate_part(s)
        return self.proj_out(self.norm_out(s[:, n_txt:], temb))


# Checkpoints (diffusers' names, and every published pack) store a double block's q, k and v
# projections as three linears per stream; the model multiplies each stream's three as one, their
# rows concatenated at load (one launch with three times the outputs instead of three small ones).
FUSED_QKV = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}


def sanitize(weights: dict[str, mx.array], num_layers: int, where: str) -> dict[str, mx.array]:
    """Checkpoint tensors -> the model's names: each double block's q/k/v linears (weight, and
    scales / biases if packed) concatenated on rows into the fused linear of FUSED_QKV. They must
    be stored alike (all dense, or packed the same way); WeightsError names the layer if not."""
    out = dict(weights)
    for i in range(num_layers):
        for fused, parts in FUSED_QKV.items():
            names = [f"transformer_blocks.{i}.{part}" for part in parts]
            for suffix in ("weight", "scales", "biases"):
                key = f"transformer_blocks.{i}.{fused}.{suffix}"
                tensors = [out.pop(f"{name}.{suffix}", None) for name in names]
                present = [t is not None for t in tensors]
                if not any(present) and (suffix != "weight" or key in out):
                    continue  # not packed, or already fused (a checkpoint of this model)
                if not all(present):
                    missing = names[present.index(False)]
                    if suffix == "weight":
                        raise WeightsError(f"{where}: weight '{missing}.weight' is missing from "
                                           "the checkpoint")
                    raise WeightsError(f"{where}: '{missing}.{suffix}' is missing: the q, k, v "
                                       "projections of a stream must be stored alike")
                # Float tensors may differ in dtype (concatenate promotes), packed codes not.
                if len({(_float_or(t.dtype), tuple(t.shape[1:])) for t in tensors}) > 1:
                    kinds = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in tensors)
                    raise WeightsError(f"{where}: {', '.join(names)} must be stored alike to be "
                                       f"fused, their {suffix} tensors are {kinds}")
                out[key] = mx.concatenate(tensors)
    return out


def _float_or(dtype: mx.Dtype) -> mx.Dtype | str:
    return "float" if mx.issubdtype(dtype, mx.floating) else dtype


def checkpoint_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a dense checkpoint for `cfg` (diffusers' names): the
    model's parameters, each fused q/k/v linear split back into its three (the inverse of
    `sanitize`)."""
    shapes = {}
    for name, value in tree_flatten(Transformer(cfg).parameters()):  # lazy: allocates nothing
        layer, _, leaf = name.rpartition(".")
        for fused, parts in FUSED_QKV.items():
            if layer.endswith("." + fused):
                for part in parts:
                    shapes[f"{layer.removesuffix(fused)}{part}.{leaf}"] = (
                        value.shape[0] // 3, *value.shape[1:])
                break
        else:
            shapes[name] = tuple(value.shape)
    return shapes


def load_weights(
    model: Transformer,
    weights: dict[str, mx.array],
    where: str,
    quantization: dict[str, Any] | None = None,
    dtype: mx.Dtype = mx.bfloat16,
    device_layout: bool = True,
) -> None:
    """Checkpoint tensors into `model`: fuse (`sanitize`), pick each linear's storage
    (`quant.match_storage`), cast dense tensors to `dtype` (quantization scales keep their stored
    dtype), load strictly, then, if `device_layout`, lay packed weights out for this device's
    fastest kernels (`quant.use_device_layout`; False keeps them as stored, the smallest)."""
    weights = sanitize(weights, model.config.num_layers, where)
    weights = quant.match_storage(model, weights, where, quantization)
    load_into(model, cast_floats(weights, dtype, keep=(".scales", ".biases")), where)
    if device_layout:
        quant.use_device_layout(model, dtype)


def load_transformer(
    directory: str | Path, dtype: mx.Dtype = mx.bfloat16, device_layout: bool = True
) -> Transformer:
    """Build the transformer from `directory/config.json` and load its safetensors weights.

    Dense (diffusers), PrismML's MLX packs (with `quantization_config.json`) and bonsai-packed
    (with `bonsai.json`) directories all load here; `quant.match_storage` picks each linear's
    storage from its tensors. Dense tensors are cast to `dtype`; quantization scales keep their
    stored dtype. `device_layout`: see `load_weights`.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    cfg = TransformerConfig.from_dict(read_json(config_path), str(config_path))
    manifest = directory / "bonsai.json"
    if manifest.is_file():
        check_manifest(read_json(manifest), str(manifest))
    qconfig = directory / "quantization_config.json"
    quantization = read_json(qconfig) if qconfig.is_file() else None
    model = Transformer(cfg)
    load_weights(model, load_safetensors_dir(directory), str(directory), quantization, dtype,
                 device_layout)
    return model


def check_manifest(manifest: dict[str, Any], where: str) -> None:
    """Refuse bonsai-packed versions this release cannot read."""
    if manifest.get("format") != "bonsai-packed":
        raise ConfigError(f"{where}: format {manifest.get('format')!r} is not 'bonsai-packed'")
    if manifest.get("version") != 1:
        raise ConfigError(
            f"{where}: bonsai-packed version {manifest.get('version')!r} is not supported by "
            "this mlx_bonsai (it reads version 1); upgrade mlx_bonsai"
        )
