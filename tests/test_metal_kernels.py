"""The package's Metal kernels (metal/*.metal), executed on the CPU by the MSL harness.

Every kernel runs through kernels.py's real launch code (`metal_packed_matmul(..., factory=)`,
the harness standing in for `mx.fast.metal_kernel`) on shapes that cross every tile edge, and must
match the pure-MLX reference. Deliberately broken copies of the real sources, patched at test
time, must be caught.
"""

from __future__ import annotations

import math
import platform
import re

import mlx.core as mx
import pytest
from conftest import rel_err
from metal_harness import KernelRaceError, KernelRuntimeError, have_compiler, metal_kernel

from mlx_bonsai import kernels

if platform.system() != "Linux":
    pytest.skip("the MSL harness is the Linux CI stand-in for Metal", allow_module_level=True)
assert have_compiler(), "the MSL harness needs g++ (C++20); install it to run these tests"

# K = 3 groups: a multiple of 128 but not of the GEMV's 2048-wide sweep. N = 198: not a
# multiple of the GEMM tile (64) or of the GEMV's 4 rows per threadgroup.
N, K = 198, 3 * 128
# Rows of x per strategy: GEMV passes of 1, 2 and 4 rows (3 = one partial pass of 4), GEMM one
# full 64-row tile plus a partial one; scratch any.
ROWS = {"gemv": (1, 2, 3), "gemm": (71,), "scratch": (5,)}
# The output is rounded to x's dtype once: allow its machine epsilon (twice the rounding error).
EPS = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}
DTYPES = [(mx.float32, mx.bfloat16), (mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16)]


def inputs(kind, m, x_dtype=mx.float32, scale_dtype=mx.bfloat16, seed=0):
    kx, kw = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((m, K), key=kx).astype(x_dtype)
    weight, scales = kernels.random_packed(kind, N, K, scale_dtype, key=kw)
    return x, weight, scales


def reference(x, weight, scales, kind):
    return kernels.reference_matmul(x.astype(mx.float32), weight, scales, kind)


CASES = [
    (strategy, m, x_dtype, scale_dtype)
    for strategy, rows in ROWS.items()
    for m in rows
    for x_dtype, scale_dtype in (DTYPES if m == rows[-1] else DTYPES[:1])
]


@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("strategy,m,x_dtype,scale_dtype", CASES)
def test_metal_kernel_matches_reference(kind, strategy, m, x_dtype, scale_dtype):
    x, weight, scales = inputs(kind, m, x_dtype, scale_dtype)
    y = kernels.metal_packed_matmul(
        x, weight, scales, kind, strategy=strategy, factory=metal_kernel
    )
    assert y.dtype == x_dtype and y.shape == (m, N)
    assert rel_err(y.astype(mx.float32), reference(x, weight, scales, kind)) <= EPS[x_dtype] + 1e-6


@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("strategy, lead", [("gemv", (3,)), ("gemv", (1, 3)), ("gemm", (5, 15)),
                                            ("gemm", (1, 71)), ("gemv", ()), ("gemm", (2, 5, 7))])
def test_metal_kernels_take_x_of_rank_2_and_3_as_it_is(kind, strategy, lead):
    """x [M, K] and [B, L, K] go to the kernels as they are (M = B * L, no reshape node around
    the call), other ranks through [M, K]: the numbers of the 2-D call, in x's shape."""
    m = math.prod(lead)
    x, weight, scales = inputs(kind, m, seed=3)
    x = x.reshape(*lead, K)
    launches = []

    def recording(**kw):
        kernel = metal_kernel(**kw)

        def launch(**args):
            launches.append(args["output_shapes"][0])
            return kernel(**args)

        return launch

    y = kernels.metal_packed_matmul(x, weight, scales, kind, strategy=strategy, factory=recording)
    assert y.shape == (*lead, N)
    assert launches == [(*lead, N) if len(lead) in (1, 2) else (m, N)]
    want = reference(x.reshape(m, K), weight, scales, kind).reshape(*lead, N)
    assert rel_err(y, want) <= EPS[mx.float32] + 1e-6


def test_ternary_gemv_takes_several_byte_pairs_per_thread():
    # K = 11 groups: 143 byte pairs a row, more than the threadgroup's 128 threads.
    kx, kw = mx.random.split(mx.random.key(5))
    x = mx.random.normal((2, 11 * 128), key=kx)
    weight, scales = kernels.random_packed("ternary", 9, 11 * 128, key=kw)
    y = kernels.metal_packed_matmul(x, weight, scales, "ternary", strategy="gemv",
                                    factory=metal_kernel)
    assert rel_err(y, reference(x, weight, scales, "ternary")) <= EPS[mx.float32] + 1e-6


def _code(text: str) -> str:
    """`text` without comments and whitespace: kernels.py may strip both before launching."""
    return re.sub(r"\s+", "", re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S))


def test_every_metal_kernel_runs_under_the_harness():
    used = []

    def recording(**kw):
        used.append(_code(kw["source"]))
        return metal_kernel(**kw)

    metal = kernels.KernelSet("metal", metal_kernel)
    assert set(ROWS) == {s for s in kernels.STRATEGIES if metal.supports(s, mx.float32)}
    for strategy in ROWS:
        x, weight, scales = inputs("binary", ROWS[strategy][-1])
        kernels.metal_packed_matmul(
            x, weight, scales, "binary", strategy=strategy, factory=recording
        )
    sources = sorted(kernels.SOURCE_DIR.glob("*.metal"))
    assert sources
    for path in sources:
        assert _code(path.read_text()) in used, f"{path.name} is not launched by any strategy"


