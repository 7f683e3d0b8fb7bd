"""mlx_bonsai.kernels on the CPU: the dispatch, its reference path, the env var and the self-check.

GPU kernels cannot run here; benchmarks/kernels.py checks them on a GPU. What runs here: the
reference against float64 NumPy on both layouts, the decode arithmetic of the shared kernel
header, and the dispatch logic with injected kernel factories (a wrong one, a correct one).
"""

import functools
import math
import re
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import rel_err

from mlx_bonsai import kernels, packing, quant
from mlx_bonsai.errors import BonsaiError, ConfigError, WeightsError
from mlx_bonsai.weights import load_into

K = 384  # three groups: a multiple of 128, not of the GEMV's 512-input lane sweep
N = 72  # not a multiple of the 16-row GEMV block or the 64-row GEMM tile

# float64 NumPy packing straight from format_spec.md, independent of mlx_bonsai.packing.


def pack_binary(codes: np.ndarray) -> np.ndarray:
    """codes in {-1, +1} [n, k] -> uint32 [n, k/32], element k = bit k%32 of word k//32."""
    bits = (codes > 0).astype(np.uint64).reshape(codes.shape[0], -1, 32)
    return (bits << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """codes in {-1, 0, +1} [n, k] -> uint8 [n, k/128*26], 5 base-3 digits a byte."""
    n, k = codes.shape
    t = (codes + 1).reshape(n, k // 128, 128)
    t = np.concatenate([t, np.zeros((n, k // 128, 2), t.dtype)], axis=-1).reshape(n, -1, 26, 5)
    return (t * 3 ** np.arange(5)).sum(-1).astype(np.uint8).reshape(n, -1)


def make_layer(kind, n, k, scale_dtype, rng):
    codes = rng.choice([-1, 1] if kind == "binary" else [-1, 0, 1], size=(n, k))
    scales = mx.array(rng.uniform(0.01, 0.1, (n, k // 128)).astype(np.float32)).astype(scale_dtype)
    dense = codes * np.repeat(np.array(scales.astype(mx.float32), np.float64), 128, axis=1)
    weight = pack_binary(codes) if kind == "binary" else pack_ternary(codes)
    return mx.array(weight), scales, dense


def test_numpy_packer_follows_the_spec():
    # Element 0 of a group is the lowest digit of byte 0; bytes stay <= 242; byte 25's spare
    # digits are zero.
    codes = np.full((1, 128), -1)
    codes[0, 0], codes[0, 6], codes[0, 127] = 1, 0, 1
    packed = pack_ternary(codes)
    assert packed.shape == (1, 26) and packed.max() <= 242
    assert packed[0, 0] == 2 and packed[0, 1] == 3 and packed[0, 25] == 2 * 9
    bits = pack_binary(np.where(np.arange(64) % 33 == 0, 1, -1)[None])
    assert bits.tolist() == [[1, 2]]


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize(
    "x_dtype, scale_dtype, tol",
    [
        (mx.float32, mx.bfloat16, 1e-5),
        (mx.float16, mx.float16, 2e-3),
        (mx.bfloat16, mx.bfloat16, 1e-2),
    ],
)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 35)])
def test_cpu_dispatch_is_the_reference_and_matches_float64(kind, x_dtype, scale_dtype, tol, lead):
    rng = np.random.default_rng(0)
    weight, scales, dense = make_layer(kind, N, K, scale_dtype, rng)
    x = rng.standard_normal((*lead, K)).astype(np.float32)
    x_mx = mx.array(x).astype(x_dtype)
    assert kernels._device_backend() is None  # the CPU test machine has no Metal/CUDA
    y = kernels.packed_matmul(x_mx, weight, scales, kind)
    assert y.shape == (*lead, N) and y.dtype == x_dtype
    assert mx.array_equal(y, kernels.reference_matmul(x_mx, weight, scales, kind))
    want = np.array(x_mx.astype(mx.float32), np.float64) @ dense.T
    assert rel_err(np.array(y.astype(mx.float32)), want) <= tol


def test_shared_header_decode_arithmetic_is_exact():
    # The magic multipliers in metal/bonsai_decode.h replace divisions by 3^i; check them (as
    # written in the header) on every byte value a valid pack can hold.
    header = (kernels.SOURCE_DIR / "bonsai_decode.h").read_text()
    body = header[header.index("bonsai_div_pow3(uint32_t v"):]
    magic = [int(m) for m in re.findall(r"(\d+)u", body[: body.index("return")])]
    shift = int(re.search(r">> (\d+);", body).group(1))
    assert len(magic) == 5
    v = np.arange(243)
    for i, m in enumerate(magic):
        assert np.array_equal((v * m) >> shift, v // 3**i), i
    thirds = re.findall(r"\(\w+ \* (\d+)u\) >> (\d+)", header)  # v / 3 of the digit loops
    assert len(thirds) == 2
    v = np.arange(256)
    for mul, sh in thirds:
        assert np.array_equal((v * int(mul)) >> int(sh), v // 3)


@pytest.mark.parametrize(
    "args, error",
    [
        (dict(kind="quaternary"), BonsaiError),
        (dict(group_size=64), BonsaiError),
        (dict(x=mx.zeros((2, 200))), BonsaiError),
        (dict(x=mx.zeros((2, K), dtype=mx.int32)), BonsaiError),
        (dict(weight=mx.zeros((N, K // 32), dtype=mx.uint8)), WeightsError),
        (dict(weight=mx.zeros((N, K // 16), dtype=mx.uint32)), WeightsError),
        (dict(scales=mx.zeros((N + 1, 3))), WeightsError),
    ],
)
def test_bad_inputs_raise_named_errors(args, error):
    weight, scales = kernels.random_packed("binary", N, K)
    call = dict(x=mx.zeros((2, K)), weight=weight, scales=scales, kind="binary")
    call.update(args)
    with pytest.raises(error):
        kernels.packed_matmul(**call)


# Dispatch with injected kernels: pretend MLX runs on a Metal GPU and give the KernelSet a
# factory with mx.fast.metal_kernel's interface.


class FakeFactory:
    """Stands in for mx.fast.metal_kernel; each launch is recorded and answered by `answer`."""

    def __init__(self, answer):
        self.answer = answer
        self.built, self.launches = [], []

    def __call__(self, *, name, input_names, output_names, source, header, ensure_row_contiguous,
                 atomic_outputs):
        self.built.append(name)
        assert source and "bonsai_ternary_codes16" in header and ensure_row_contiguous

        def launch(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                   init_value=None):
            self.launches.append((name, dict(template), grid, threadgroup, init_value))
            assert grid[0] % threadgroup[0] == 0
            return [self.answer(name, inputs, dict(template), output_shapes[0], output_dtypes[0])]

        return launch


def correct_answer(name, inputs, template, shape, dtype):
    kind = "ternary" if template["TERNARY"] else "binary"
    unpack = kernels.unpack_ternary if template["TERNARY"] else kernels.unpack_binary
    if name == "bonsai_decode":
        return unpack(inputs[0], inputs[1], dtype)
    return kernels.reference_matmul(inputs[0].astype(mx.float32), inputs[1], inputs[2],
                                    kind).astype(dtype)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(kernels, "_device_backend", lambda: "metal")
    monkeypatch.setattr(kernels, "_KERNEL_SETS", {})
    monkeypatch.setattr(kernels, "_CHECKED", {})
    monkeypatch.setattr(kernels, "_PLANS", {})
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)

    def install(answer):
        factory = FakeFactory(answer)
        monkeypatch.setattr(mx.fast, "metal_kernel", factory)
        return factory

    return install


@pytest.mark.parametrize("m, strategy", [(1, "gemv"), (3, "gemv"), (70, "gemm"), (600, "scratch")])
def test_dispatch_uses_a_kernel_that_passes_its_self_check(fake_gpu, recwarn, m, strategy):
    factory = fake_gpu(correct_answer)
    weight, scales = kernels.random_packed("ternary", N, K)
    x = mx.random.normal((m, K)).astype(mx.bfloat16)
    y = kernels.packed_matmul(x, weight, scales, "ternary")
    assert kernels.default_strategy("metal", "ternary", m, mx.bfloat16) == strategy
    assert factory.built == [f"bonsai_{'decode' if strategy == 'scratch' else strategy}"]
    assert not recwarn.list
    ref = kernels.reference_matmul(x, weight, scales, "ternary")
    assert rel_err(np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))) <= 1e-2
    # The self-check ran on NaN-poisoned outputs, once; the real call launched after it.
    assert math.isnan(factory.launches[0][4]) and factory.launches[-1][4] is None
    n_launches = len(factory.launches)
    kernels.packed_matmul(x, weight, scales, "ternary")
    assert len(factory.launches) > n_launches and not recwarn.list


def test_x_of_rank_2_and_3_reaches_the_kernel_without_reshapes(fake_gpu):
    """A reshape is a graph node of its own (about 1.5 us to evaluate on CUDA): x [M, K] and
    [B, L, K] go to the kernel as they are and its output comes back as it is; other ranks go
    through [M, K]."""
    outputs = []

    def answer(*args):
        outputs.append(correct_answer(*args))
        return outputs[-1]

    fake_gpu(answer)
    weight, scales = kernels.random_packed("binary", N, K)
    x = mx.random.normal((3, K))
    kernels.packed_matmul(x, weight, scales, "binary")  # self-check first
    y = kernels.packed_matmul(x, weight, scales, "binary")
    assert y is outputs[-1]
    y3 = kernels.packed_matmul(x.reshape(1, 3, K), weight, scales, "binary")
    assert y3 is outputs[-1] and y3.shape == (1, 3, N) and mx.array_equal(y3[0], y)
    y4 = kernels.packed_matmul(x.reshape(1, 1, 3, K), weight, scales, "binary")
    assert outputs[-1].shape == (3, N) and y4.shape == (1, 1, 3, N)
    assert mx.array_equal(y4[0, 0], y)


def test_the_self_check_covers_three_dimensional_x(fake_gpu):
    """A kernel right for x [M, K] but wrong for [B, L, K] fails its self-check: the model's
    calls are 3-D, so they get the reference, not garbage."""

    def answer(name, inputs, template, shape, dtype):
        right = correct_answer(name, inputs, template, shape, dtype)
        return right if inputs[0].ndim == 2 else mx.zeros_like(right)

    fake_gpu(answer)
    weight, scales = kernels.random_packed("binary", N, K)
    x = mx.random.normal((1, 3, K))
    with pytest.warns(RuntimeWarning, match="self-check"):
        y = kernels.packed_matmul(x, weight, scales, "binary")
    assert mx.array_equal(y, kernels.reference_matmul(x, weight, scales, "binary"))


def test_each_shape_is_planned_once(fake_gpu, monkeypatch):
    """packed_matmul checks and chooses on a shape's first call only; anything the choice
    depends on (shapes, dtypes, kind, strategy, MLX_BONSAI_KERNELS, fused_only, tune) makes a
    new plan, and bad input is refused on every call."""
    factory = fake_gpu(correct_answer)
    planned = []
    plan = kernels._plan
    monkeypatch.setattr(kernels, "_plan", lambda *a: planned.append(a[0].shape) or plan(*a))
    weight, scales = kernels.random_packed("binary", N, K)
    x = mx.random.normal((3, K)).astype(mx.bfloat16)
    for _ in range(3):
        y = kernels.packed_matmul(x, weight, scales, "binary")
    assert planned == [(3, K)] and factory.launches[-1][0] == "bonsai_gemv"
    ref = kernels.reference_matmul(x, weight, scales, "binary")
    assert rel_err(np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))) <= 1e-2
    n_launches = len(factory.launches)
    kernels.packed_matmul(x.reshape(1, 3, K), weight, scales, "binary")  # another shape
    kernels.packed_matmul(x.astype(mx.float16), weight, scales, "binary")  # another dtype
    kernels.packed_matmul(x, weight, scales, "binary", strategy="gemm")
    with kernels.fused_only():
        kernels.packed_matmul(x, weight, scales, "binary")
    assert len(planned) == 5 and len(factory.launches) > n_launches + 3
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    n_launches = len(factory.launches)
    y = kernels.packed_matmul(x, weight, scales, "binary")
    assert len(planned) == 6 and len(factory.launches) == n_launches  # the reference path
    assert mx.array_equal(y, ref)
    monkeypatch.setenv(kernels.ENV_VAR, "sideways")
    for _ in range(2):
        with pytest.raises(ConfigError, match="MLX_BONSAI_KERNELS"):
            kernels.packed_matmul(x, weight, scales, "binary")
    monkeypatch.delenv(kernels.ENV_VAR)
    for _ in range(2):
        with pytest.raises(WeightsError, match="scales"):
            kernels.packed_matmul(x, weight, scales[:, :2], "binary")
    kernels._PLANS[("not", "a", "plan")] = None
    monkeypatch.setattr(kernels, "_device_backend", lambda: None)
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(kernels, "time_call", lambda *a, **k: 1.0)
    with pytest.raises(BonsaiError, match="tune"):  # no GPU: nothing tuned, plans kept
        kernels.tune("binary", [(3, N, K)])
    assert ("not", "a", "plan") in kernels._PLANS
    monkeypatch.setattr(kernels, "_device_backend", lambda: "metal")
    kernels.tune("binary", [(3, N, K)])
    assert kernels._PLANS == {}  # tune() may change choices: every shape plans again


def test_scratch_decodes_the_whole_weight_once(fake_gpu):
    factory = fake_gpu(correct_answer)
    weight, scales = kernels.random_packed("binary", 300, K)
    x = mx.random.normal((5, K))
    y = kernels.kernel_set("metal").run("scratch", x, weight, scales, "binary")
    assert [(launch[0], launch[2][0]) for launch in factory.launches] == [
        ("bonsai_decode", 7424)]  # a thread per 16 weights of all 300 rows, whole blocks of 256
    ref = kernels.reference_matmul(x, weight, scales, "binary")
    assert rel_err(np.array(y), np.array(ref)) <= 1e-6


@pytest.mark.parametrize(
    "answer",
    [
        lambda name, inputs, template, shape, dtype: mx.zeros(shape, dtype),
        lambda name, inputs, template, shape, dtype: mx.full(shape, math.nan, dtype),
        lambda name, inputs, template, shape, dtype: 2 * correct_answer(
            name, inputs, template, shape, dtype),
    ],
    ids=["zeros", "nan", "twice"],
)
def test_a_wrong_kernel_warns_once_and_falls_back_to_the_reference(fake_gpu, answer):
    factory = fake_gpu(answer)
    weight, scales = kernels.random_packed("binary", N, K)
    x = mx.random.normal((1, K)).astype(mx.float16)
    with pytest.warns(RuntimeWarning, match="gemv.*failed its self-check"):
        y = kernels.packed_matmul(x, weight, scales, "binary")
    assert mx.array_equal(y, kernels.reference_matmul(x, weight, scales, "binary"))
    launches = len(factory.launches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2 = kernels.packed_matmul(x, weight, scales, "binary")
    assert len(factory.launches) == launches  # the kernel is not used again
    assert mx.array_equal(y2, y)


def test_a_kernel_that_does_not_build_falls_back(fake_gpu, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("compile error: expected ';'")

    monkeypatch.setattr(mx.fast, "metal_kernel", broken)
    weight, scales = kernels.random_packed("ternary", N, K)
    x = mx.random.normal((2, K))
    with pytest.warns(RuntimeWarning, match="RuntimeError: compile error"):
        y = kernels.packed_matmul(x, weight, scales, "ternary")
    assert mx.array_equal(y, kernels.reference_matmul(x, weight, scales, "ternary"))


def test_env_var_forces_the_reference_or_a_strategy(fake_gpu, monkeypatch):
    factory = fake_gpu(correct_answer)
    weight, scales = kernels.random_packed("binary", N, K)
    x = mx.random.normal((3, K))
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    y = kernels.packed_matmul(x, weight, scales, "binary")
    assert not factory.built
    assert mx.array_equal(y, kernels.reference_matmul(x, weight, scales, "binary"))
    monkeypatch.setenv(kernels.ENV_VAR, "gemm")
    kernels.packed_matmul(x, weight, scales, "binary")
    assert factory.built == ["bonsai_gemm"]
    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(ConfigError, match=kernels.ENV_VAR):
        kernels.packed_matmul(x, weight, scales, "binary")
    monkeypatch.delenv(kernels.ENV_VAR)
    with pytest.raises(BonsaiError, match="strategy"):
        kernels.packed_matmul(x, weight, scales, "binary", strategy="fastest")


def test_fused_only_never_decodes_to_scratch(fake_gpu):
    """Inside fused_only() (the low-memory pipeline) large M takes the fused GEMM, not a dense
    decode; tuned scratch choices are skipped there too; outside, nothing changed."""
    factory = fake_gpu(correct_answer)
    weight, scales = kernels.random_packed("binary", N, K)
    x = mx.random.normal((600, K)).astype(mx.bfloat16)
    assert kernels.default_strategy("metal", "binary", 600, mx.bfloat16) == "scratch"
    with kernels.fused_only():
        assert kernels.default_strategy("metal", "binary", 600, mx.bfloat16) == "gemm"
        assert kernels.default_strategy("metal", "binary", 3, mx.bfloat16) == "gemv"
        y = kernels.packed_matmul(x, weight, scales, "binary")
    assert "bonsai_decode" not in factory.built and factory.launches[-1][0] == "bonsai_gemm"
    ref = kernels.reference_matmul(x, weight, scales, "binary")
    assert rel_err(np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))) <= 1e-2
    key = ("metal", "binary", mx.bfloat16, 600, N, K)
    kernels._TUNED[key] = "scratch"
    try:
        assert kernels.choose_strategy("metal", "binary", 600, N, K, mx.bfloat16) == "scratch"
        with kernels.fused_only():
            assert kernels.choose_strategy("metal", "binary", 600, N, K, mx.bfloat16) == "gemm"
    finally:
        del kernels._TUNED[key]
    assert kernels.default_strategy("metal", "binary", 600, mx.bfloat16) == "scratch"


def test_cuda_gemm_never_takes_float32(monkeypatch):
    monkeypatch.setattr(kernels, "_KERNEL_SETS", {})
    for m in (1, 64, 200, 5000):
        for kind in kernels.KINDS:
            assert kernels.default_strategy("cuda", kind, m, mx.float32) not in ("gemm", "wgmma")
    ks = kernels.kernel_set("cuda", factory=FakeFactory(correct_answer))
    assert not ks.supports("gemm", mx.float32) and ks.supports("gemm", mx.bfloat16)


# Dispatch on a pretend Hopper GPU (CUDA, compute capability 9): the wgmma strategy's launches.


def nvrtc_text(text: str) -> str:
    """`text` as NVRTC compiles it: each `#include "path"` line replaced by that file."""
    return re.sub(r'#include "([^"]+)"', lambda m: Path(m.group(1)).read_text(), text)


class FakeCudaFactory:
    """Stands in for mx.fast.cuda_kernel (dynamic shared memory, no atomic outputs)."""

    def __init__(self):
        self.built, self.launches, self.headers, self.sources = [], [], {}, {}
        self.break_fields = 0  # bits the pass flips in every word

    def __call__(self, *, name, input_names, output_names, source, header, ensure_row_contiguous,
                 shared_memory=0):
        self.built.append((name, shared_memory))
        self.sources[name] = (source, header)
        self.headers[name] = header = nvrtc_text(header)
        assert ensure_row_contiguous and ("bonsai_wgmma_rs" in header) == (name == "bonsai_wgmma")
        assert ("__maxnreg__" in header) == (name == "bonsai_wgmma")

        def launch(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                   init_value=None):
            template = dict(template)
            assert len(output_shapes) == len(output_dtypes) == len(output_names)
            self.launches.append((name, template, grid, threadgroup, tuple(output_shapes[0]),
                                  output_dtypes[0], [tuple(s) for s in output_shapes[1:]],
                                  output_dtypes[1:]))
            extra = [mx.zeros(s, d)
                     for s, d in zip(output_shapes[1:], output_dtypes[1:], strict=True)]
            if name == "bonsai_fields":  # the pass: digit words, unless told to break them
                words = packing.pack_trit_words(packing.unpack_trits(np.array(inputs[0])))
                return [mx.array(words ^ np.uint32(self.break_fields))]
            # The kernels' weight layouts: wgmma reads ternary digit words only; the GEMV reads
            # them when told to (WORDS), base-3 bytes otherwise.
            words = template["TERNARY"] and inputs[1].dtype == mx.uint32
            if name == "bonsai_wgmma":
                assert words == template["TERNARY"]
            if name == "bonsai_gemv":
                assert template["WORDS"] == words
            return [correct_answer(name, inputs, template, output_shapes[0],
                                   output_dtypes[0])] + extra

        return launch


@pytest.fixture
def fake_hopper(monkeypatch):
    factory = FakeCudaFactory()
    monkeypatch.setattr(kernels, "_device_backend", lambda: "cuda")
    monkeypatch.setattr(kernels, "_hopper", lambda: True)
    monkeypatch.setattr(kernels, "_KERNEL_SETS", {})
    monkeypatch.setattr(kernels, "_CHECKED", {})
    monkeypatch.setattr(kernels, "_PLANS", {})
    monkeypatch.setattr(mx.fast, "cuda_kernel", factory)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    return factory


@pytest.mark.parametrize("kind, m, dtype, strategy, fused", [
    ("binary", 3, mx.bfloat16, "gemv", "gemv"), ("binary", 70, mx.bfloat16, "wgmma", "wgmma"),
    ("binary", 1536, mx.float16, "wgmma", "wgmma"),
    ("binary", 2048, mx.bfloat16, "wgmma", "wgmma"),
    ("binary", 16384, mx.float16, "wgmma", "wgmma"),
    ("binary", 600, mx.float32, "scratch", "scratch"),
    ("ternary", 70, mx.bfloat16, "gemm", "gemm"), ("ternary", 511, mx.bfloat16, "gemm", "gemm"),
    ("ternary", 512, mx.bfloat16, "wgmma", "wgmma"),
    ("ternary", 2047, mx.float16, "wgmma", "wgmma"),
    ("ternary", 4608, mx.bfloat16, "wgmma", "wgmma"),
    ("ternary", 600, mx.float32, "scratch", "scratch"),
])
def test_hopper_defaults(fake_hopper, kind, m, dtype, strategy, fused):
    """Per kind and rows, and inside fused_only() (float32 has no fused CUDA GEMM)."""
    assert kernels.default_strategy("cuda", kind, m, dtype) == strategy
    with kernels.fused_only():
        assert kernels.default_strategy("cuda", kind, m, dtype) == fused


@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("m, n, tile", [
    (70, 200, (128, 2)),  # 128-row blocks below 1024 rows; two 128-weight-row blocks, one partial
    (1500, 200, (256, 2)),  # 12 256 x 128 blocks fill one wave as well as 16 192 x 192 ones
    (1536, 3072, (192, 3)),  # 128 192 x 192 blocks: one wave; 144 256 x 128 ones: two
])
def test_wgmma_launch(fake_hopper, kind, m, n, tile):
    weight, scales = kernels.random_packed(kind, n, K)
    x = mx.random.normal((m, K)).astype(mx.bfloat16)
    y = kernels.packed_matmul(x, weight, scales, kind, strategy="wgmma")
    ref = kernels.reference_matmul(x, weight, scales, kind)
    assert rel_err(np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))) <= 1e-2
    stages = 4
    bm, wg = tile  # x rows, warpgroups (64 weight rows each) per block
    threads = 128 * wg
    launch = fake_hopper.launches[-1]
    assert launch[0] == "bonsai_wgmma" and launch[4] == (m, n)
    assert launch[1] == dict(T=mx.bfloat16, S=mx.bfloat16, TERNARY=kind == "ternary", BM=bm,
                             WG=wg, STAGES=stages)
    blocks = (math.ceil(n / (64 * wg)), math.ceil(m / bm))
    assert launch[2] == (blocks[0] * threads, blocks[1], 1)
    assert launch[3] == (threads, 1, 1)
    # Scratch for each block's tensor map of x (128 bytes), plus 128 to align them.
    assert launch[6:] == ([((blocks[0] * blocks[1] + 1) * 128,)], [mx.uint8])
    # The x ring (or the epilogue tile) in whole 128 bytes, the tensor map, an mbarrier a slot,
    # and the 1 KiB alignment slack.
    ring = max(stages * bm * 128, bm * (threads + 16))
    smem = math.ceil(ring / 128) * 128 + 128 + 8 * stages + 1024
    assert ("bonsai_wgmma", smem) in fake_hopper.built
    # Two blocks per SM for 128 rows of x (65536 / 512 registers a thread), else one (65536 /
    # threads, at most 255, in multiples of 8).
    cap = {128: 128, 256: 255, 192: 168}[bm]
    cap = f"#define __global__ __location__(global) __maxnreg__({cap})\n"
    assert cap in fake_hopper.headers["bonsai_wgmma"]
    if kind == "ternary":  # the fields of this call's weight went in, not the base-3 bytes
        fields = fake_hopper.launches[-2]
        assert fields[0] == "bonsai_fields" and fields[4] == (n, K // 16)
        assert fields[5] == mx.uint32 and fields[2] == (n * K // 128, 1, 1)


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = quant.Linear(K, N)
        self.b = quant.Linear(K, N)
        self.c = quant.Linear(K, N)


def _packed_model():
    """Three linears as loaded from a checkpoint: ternary, binary and dense."""
    tensors = {}
    for name, kind in (("a", "ternary"), ("b", "binary")):
        w, s = kernels.random_packed(kind, N, K, key=mx.random.key(ord(name)))
        tensors.update({f"{name}.weight": w, f"{name}.scales": s})
    tensors["c.weight"] = mx.random.normal((N, K)).astype(mx.bfloat16)
    model = _Layers()
    load_into(model, quant.match_storage(model, tensors, "test"), "test")
    return model, tensors


@pytest.mark.parametrize("m, strategy", [(3, "gemv"), (70, "wgmma"), (1536, "wgmma")])
def test_hopper_holds_ternary_layers_as_digit_words(fake_hopper, recwarn, m, strategy):
    """After loading on a Hopper GPU, ternary layers hold digit words (made by the GPU pass),
    every other layer stays as loaded; the dispatch sends the words to the GEMV (told WORDS) or
    the wgmma kernel, with no per-call pass, and the answers stay those of the base-3 bytes."""
    model, tensors = _packed_model()
    quant.use_device_layout(model, mx.bfloat16)
    assert model.a.weight.dtype == mx.uint32 and model.a.weight.shape == (N, K // 16)
    words = kernels._words_of(tensors["a.weight"])
    assert np.array_equal(np.array(model.a.weight), np.array(words))
    assert model.b.weight is tensors["b.weight"] and model.c.weight.dtype == mx.bfloat16
    x = mx.random.normal((m, K)).astype(mx.bfloat16)
    before = len(fake_hopper.launches)
    y = model.a(x)
    ref = kernels.reference_matmul(x, tensors["a.weight"], tensors["a.scales"], "ternary")
    assert rel_err(np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))) <= 1e-2
    last = fake_hopper.launches[-1]
    assert last[0] == f"bonsai_{strategy}" and last[1]["TERNARY"]
    assert last[1].get("WORDS", True)
    calls = [launch[0] for launch in fake_hopper.launches[before:]]
    assert "bonsai_fields" not in calls[calls.index(last[0]):]  # self-check first, then the call
    assert not recwarn.list


@pytest.mark.parametrize("setting", ["cpu", "float32", "gemm", "reference", "pass fails"])
def test_ternary_layers_stay_base3_bytes_elsewhere(fake_hopper, monkeypatch, setting):
    """Not on the CPU, not for float32 activations (no wgmma kernel), not when
    MLX_BONSAI_KERNELS picks another path, and not when the GPU pass fails its self-check (with
    one warning)."""
    dtype = mx.float32 if setting == "float32" else mx.bfloat16
    if setting == "cpu":
        monkeypatch.setattr(kernels, "_device_backend", lambda: None)
    if setting in ("gemm", "reference"):
        monkeypatch.setenv(kernels.ENV_VAR, setting)
    if setting == "pass fails":
        fake_hopper.break_fields = 1 << 30
    model, tensors = _packed_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quant.use_device_layout(model, dtype)
    assert model.a.weight is tensors["a.weight"]
    assert [str(w.message) for w in caught] == (
        ["mlx_bonsai: the cuda pass that makes ternary digit words failed its self-check "
         "(words differ); ternary layers stay base-3 bytes"] if setting == "pass fails" else [])


def test_digit_words_refuse_kernels_that_read_bytes(fake_hopper, monkeypatch):
    weight, scales = kernels.random_packed("ternary", N, K)
    words = kernels._words_of(weight)
    x = mx.random.normal((70, K)).astype(mx.bfloat16)
    for strategy in ("gemm", "scratch"):
        with pytest.raises(ConfigError, match="digit words run on the CUDA gemv and wgmma"):
            kernels.packed_matmul(x, words, scales, "ternary", strategy=strategy)
    monkeypatch.setenv(kernels.ENV_VAR, "scratch")
    with pytest.raises(ConfigError, match="set MLX_BONSAI_KERNELS before loading the model"):
        kernels.packed_matmul(x, words, scales, "ternary")
    monkeypatch.setenv(kernels.ENV_VAR, "reference")  # the reference reads them
    y = kernels.packed_matmul(x, words, scales, "ternary")
    assert mx.array_equal(y, kernels.reference_matmul(x, weight, scales, "ternary")).item()


@pytest.mark.parametrize("kind", kernels.KINDS)
def test_cuda_sources_come_in_by_include(fake_hopper, kind):
    """MLX copies and hashes a kernel's source text on every call: ours is a few include lines
    that bring in exactly the kernel files, and name every <input>_shape the body uses (MLX scans
    the text it is given to write the kernel's parameters)."""
    x = mx.random.normal((70, K)).astype(mx.bfloat16)
    weight, scales = kernels.random_packed(kind, N, K)
    for strategy in ("gemv", "gemm", "wgmma", "scratch"):
        kernels.packed_matmul(x[:3] if strategy == "gemv" else x, weight, scales, kind,
                              strategy=strategy)
    assert set(fake_hopper.sources) >= {"bonsai_gemv", "bonsai_gemm", "bonsai_wgmma",
                                        "bonsai_decode"}
    for name, (source, header) in fake_hopper.sources.items():
        file = f"packed_{name.removeprefix('bonsai_')}.cu"
        for text in (source, header.replace(kernels._register_cap(512), "")):
            assert all(line.startswith(("// ", "#include ")) for line in text.splitlines())
        assert nvrtc_text(source).endswith((kernels.SOURCE_DIR / file).read_text() + "\n")
        for used in set(re.findall(r"\b(?:x|weight|scales)_shape\b", kernels._source(file))):
            assert used in source
    assert "bonsai_wgmma_rs" in fake_hopper.headers["bonsai_wgmma"]


def test_cuda_text_inlines_what_an_include_cannot_name(monkeypatch, tmp_path):
    """A path an #include directive cannot quote gets the files' text instead; a change to a
    file changes the text (MLX's compile cache is keyed by it)."""
    monkeypatch.setattr(kernels, "_source", functools.cache(kernels._source.__wrapped__))
    cuda_text = kernels._cuda_text.__wrapped__  # uncached
    odd, plain = tmp_path / 'a"b', tmp_path / "plain"
    for folder in (odd, plain):
        folder.mkdir()
        (folder / "one.cuh").write_text("int one; // why\n")
    monkeypatch.setattr(kernels, "SOURCE_DIR", odd)
    assert cuda_text("one.cuh") == "int one;\n"
    monkeypatch.setattr(kernels, "SOURCE_DIR", plain)
    first = cuda_text("one.cuh", mentions=("x_shape",))
    assert first.endswith(f'#include "{plain / "one.cuh"}"\n') and "x_shape" in first
    assert nvrtc_text(first).endswith("int one; // why\n\n")
    (plain / "one.cuh").write_text("int two;\n")
    assert cuda_text("one.cuh", mentions=("x_shape",)) != first


@pytest.mark.parametrize("together", [False, True])
def test_time_call_evaluates_each_call_on_its_own(monkeypatch, together):
    """Timed calls are queued one evaluation each (never one graph of independent calls, which
    MLX's CUDA backend may run concurrently) unless `together`; every result is computed."""
    evaluated, made = [], []
    real_async_eval = mx.async_eval

    def fn():
        made.append(mx.array([float(len(made))]) * 2)
        return made[-1]

    def async_eval(*arrays):
        evaluated.append(len(arrays))
        real_async_eval(*arrays)

    monkeypatch.setattr(kernels.mx, "async_eval", async_eval)
    seconds = kernels.time_call(fn, warmup=2, repeats=3, calls=4, together=together)
    assert seconds > 0
    assert len(made) == 2 + 3 * 4
    assert evaluated == ([] if together else [1] * (3 * 4))
    assert [y.item() for y in made] == [2.0 * i for i in range(14)]
