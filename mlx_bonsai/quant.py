"""The one linear layer of the model code, and how its weight may be stored.

Model files build every projection as `Linear(in, out)` and never look at how its weight is
stored. Loading decides the storage: `match_storage(model, weights, where)` switches each layer to
what its checkpoint tensors are, then `weights.load_into` loads them strictly. Storages:

- dense: `weight` [out, in] (float).
- affine: MLX affine quantization as PrismML publishes it: uint32 `weight`, `scales`, `biases`,
  w = scale*q + bias, run by `mx.quantized_matmul`. Where the backend has no 1-bit kernel, 1-bit
  layers are re-expanded into 2-bit codes at load (same scale and bias, so exactly the same w).
- binary / ternary: bonsai-packed v1 (docs/format.md), uint32 / uint8 `weight` plus `scales`.
  After loading, `use_device_layout` may hold ternary weights as uint32 digit words instead
  (Hopper GPUs, where the kernels run from those; `kernels.holds_ternary_words`).

Every non-dense forward goes through `packed_matmul`, the one place a fast kernel plugs in.
Scales stay in their stored dtype; each matmul computes in the activation dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .errors import WeightsError
from .packing import GROUP_SIZE, TERNARY_GROUP_BYTES

STORAGES = ("dense", "affine", "binary", "ternary")
AFFINE_BITS = (1, 2, 4, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)


class Linear(nn.Module):
    """y = x @ W^T (no bias, as in every FLUX.2 transformer linear); dense until told otherwise."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.storage = "dense"
        self.bits: int | None = None  # code width and group of the packed storages
        self.group_size: int | None = None
        bound = 1.0 / math.sqrt(in_features)
        self.weight = mx.random.uniform(-bound, bound, (out_features, in_features))

    def set_storage(
        self,
        storage: str,
        *,
        bits: int | None = None,
        group_size: int = GROUP_SIZE,
        scale_dtype: mx.Dtype = mx.bfloat16,
    ) -> None:
        """Switch to `storage`, with zero placeholders of the shapes a checkpoint must supply.

        `bits` is needed for affine only; binary and ternary always use groups of 128.
        """
        n_in, n_out = self.in_features, self.out_features
        for name in ("scales", "biases"):
            if name in self:
                del self[name]
        if storage == "dense":
            self.weight = mx.zeros((n_out, n_in))
            self.storage, self.bits, self.group_size = storage, None, None
            return
        if storage == "affine":
            if bits not in AFFINE_BITS or group_size not in AFFINE_GROUP_SIZES:
                raise ValueError(f"affine storage takes bits {AFFINE_BITS} and group sizes "
                                 f"{AFFINE_GROUP_SIZES}, not bits={bits}, group_size={group_size}")
            words = n_in * bits // 32
            self.weight = mx.zeros((n_out, words), dtype=mx.uint32)
            self.biases = mx.zeros((n_out, n_in // group_size), dtype=scale_dtype)
        elif storage == "binary":
            bits, group_size = 1, GROUP_SIZE
            self.weight = mx.zeros((n_out, n_in // 32), dtype=mx.uint32)
        elif storage == "ternary":
            bits, group_size = 2, GROUP_SIZE
            self.weight = mx.zeros(
                (n_out, n_in // GROUP_SIZE * TERNARY_GROUP_BYTES), dtype=mx.uint8
            )
        else:
            raise ValueError(f"storage must be one of {STORAGES}, not {storage!r}")
        self.scales = mx.zeros((n_out, n_in // group_size), dtype=scale_dtype)
        self.storage, self.bits, self.group_size = storage, bits, group_size

    def __call__(self, x: mx.array, outputs: tuple[int, int] | None = None) -> mx.array:
        """x @ W^T; `outputs` = (start, stop): only those output features (every storage keeps
        one row per output feature, so this multiplies a view of the rows, no copy)."""
        if self.storage == "dense":
            return x @ _rows(self.weight, outputs).T
        return packed_matmul(x, self, outputs)


def _rows(a: mx.array, outputs: tuple[int, int] | None) -> mx.array:
    return a if outputs is None else a[outputs[0]:outputs[1]]


def packed_matmul(x: mx.array, layer: Linear, outputs: tuple[int, int] | None = None) -> mx.array:
    """x @ W^T (output features `outputs` only, if given) for a non-dense `layer`, in x's dtype:
    stock `mx.quantized_matmul` for affine layers, `kernels.packed_matmul` (Metal / CUDA
    kernels, or the pure-MLX reference) for bonsai-packed ones."""
    weight, scales = _rows(layer.weight, outputs), _rows(layer.scales, outputs)
    if layer.storage == "affine":
        dtype = x.dtype if affine_accumulates_in_float(x.dtype) else mx.float32
        y = mx.quantized_matmul(
            x.astype(dtype), weight, scales.astype(dtype),
            _rows(layer.biases, outputs).astype(dtype), transpose=True,
            group_size=layer.group_size, bits=layer.bits,
        )
        return y.astype(x.dtype)
    return kernels.packed_matmul(x, weight, scales, layer.storage, layer.group_size)


@functools.cache
def _affine_bits_supported(bits: int, device: str) -> bool:
    x = mx.ones((1, GROUP_SIZE))
    w = mx.zeros((8, GROUP_SIZE * bits // 32), dtype=mx.uint32)
    s = mx.ones((8, 1))
    try:
        mx.eval(mx.quantized_matmul(x, w, s, s, transpose=True, group_size=GROUP_SIZE, bits=bits))
    except (RuntimeError, ValueError):
        return False
    return True


def affine_bits_supported(bits: int) -> bool:
    """Whether the default device runs `mx.quantized_matmul` with `bits` (tried once per device:
    MLX 0.32.4's CUDA backend refuses bits=1, its CPU backend accepts it)."""
    return _affine_bits_supported(bits, str(mx.default_device()))


@functools.cache
def _affine_accumulates_in_float(dtype: mx.Dtype, device: str) -> bool:
    # 2304 ones times weight 1 sum to 2304 (exact in bf16 and fp16) in a float accumulator; a
    # half-precision one stalls once 1 is below half its spacing (at 256 in bf16, 2048 in fp16).
    n = 18 * GROUP_SIZE
    x = mx.ones((1, n), dtype=dtype)
    w = mx.full((8, n * 2 // 32), 0x55555555, dtype=mx.uint32)  # every 2-bit code is 1
    s, b = mx.ones((8, 18), dtype=dtype), mx.zeros((8, 18), dtype=dtype)
    y = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=GROUP_SIZE, bits=2)
    return bool((y.astype(mx.float32) == n).all())


def affine_accumulates_in_float(dtype: mx.Dtype) -> bool:
    """Whether `mx.quantized_matmul` on the default device sums `dtype` inputs in float32.

    MLX 0.32.4's CPU kernel for 1/2-bit sums in the input dtype (a bf16 sum of 384 products is
    off by percents); its GPU kernels sum in float. Tried once per dtype and device.
    """
    return dtype == mx.float32 or _affine_accumulates_in_float(dtype, str(mx.default_device()))


def expand_1bit_to_2bit(weight: mx.array) -> mx.array:
    """uint32 1-bit codes [out, in/32] -> the same codes as 2-bit [out, in/16] (LSB first).

    Each half-word's 16 bits are spread to the even bit positions, so code k lands at bit 2k of
    its new word; with the same scales and biases every weight is unchanged.
    """

    def spread(v: mx.array) -> mx.array:
        v = (v | (v << 8)) & 0x00FF00FF
        v = (v | (v << 4)) & 0x0F0F0F0F
        v = (v | (v << 2)) & 0x33333333
        return (v | (v << 1)) & 0x55555555

    halves = mx.stack([spread(weight & 0xFFFF), spread(weight >> 16)], axis=-1)
    return halves.reshape(weight.shape[0], -1)


def _storage_of(
    path: str, layer: Linear, weights: dict[str, mx.array], quantization: dict[str, Any] | None
) -> tuple[str, int | None, int | None]:
    """(storage, bits, group_size) that the tensors under `path` describe; ValueError if they
    disagree with the layer or with `quantization`."""
    n_in, n_out = layer.in_features, layer.out_features
    weight, scales = weights.get(f"{path}.weight"), weights.get(f"{path}.scales")
    biases = weights.get(f"{path}.biases")
    if scales is None:
        if biases is not None:
            raise ValueError("has biases but no scales")
        if weight is not None and not mx.issubdtype(weight.dtype, mx.floating):
            raise ValueError(f"has a {weight.dtype} weight but no scales")
        return "dense", None, None
    if weight is None:
        raise ValueError("has scales but no weight")
    if not mx.issubdtype(scales.dtype, mx.floating) or scales.ndim != 2:
        raise ValueError(f"scales must be a 2-D float tensor, got {scales.dtype} {scales.shape}")
    if scales.shape[0] != n_out or scales.shape[1] == 0 or n_in % scales.shape[1]:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a [{n_out}, {n_in}] linear")
    group_size = n_in // scales.shape[1]
    if weight.ndim != 2 or weight.shape[0] != n_out:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit a [{n_out}, {n_in}] linear")
    if biases is not None:
        if weight.dtype != mx.uint32:
            raise ValueError(f"affine weight must be uint32, got {weight.dtype}")
        if biases.shape != scales.shape or biases.dtype != scales.dtype:
            raise ValueError("biases and scales differ in shape or dtype")
        bits = weight.shape[1] * 32 // n_in
        if bits not in AFFINE_BITS or weight.shape[1] * 32 != bits * n_in:
            raise ValueError(f"weight {tuple(weight.shape)} is not a 1/2/4/8-bit packing of "
                             f"{n_in} inputs")
        if group_size not in AFFINE_GROUP_SIZES:
            raise ValueError(f"group size {group_size} is not one of {AFFINE_GROUP_SIZES}")
        if quantization is not None:
            want = (quantization.get("bits"), quantization.get("group_size"))
            if want != (bits, group_size):
                raise ValueError(f"tensors are {bits}-bit with group {group_size}, the "
                                 f"quantization config says bits={want[0]}, group_size={want[1]}")
        return "affine", bits, group_size
    if group_size != GROUP_SIZE:
        raise ValueError(f"group size {group_size}, bonsai-packed needs {GROUP_SIZE}")
    if weight.dtype == mx.uint32:
        storage, words = "binary", n_in // 32
    elif weight.dtype == mx.uint8:
        storage, words = "ternary", n_in // GROUP_SIZE * TERNARY_GROUP_BYTES
    else:
        raise ValueError(f"packed weight must be uint32 (binary) or uint8 (ternary), "
                         f"got {weight.dtype}")
    if weight.shape[1] != words:
        raise ValueError(f"{storage} weight {tuple(weight.shape)} should be ({n_out}, {words})")
    return storage, None, group_size


def use_device_layout(model: nn.Module, dtype: mx.Dtype) -> None:
    """Hold every ternary layer of `model` as digit words where this device's kernels want them
    for activations of `dtype` (`kernels.holds_ternary_words`); elsewhere nothing changes. The
    conversion is lazy: each base-3 weight is freed once its words are evaluated."""
    if not kernels.holds_ternary_words(dtype):
        return
    for _, layer in model.named_modules():
        if isinstance(layer, Linear) and layer.storage == "ternary" and \
                layer.weight.dtype == mx.uint8:
            layer.weight = kernels.ternary_words(layer.weight)


def match_storage(
    model: nn.Module,
    weights: dict[str, mx.array],
    where: str,
    quantization: dict[str, Any] | None = None,
) -> dict[str, mx.array]:
    """Switch every `Linear` of `model` to the storage its tensors in `weights` have.

    Per layer `L`: `L.biases` beside a uint32 `L.weight` and `L.scales` -> affine (bits and group
    size read from the shapes, checked against `quantization` ({bits, group_size}) if given);
    uint32 weight + scales -> binary; uint8 weight + scales -> ternary; a float weight alone ->
    dense. Returns the weights to pass to `load_into`: the same tensors, except 1-bit affine
    weights re-expanded to 2 bits where the backend lacks 1-bit kernels. Raises WeightsError
    naming the layer when its tensors do not fit its shape.
    """
    out = dict(weights)
    for path, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        try:
            storage, bits, group_size = _storage_of(path, layer, weights, quantization)
        except ValueError as e:
            raise WeightsError(f"{where}: layer '{path}' {e}") from None
        if storage == "affine" and bits == 1 and not affine_bits_supported(1):
            out[f"{path}.weight"] = expand_1bit_to_2bit(weights[f"{path}.weight"])
            bits = 2
        if storage == "dense":
            layer.set_storage("dense")
        else:
            layer.set_storage(storage, bits=bits, group_size=group_size,
                              scale_dtype=weights[f"{path}.scales"].dtype)
    return out
