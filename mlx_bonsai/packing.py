"""Offline packing and quantization for bonsai-packed v1 (NumPy; see docs/format.md).

Everything here works on row-major [out, in] weights with groups of `GROUP_SIZE` consecutive
inputs. It is used by the converter and by the tests; the runtime unpack lives in `quant.py`.

- `pack_bits` / `unpack_bits`: LSB-first codes in uint32 words (MLX affine layout; with bits=1
  this is the bonsai binary layout).
- `pack_trits` / `unpack_trits`: base-3 bytes, 5 trits a byte, 26 bytes a group (bonsai ternary).
- `pack_trit_words` / `unpack_trit_words`: ternary digit words, 2 bits a trit, the layout that
  ternary layers are held in on Hopper GPUs (never on disk; `kernels.ternary_words`).
- `fit_binary` / `fit_ternary`: the least-squares optimal codes and scale of each group.
- `quantize_binary` / `quantize_ternary`: dense weights -> (packed weight, scales).
- `repack_affine`: PrismML's MLX affine packs -> bonsai-packed, exactly, after checking that the
  pack really is binary/ternary.
"""

from __future__ import annotations

import numpy as np

from .errors import WeightsError

GROUP_SIZE = 128
TRITS_PER_BYTE = 5
TERNARY_GROUP_BYTES = -(-GROUP_SIZE // TRITS_PER_BYTE)  # 26: the last byte holds 3 trits
SCALE_DTYPES = ("bfloat16", "float16")

_TRIT_POWERS = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.uint16)