# ------------------------------------------------------------------------------------------------
# Broken copies of the real kernels, made by a regular-expression patch of the text kernels.py
# passes to the factory (spaces in a pattern match any whitespace). A pattern that no longer
# matches exactly once fails the test: update it to the kernel's new text.
# ------------------------------------------------------------------------------------------------
BARRIER = r"threadgroup_barrier\(mem_flags::mem_threadgroup\);"


def patched(kernel, pattern, replacement, where="source"):
    """A factory building kernel `bonsai_<kernel>` from its real text, patched."""
    regex = re.compile(pattern.replace(" ", r"\s*"))

    def factory(**kw):
        if kw["name"] == f"bonsai_{kernel}":
            text, count = regex.subn(replacement, kw[where])
            assert count == 1, f"patch target matched {count} times in {kernel} {where}: {pattern}"
            kw = {**kw, where: text}
        return metal_kernel(**kw)

    return factory


BROKEN = [
    # the K loop's first barrier: a simdgroup overwrites tiles others still read
    (
        "gemm",
        "binary",
        rf"{BARRIER}( for \(int r = 0; r < RUNS; \+\+r\) {{ const int row)",
        r"\1",
        KernelRaceError,
        "depends on the thread schedule",
        "first K-loop barrier",
    ),
    # the second: simdgroups read tiles still being written
    (
        "gemm",
        "binary",
        rf"{BARRIER}( for \(int kk)",
        r"\1",
        KernelRaceError,
        "depends on the thread schedule",
        "second K-loop barrier",
    ),
    # the epilogue's: threads read back fragments other simdgroups have not stored yet
    (
        "gemm",
        "binary",
        rf"{BARRIER}( for \(int r = 0; r < RUNS; \+\+r\) {{ const int orow)",
        r"\1",
        KernelRaceError,
        "depends on the thread schedule",
        "epilogue barrier",
    ),
    (
        "gemm",
        "binary",
        r"if \(m0 \+ orow < M\)",
        "if (m0 + orow <= M)",
        KernelRuntimeError,
        "out-of-bounds write of buffer 'out'",
        "M edge off by one",
    ),
    (
        "gemm",
        "binary",
        r"if \(n < N\) {( scale\[r\])",
        r"if (n <= N) {\1",
        KernelRuntimeError,
        "out-of-bounds read of buffer 'scales'",
        "N edge off by one",
    ),
    (
        "gemv",
        "binary",
        r"if \(n < N\) {( const float scale)",
        r"if (n <= N) {\1",
        KernelRuntimeError,
        "out-of-bounds read of buffer 'scales'",
        "GEMV N edge off by one",
    ),
    (
        "gemv",
        "binary",
        r"const bool ok = m0 \+ m < M;( const size_t base = [^;]*; for)",
        r"const bool ok = m0 + m <= M;\1",
        KernelRuntimeError,
        "out-of-bounds read of buffer 'x'",
        "GEMV M edge off by one",
    ),
    # the ternary GEMV's byte pairs: its own edges, and the group's last pair of 8 inputs
    (
        "gemv",
        "ternary",
        r"if \(n < N\) {( const size_t row)",
        r"if (n <= N) {\1",
        KernelRuntimeError,
        "out-of-bounds read of buffer 'scales'",
        "ternary GEMV N edge off by one",
    ),
    (
        "gemv",
        "ternary",
        r"const bool ok = m0 \+ m < M;( const size_t base = [^;]*; xsum)",
        r"const bool ok = m0 + m <= M;\1",
        KernelRuntimeError,
        "out-of-bounds read of buffer 'x'",
        "ternary GEMV M edge off by one",
    ),
    (
        "gemv",
        "ternary",
        r"\? 8 : 10;",
        "? 10 : 10;",
        KernelRuntimeError,
        "out-of-bounds read of buffer 'x'",
        "ternary GEMV reads the spare digits",
    ),
    (
        "decode",
        "binary",
        r"\* 16 \+ size_t\(j\)\]",
        "* 16 + size_t(j) + 1]",
        KernelRuntimeError,
        "out-of-bounds write of buffer 'dense'",
        "decode store off by one",
    ),
]
STRATEGY_OF = {"gemm": "gemm", "gemv": "gemv", "decode": "scratch"}


@pytest.mark.parametrize(
    "kernel,kind,pattern,replacement,error,message", [b[:6] for b in BROKEN],
    ids=[b[6] for b in BROKEN]
)
def test_broken_kernel_is_caught(kernel, kind, pattern, replacement, error, message):
    strategy = STRATEGY_OF[kernel]
    x, weight, scales = inputs(kind, ROWS[strategy][-1])
    factory = patched(kernel, pattern, replacement)
    with pytest.raises(error, match=message):
        kernels.metal_packed_matmul(x, weight, scales, kind, strategy=strategy, factory=factory)


@pytest.mark.parametrize("kernel, pattern, replacement", [
    # the byte of its group holding input k (the runs of 16 of the decode and GEMM kernels)
    ("decode", r"\(u % 128u\) / 5u", "(u % 128u + 1u) / 5u"),
    ("gemm", r"\(u % 128u\) / 5u", "(u % 128u + 1u) / 5u"),
    # one base-3 digit of a byte pair (the GEMV's): v / 3 off for some bytes
    ("gemv", r"\(v \* 171u\) >> 9", "(v * 170u) >> 9"),
])
def test_broken_ternary_decoding_is_caught(kernel, pattern, replacement):
    # Off in the shared decoder (bonsai_decode.h), whose text every kernel carries.
    strategy = STRATEGY_OF[kernel]
    factory = patched(kernel, pattern, replacement, where="header")
    x, weight, scales = inputs("ternary", ROWS[strategy][-1])
    y = kernels.metal_packed_matmul(x, weight, scales, "ternary", strategy=strategy,
                                    factory=factory)
    assert rel_err(y, reference(x, weight, scales, "ternary")) > 0.1
