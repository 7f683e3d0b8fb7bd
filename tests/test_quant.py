"""quant.Linear storages and mlx_bonsai.packing, against float64 NumPy and brute force."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import rel_err

from mlx_bonsai import kernels, quant
from mlx_bonsai.errors import WeightsError
from mlx_bonsai.packing import (
    fit_binary,
    fit_ternary,
    pack_bits,
    pack_trit_words,
    pack_trits,
    quantize_binary,
    quantize_ternary,
    repack_affine,
    round_scales,
    unpack_bits,
    unpack_trit_words,
    unpack_trits,
)
from mlx_bonsai.weights import load_into

# Result vs float64 on the same (rounded) inputs, as rel_err = max|diff| / max|ref|.
# float32: accumulation over K <= 640 terms (measured <= 1.3e-6). bfloat16: the fp32-accumulated
# output is rounded to 8 significant bits, up to 2^-8 = 3.9e-3 of max|ref| (measured <= 3.1e-3).
TOL = {mx.float32: 5e-6, mx.bfloat16: 8e-3}
N_OUT = 40


def _bf16_values(rng, shape, low=0.01, high=0.1):
    return np.array(mx.array(rng.uniform(low, high, shape).astype(np.float32))
                    .astype(mx.bfloat16).astype(mx.float32), dtype=np.float64)


def _random_layer(storage, n_in, rng):
    """(checkpoint tensors for a layer 'lin', float64 dense weight they encode)."""
    n_groups = n_in // 128
    scales = _bf16_values(rng, (N_OUT, n_groups))
    g = np.repeat(scales, 128, axis=1)
    if storage == "dense":
        w = _bf16_values(rng, (N_OUT, n_in), -1, 1)
        return {"lin.weight": mx.array(w.astype(np.float32))}, w
    if storage.startswith("affine"):
        bits = int(storage[-1])
        q = rng.integers(0, 2**bits, (N_OUT, n_in))
        biases = _bf16_values(rng, (N_OUT, n_groups), -0.1, 0.1)
        w = g * q + np.repeat(biases, 128, axis=1)
        tensors = {"lin.weight": mx.array(pack_bits(q, bits)),
                   "lin.scales": mx.array(scales.astype(np.float32)).astype(mx.bfloat16),
                   "lin.biases": mx.array(biases.astype(np.float32)).astype(mx.bfloat16)}
        return tensors, w
    if storage == "binary":
        words = rng.integers(0, 2**32, (N_OUT, n_in // 32), dtype=np.uint32)
        # The spec's order read independently: bit j of byte i of a little-endian row is 8i+j.
        b = np.unpackbits(words.astype("<u4").view(np.uint8), axis=1, bitorder="little")
        w = g * (2.0 * b - 1)
    else:
        t = rng.integers(0, 3, (N_OUT, n_in))
        words = pack_trits(t)
        w = g * (t - 1.0)
    tensors = {"lin.weight": mx.array(words),
               "lin.scales": mx.array(scales.astype(np.float32)).astype(mx.bfloat16)}
    return tensors, w


class _Holder(nn.Module):
    def __init__(self, n_in, n_out=N_OUT):
        super().__init__()
        self.lin = quant.Linear(n_in, n_out)


def _load(tensors, n_in, quantization=None):
    model = _Holder(n_in)
    load_into(model, quant.match_storage(model, tensors, "test", quantization), "test")
    return model.lin


@pytest.mark.parametrize("storage", ["dense", "affine1", "affine2", "binary", "ternary",
                                     "ternary-words"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("n_in", [384, 640])
def test_forward_matches_float64(storage, dtype, n_in):
    rng = np.random.default_rng(n_in)
    tensors, w = _random_layer(storage.removesuffix("-words"), n_in, rng)
    if storage == "dense":  # the loader casts dense weights to the model dtype (exact here)
        tensors["lin.weight"] = tensors["lin.weight"].astype(dtype)
    lin = _load(tensors, n_in)
    if storage == "ternary-words":  # as held on Hopper GPUs (here: the reference path)
        lin.weight = mx.array(pack_trit_words(unpack_trits(np.array(lin.weight))))
    assert lin.storage == storage.rstrip("12").removesuffix("-words")
    for m in (1, 3, 17, 130):
        x = mx.array(rng.standard_normal((m, n_in)).astype(np.float32)).astype(dtype)
        y = lin(x)
        assert y.dtype == dtype and y.shape == (m, N_OUT)
        ref = np.array(x.astype(mx.float32), dtype=np.float64) @ w.T
        assert rel_err(np.array(y.astype(mx.float32)), ref) < TOL[dtype], (m, storage)
    # Batched input keeps its leading axes.
    x = mx.array(rng.standard_normal((2, 5, n_in)).astype(np.float32)).astype(dtype)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ w.T
    assert rel_err(np.array(lin(x).astype(mx.float32)), ref) < TOL[dtype]
    # A range of output features multiplies those rows only (the low-memory single block).
    for start, stop in ((0, 7), (7, N_OUT), (13, 14)):
        y = lin(x, outputs=(start, stop))
        assert y.shape == (2, 5, stop - start)
        assert rel_err(np.array(y.astype(mx.float32)), ref[..., start:stop]) < TOL[dtype]


@pytest.mark.parametrize("storage", ["binary", "ternary", "ternary-words"])
def test_unpack_is_exact(storage):
    rng = np.random.default_rng(1)
    tensors, w = _random_layer(storage.removesuffix("-words"), 384, rng)
    unpack = {"binary": kernels.unpack_binary, "ternary": kernels.unpack_ternary,
              "ternary-words": kernels.unpack_ternary_words}[storage]
    if storage == "ternary-words":
        tensors["lin.weight"] = mx.array(pack_trit_words(unpack_trits(
            np.array(tensors["lin.weight"]))))
    for dtype in (mx.float32, mx.bfloat16):
        dense = unpack(tensors["lin.weight"], tensors["lin.scales"], dtype)
        assert dense.dtype == dtype
        np.testing.assert_array_equal(np.array(dense.astype(mx.float32), np.float64), w)


def test_scales_keep_stored_dtype():
    tensors, _ = _random_layer("ternary", 384, np.random.default_rng(2))
    lin = _load(tensors, 384)
    assert lin.scales.dtype == mx.bfloat16
    assert lin(mx.ones((1, 384), dtype=mx.float32)).dtype == mx.float32
    assert lin.scales.dtype == mx.bfloat16


def test_one_bit_reexpanded_where_unsupported(monkeypatch):
    rng = np.random.default_rng(3)
    tensors, w = _random_layer("affine1", 640, rng)
    x = mx.array(rng.standard_normal((17, 640)).astype(np.float32))
    native = _load(tensors, 640)
    monkeypatch.setattr(quant, "affine_bits_supported", lambda bits: bits != 1)
    expanded = _load(tensors, 640, quantization={"bits": 1, "group_size": 128})
    assert (native.bits, expanded.bits) == (1, 2)
    assert expanded.weight.shape == (N_OUT, 640 * 2 // 32)
    np.testing.assert_array_equal(unpack_bits(np.array(expanded.weight), 2),
                                  unpack_bits(np.array(tensors["lin.weight"]), 1))
    ref = np.array(x, np.float64) @ w.T
    assert rel_err(np.array(expanded(x)), ref) < TOL[mx.float32]


def test_affine_bits_supported_on_this_backend():
    # The probe must agree with what quantized_matmul does here (CPU accepts 1 and 2 bits).
    for bits in (1, 2):
        tensors, _ = _random_layer(f"affine{bits}", 128, np.random.default_rng(bits))
        x = mx.ones((1, 128))
        try:
            mx.eval(mx.quantized_matmul(x, tensors["lin.weight"], tensors["lin.scales"],
                                        tensors["lin.biases"], group_size=128, bits=bits))
            works = True
        except (RuntimeError, ValueError):
            works = False
        assert quant.affine_bits_supported(bits) == works


def _expect_error(tensors, match, n_in=384, quantization=None):
    with pytest.raises(WeightsError, match=match) as e:
        quant.match_storage(_Holder(n_in), tensors, "ckpt", quantization)
    assert "\n" not in str(e.value) and "layer 'lin'" in str(e.value)


def test_match_storage_errors():
    rng = np.random.default_rng(4)
    ternary, _ = _random_layer("ternary", 384, rng)
    binary, _ = _random_layer("binary", 384, rng)
    affine, _ = _random_layer("affine2", 384, rng)
    _expect_error({**ternary, "lin.weight": ternary["lin.weight"][:, :-1]}, r"should be \(40, 78\)")
    _expect_error({**binary, "lin.scales": binary["lin.scales"][:-1]}, "do not fit")
    _expect_error(binary, "do not fit", n_in=512)  # checkpoint for a different layer size
    _expect_error({**ternary, "lin.weight": ternary["lin.weight"].astype(mx.int32)}, "uint32")
    _expect_error({"lin.weight": ternary["lin.weight"]}, "uint8 weight but no scales")
    _expect_error({**ternary, "lin.biases": ternary["lin.scales"]}, "affine weight must be uint32")
    _expect_error(affine, "2-bit with group 128, the quantization config says bits=1",
                  quantization={"bits": 1, "group_size": 128})
    _expect_error({**affine, "lin.weight": affine["lin.weight"][:, :7]}, "1/2/4/8-bit")
    _expect_error({"lin.scales": ternary["lin.scales"]}, "scales but no weight")
    _expect_error({**affine, "lin.biases": affine["lin.biases"][:, :1]}, "differ in shape")
    # The right tensors for the right layer load; only then is load_into asked.
    assert quant.match_storage(_Holder(384), affine, "ckpt", {"bits": 2, "group_size": 128})


# --- layouts -------------------------------------------------------------------------------

def test_bit_layout_is_lsb_first_and_matches_mlx_affine():
    codes = np.zeros((1, 64), np.uint8)
    codes[0, 37] = 1
    assert pack_bits(codes, 1).tolist() == [[0, 1 << 5]]
    codes2 = np.zeros((1, 32), np.uint8)
    codes2[0, 17] = 2
    assert pack_bits(codes2, 2).tolist() == [[0, 2 << 2]]
    rng = np.random.default_rng(5)
    for bits in (1, 2, 4, 8):
        q = rng.integers(0, 2**bits, (3, 256))
        words = pack_bits(q, bits)
        assert words.dtype == np.uint32 and words.shape == (3, 256 * bits // 32)
        np.testing.assert_array_equal(unpack_bits(words, bits), q)
        # MLX reads the same codes back (scale 1, bias 0).
        ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
        got = mx.dequantize(mx.array(words), ones, zeros, group_size=128, bits=bits)
        np.testing.assert_array_equal(np.array(got), q)


def test_trit_layout_follows_the_spec():
    rng = np.random.default_rng(6)
    t = rng.integers(0, 3, (2, 256))
    packed = pack_trits(t)
    assert packed.dtype == np.uint8 and packed.shape == (2, 52)
    for r, g, j in itertools.product(range(2), range(2), range(26)):
        digits = [t[r, 128 * g + 5 * j + i] if 5 * j + i < 128 else 0 for i in range(5)]
        assert packed[r, 26 * g + j] == sum(d * 3**i for i, d in enumerate(digits))
    assert packed.max() <= 242 and packed[:, [25, 51]].max() < 27
    np.testing.assert_array_equal(unpack_trits(packed), t)


def test_trit_words_hold_each_lane_its_fragment_inputs():
    """Digit words, read independently of packing's tables: word w of a 64-input stage belongs
    to wgmma lane w, whose A fragments of each 16-input run r are inputs 2w, 2w+1, 2w+8, 2w+9;
    run r's four digits fill nibbles 0-3 of half-word r // 2, 2 (r % 2) bits in."""
    rng = np.random.default_rng(7)
    t = rng.integers(0, 3, (3, 256))
    words = pack_trit_words(t)
    assert words.dtype == np.uint32 and words.shape == (3, 16)
    for row, stage, w, r in itertools.product(range(3), range(4), range(4), range(4)):
        inputs = [64 * stage + 16 * r + j for j in (2 * w, 2 * w + 1, 2 * w + 8, 2 * w + 9)]
        half = (int(words[row, 4 * stage + w]) >> (16 * (r // 2))) & 0xFFFF
        assert [(half >> (4 * i + 2 * (r % 2))) & 3 for i in range(4)] == list(t[row, inputs])
    np.testing.assert_array_equal(unpack_trit_words(words), t)


# --- quantization rules --------------------------------------------------------------------

def _ternary_error(w, t, s):
    return ((w - s[..., None] * t) ** 2).sum(axis=-1)


def test_ternary_fit_is_the_brute_force_optimum_over_all_patterns():
    rng = np.random.default_rng(7)
    n = 8
    w = rng.standard_normal((40, n)) * rng.uniform(0.1, 2, (40, 1))
    w[0] = 0  # all-zero group
    w[1, :4] = 0.5  # ties in |w|
    w[1, 4:] = -0.5
    t, s = fit_ternary(w)
    err = _ternary_error(w, t, s)
    patterns = np.array(list(itertools.product((-1, 0, 1), repeat=n)), np.float64)
    nnz = np.abs(patterns).sum(axis=1)
    dots = w @ patterns.T  # best scale of a pattern: dot / nnz (least squares)
    best = (w**2).sum(axis=1) - np.max(np.where(nnz > 0, dots**2 / np.maximum(nnz, 1), 0), axis=1)
    np.testing.assert_allclose(err, best, rtol=1e-12, atol=1e-12)
    assert s[0] == 0 and not t[0].any()
    assert (s >= 0).all() and set(np.unique(t)) <= {-1, 0, 1}


def test_ternary_fit_beats_every_threshold_on_full_groups():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 128)) ** 3  # heavy tails move the optimum around
    t, s = fit_ternary(w)
    err = _ternary_error(w, t, s)
    a = np.abs(w)
    for tau in np.concatenate([np.sort(a, axis=1).T, a.max(axis=1, keepdims=True).T + 1]):
        mask = a >= tau[:, None]
        k = mask.sum(axis=1)
        s_tau = np.where(k > 0, (a * mask).sum(axis=1) / np.maximum(k, 1), 0)
        assert (err <= _ternary_error(w, np.sign(w) * mask, s_tau) + 1e-12).all()
    # The optimum is attained by one of the thresholds: the closed form at the chosen k.
    k = np.abs(t).sum(axis=1)
    top = -np.sort(-a, axis=1)
    rows = np.arange(64)
    np.testing.assert_allclose(s, np.cumsum(top, axis=1)[rows, k - 1] / k, rtol=1e-12)


def test_binary_fit_is_closed_form_and_brute_force_optimum():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((30, 8))
    w[0, 3] = 0.0
    w[0, 4] = -0.0
    b, s = fit_binary(w)
    np.testing.assert_allclose(s, np.abs(w).mean(axis=1), rtol=0, atol=0)
    assert b[0, 3] and b[0, 4]  # ties (zeros) go to +s
    err = ((w - s[:, None] * (2.0 * b - 1)) ** 2).sum(axis=1)
    signs = np.array(list(itertools.product((-1, 1), repeat=8)), np.float64)
    best = (w**2).sum(axis=1) - np.max((w @ signs.T) ** 2 / 8, axis=1)
    np.testing.assert_allclose(err, best, rtol=1e-12)


def test_round_scales_is_nearest():
    rng = np.random.default_rng(10)
    s = rng.uniform(1e-4, 1.0, 10_000)
    for dtype, mxd, bits in (("bfloat16", mx.bfloat16, 8), ("float16", mx.float16, 11)):
        r = round_scales(s, dtype).astype(np.float64)
        assert np.array_equal(r, np.array(mx.array(r.astype(np.float32)).astype(mxd)
                                          .astype(mx.float32)))  # representable
        ulp = 2.0 ** (np.floor(np.log2(r)) - (bits - 1))
        assert (np.abs(r - s) <= ulp / 2).all()
    # A float64 value just above a bf16 tie must round up; via float32 it would tie to even.
    tie = 1 + 2.0**-8
    assert round_scales(np.array([tie + 2.0**-40]), "bfloat16")[0] == 1 + 2.0**-7


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_quantize_roundtrip_through_runtime_unpack(variant):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((24, 384)).astype(np.float32)
    quantize, fit = (quantize_binary, fit_binary) if variant == "binary" else \
        (quantize_ternary, fit_ternary)
    weight, scales = quantize(w, "bfloat16")
    codes, s = fit(w.reshape(24, 3, 128))
    sign = 2.0 * codes - 1 if variant == "binary" else codes.astype(np.float64)
    expect = (round_scales(s, "bfloat16")[..., None] * sign).reshape(24, 384)
    unpack = kernels.unpack_binary if variant == "binary" else kernels.unpack_ternary
    got = unpack(mx.array(weight), mx.array(scales).astype(mx.bfloat16), mx.float32)
    np.testing.assert_array_equal(np.array(got), expect)


def test_repack_affine_refuses_non_bonsai_packs():
    rng = np.random.default_rng(12)
    s = rng.uniform(0.01, 0.1, (4, 1)).astype(np.float32)
    q2 = pack_bits(rng.integers(0, 3, (4, 128)), 2)
    q1 = pack_bits(rng.integers(0, 2, (4, 128)), 1)
    repack_affine(q2, s, -s, 2, "x")
    repack_affine(q1, 2 * s, -s, 1, "x")
    with pytest.raises(WeightsError, match="x: biases are not -scales,"):
        repack_affine(q2, s, -s * 1.01, 2, "x")
    with pytest.raises(WeightsError, match="code 3 occurs"):
        repack_affine(pack_bits(np.full((4, 128), 3), 2), s, -s, 2, "x")
    with pytest.raises(WeightsError, match="not -scales/2"):
        repack_affine(q1, s, -s, 1, "x")
    with pytest.raises(WeightsError, match="4-bit packs"):
        repack_affine(pack_bits(np.zeros((4, 128), int), 4), s, -s, 4, "x")