def _groups(x: np.ndarray) -> np.ndarray:
    """[rows, in] -> [rows, in/128, 128]."""
    rows, n = x.shape
    if n % GROUP_SIZE:
        raise ValueError(f"input size {n} is not a multiple of the group size {GROUP_SIZE}")
    return x.reshape(rows, n // GROUP_SIZE, GROUP_SIZE)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, n] (each < 2**bits) -> uint32 [rows, n*bits/32]; element k of a run of
    32/bits sits at bit offset k*bits of its word (LSB first)."""
    per_word = 32 // bits
    rows, n = codes.shape
    if 32 % bits or n % per_word:
        raise ValueError(f"cannot pack {n} {bits}-bit codes into uint32 words")
    c = codes.astype(np.uint32).reshape(rows, n // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    # The codes occupy disjoint bit ranges, so adding them is an OR.
    return (c << shifts).sum(axis=-1, dtype=np.uint32)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint32 [rows, w] -> uint8 codes [rows, w*32/bits]."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    codes = (words.astype(np.uint32)[..., None] >> shifts) & mask
    return codes.reshape(words.shape[0], -1).astype(np.uint8)


def pack_trits(trits: np.ndarray) -> np.ndarray:
    """Trits [rows, in] in {0,1,2} -> uint8 [rows, in/128*26]: per group, byte j holds elements
    5j..5j+4 as t0 + 3*t1 + 9*t2 + 27*t3 + 81*t4; the two unused slots of byte 25 are 0."""
    g = _groups(trits.astype(np.uint16))
    pad = TERNARY_GROUP_BYTES * TRITS_PER_BYTE - GROUP_SIZE
    g = np.pad(g, ((0, 0), (0, 0), (0, pad)))
    g = g.reshape(*g.shape[:2], TERNARY_GROUP_BYTES, TRITS_PER_BYTE)
    packed = (g * _TRIT_POWERS).sum(axis=-1).astype(np.uint8)
    return packed.reshape(trits.shape[0], -1)


def unpack_trits(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_trits`: uint8 [rows, in/128*26] -> trits uint8 [rows, in]."""
    rows = packed.shape[0]
    b = packed.reshape(rows, -1, TERNARY_GROUP_BYTES, 1).astype(np.uint16)
    t = (b // _TRIT_POWERS) % 3
    t = t.reshape(rows, -1, TERNARY_GROUP_BYTES * TRITS_PER_BYTE)[..., :GROUP_SIZE]
    return t.reshape(rows, -1).astype(np.uint8)


# Ternary digit words (metal/packed_fields.cu makes them on the GPU): per stage of 64 inputs (4
# runs of 16) a row has 4 uint32; input `at` of run r is trit t (code t - 1) in the 2 bits at bit
# WORD_SHIFT[r, at] of word WORD_OF[r, at]. Word w belongs to lane w of the wgmma kernel's
# fragments: the inputs 2w, 2w + 1, 2w + 8, 2w + 9 of each run, in nibbles 0-3 of a half-word.
_RUN, _AT = np.meshgrid(np.arange(4), np.arange(16), indexing="ij")
WORD_OF = (_AT % 8) // 2
WORD_SHIFT = 16 * (_RUN // 2) + 2 * (_RUN % 2) + 4 * (_AT % 2 + 2 * (_AT // 8))


def pack_trit_words(trits: np.ndarray) -> np.ndarray:
    """Trits [rows, in] in {0,1,2} (in a multiple of 64) -> uint32 digit words [rows, in/16]."""
    rows = trits.shape[0]
    t = trits.astype(np.uint32).reshape(rows, -1, 4, 16)
    words = np.zeros((rows, t.shape[1], 4), np.uint32)
    for r, at in np.ndindex(4, 16):
        words[..., WORD_OF[r, at]] |= t[..., r, at] << np.uint32(WORD_SHIFT[r, at])
    return words.reshape(rows, -1)


def unpack_trit_words(words: np.ndarray) -> np.ndarray:
    """Inverse of `pack_trit_words`: uint32 [rows, in/16] -> trits uint8 [rows, in]."""
    w = words.astype(np.uint32).reshape(words.shape[0], -1, 4)
    trits = (w[..., WORD_OF] >> WORD_SHIFT.astype(np.uint32)) & 3  # [rows, stages, 4, 16]
    return trits.reshape(words.shape[0], -1).astype(np.uint8)


def fit_binary(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best s*(2b-1) for each group along the last axis.

    For any scale s > 0 the best sign of each element is its own sign, and for those signs the
    squared error sum (|w| - s)^2 is smallest at s = mean|w|. Tie rule: w == 0 (either sign of
    zero) gets b = 1 (+s); either choice costs the same s^2.
    Returns (b as bool, s as float64).
    """
    w = np.asarray(w, dtype=np.float64)
    return w >= 0, np.abs(w).mean(axis=-1)


def fit_ternary(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best s*t, t in {-1,0,1}, for each group along the last axis (least squares).

    With k nonzeros the best choice is the k largest |w| with their signs and s = their mean,
    leaving error sum(w^2) - (sum of the top-k |w|)^2 / k. So we sort |w| once and take the k
    (0..n) that maximises (top-k sum)^2 / k. Ties: among equal |w| the lower index ranks first,
    and among equally good k the smallest wins (k = 0, s = 0 for an all-zero group).
    Returns (t as int8, s as float64).
    """
    w = np.asarray(w, dtype=np.float64)
    a = np.abs(w)
    n = w.shape[-1]
    order = np.argsort(-a, axis=-1, kind="stable")
    top_sums = np.cumsum(np.take_along_axis(a, order, axis=-1), axis=-1)
    counts = np.arange(1, n + 1, dtype=np.float64)
    gain = np.concatenate([np.zeros((*w.shape[:-1], 1)), top_sums**2 / counts], axis=-1)
    k = np.argmax(gain, axis=-1)  # first maximum: the smallest k among ties
    top_k_sum = np.take_along_axis(top_sums, np.maximum(k - 1, 0)[..., None], axis=-1)[..., 0]
    s = np.where(k > 0, top_k_sum / np.maximum(k, 1), 0.0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), order.shape), axis=-1)
    t = np.where(rank < k[..., None], np.where(w < 0, -1, 1), 0).astype(np.int8)
    return t, s


def round_scales(s: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 scales to the nearest `dtype` value (ties to even), returned as float32.

    Rounding goes straight from float64 (no float32 step) so no double rounding can pick the
    farther neighbour. bfloat16 keeps 8 significant bits; float16 is NumPy's own conversion.
    """
    s = np.asarray(s, dtype=np.float64)
    if dtype == "float16":
        out = s.astype(np.float16).astype(np.float32)
    elif dtype == "bfloat16":
        mantissa, exponent = np.frexp(s)
        out = np.ldexp(np.rint(mantissa * 256.0), exponent - 8).astype(np.float32)
    else:
        raise ValueError(f"scale dtype must be one of {SCALE_DTYPES}, not {dtype!r}")
    if not np.all(np.isfinite(out)):
        raise WeightsError(f"a scale overflows {dtype}; the weights are not finite or too large")
    return out


def quantize_binary(w: np.ndarray, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense [out, in] -> (uint32 weight [out, in/32], float32 scales [out, in/128] holding
    exact `scale_dtype` values)."""
    b, s = fit_binary(_groups(w))
    return pack_bits(b.reshape(w.shape), 1), round_scales(s, scale_dtype)


def quantize_ternary(w: np.ndarray, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense [out, in] -> (uint8 weight [out, in/128*26], float32 scales [out, in/128] holding
    exact `scale_dtype` values)."""
    t, s = fit_ternary(_groups(w))
    return pack_trits((t + 1).reshape(w.shape)), round_scales(s, scale_dtype)


def repack_affine(
    weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """PrismML MLX affine triplet -> bonsai-packed (weight, scales), exactly.

    `scales`/`biases` are the stored values widened to float32 (exact). bits=2 must be ternary:
    codes q <= 2 and bias == -scale, so scale*q + bias = scale*(q-1) and the trits are q.
    bits=1 must be binary: bias == -scale/2, so scale*q + bias = +-(-bias); the bits are reused
    as they are and the new scale is -bias. Anything else raises WeightsError naming `where`.
    """
    if bits == 2:
        if not np.array_equal(biases, -scales):
            raise WeightsError(f"{where}: biases are not -scales, so this is not a ternary pack")
        codes = unpack_bits(weight, 2)
        if codes.max(initial=0) > 2:
            raise WeightsError(f"{where}: code 3 occurs, so this is not a ternary pack")
        return pack_trits(codes), scales
    if bits == 1:
        # Doubling is exact in float32, so this compares bias == -scale/2 without rounding.
        if not np.array_equal(-2 * biases, scales):
            raise WeightsError(f"{where}: biases are not -scales/2, so this is not a binary pack")
        return weight, -biases
    raise WeightsError(f"{where}: {bits}-bit packs are neither binary (1) nor ternary (2)")
