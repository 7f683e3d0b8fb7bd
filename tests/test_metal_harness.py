"""Self-tests of the MSL harness (tests/metal_harness): it must run correct kernels correctly and
catch the bugs it exists to catch. The package's own kernels are tested in test_metal_kernels.py.
"""

from __future__ import annotations

import os
import platform

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from metal_harness import (
    KernelCompileError,
    KernelRaceError,
    KernelRuntimeError,
    have_compiler,
    metal_kernel,
)
from metal_harness.source import ATTRIBUTES, ArgInfo, generate

if platform.system() != "Linux":
    pytest.skip("the MSL harness is the Linux CI stand-in for Metal", allow_module_level=True)
assert have_compiler(), "the MSL harness needs g++ (C++20); install it to run these tests"

F32 = mx.float32


def run(source, inputs, out_shapes, out_dtypes, grid, group, names=None, template=None, **kw):
    names = names or [f"in{i}" for i in range(len(inputs))]
    outs = [f"out{i}" for i in range(len(out_shapes))] if len(out_shapes) > 1 else ["out"]
    kernel = metal_kernel(kw.pop("name", "t"), names, outs, source, kw.pop("header", ""))
    return kernel(
        inputs=inputs,
        output_shapes=out_shapes,
        output_dtypes=out_dtypes,
        grid=grid,
        threadgroup=group,
        template=template,
        **kw,
    )


# ------------------------------------------------------------------------------------------------
# The generated kernel text is MLX's, byte for byte.
# ------------------------------------------------------------------------------------------------
SIGNATURE_CASES = [
    # scalar input, shape use, mixed template kinds
    (
        ["x", "s"],
        ["y"],
        "y[0] = x[thread_position_in_grid.x] + x_shape[0] + s;",
        "",
        [mx.zeros((10,)), mx.array(1.0)],
        [F32],
        [("T", mx.float16), ("N", 3), ("B", False)],
    ),
    # small (constant) input, strides/ndim, two outputs, simd attributes, header
    (
        ["x", "w"],
        ["y", "z"],
        "y[simdgroup_index_in_threadgroup + thread_index_in_simdgroup] = x_strides[0] + w_ndim;",
        "#define ONE 1\n",
        [mx.zeros((3, 4), dtype=mx.bfloat16), mx.zeros((2,), dtype=mx.uint8)],
        [F32, mx.int32],
        [],
    ),
    # MLX's own quirk: several outputs, a _shape buffer and no attribute give a broken
    # signature; the harness must reproduce it, not fix it
    (
        ["x", "w"],
        ["y", "z"],
        "y[0] = x_shape[0];",
        "",
        [mx.zeros((3, 4)), mx.zeros((20,), dtype=mx.uint32)],
        [F32, mx.uint8],
        [("bm", 32)],
    ),
    # every thread attribute, atomic outputs (generated here; the harness refuses to run them)
    (
        ["x"],
        ["y"],
        "y[0] = x[0]; " + " ".join(a for a, _ in ATTRIBUTES),
        "",
        [mx.zeros((3, 4), dtype=mx.int64)],
        [mx.int32],
        [],
    ),
]
ATOMIC_CASE = len(SIGNATURE_CASES) - 1


@pytest.mark.parametrize("case", range(len(SIGNATURE_CASES)))
def test_generated_source_is_mlx_text(case, tmp_path, capfd):
    names, outs, source, header, inputs, dtypes, template = SIGNATURE_CASES[case]
    atomic = case == ATOMIC_CASE
    kernel = mx.fast.metal_kernel(
        name=f"sig{case}",
        input_names=names,
        output_names=outs,
        source=source,
        header=header,
        atomic_outputs=atomic,
    )

    def f(*xs):
        return kernel(
            inputs=list(xs),
            template=template,
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(4,)] * len(outs),
            output_dtypes=dtypes,
            verbose=True,
        )

    # Without a Metal device MLX still builds the kernel source while tracing for export.
    mx.export_function(str(tmp_path / "f.mlxfn"), f, *inputs)
    printed = capfd.readouterr().out
    mlx_text = printed[printed.index("```\n") + 4 : printed.rindex("\n```")]
    ours = generate(
        f"sig{case}",
        names,
        outs,
        source,
        header,
        [ArgInfo(a.dtype, a.ndim, a.size) for a in inputs],
        dtypes,
        template,
        atomic_outputs=atomic,
    )
    assert ours.text == mlx_text


# ------------------------------------------------------------------------------------------------
# Correct kernels give correct results.
# ------------------------------------------------------------------------------------------------
REDUCE = """
threadgroup float part[TG];
const uint t = thread_index_in_threadgroup;
const uint i = thread_position_in_grid.x;
part[t] = i < uint(x_shape[0]) ? x[i] : 0.0f;
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint s = threads_per_threadgroup.x / 2; s > 0; s /= 2) {
  if (t < s) {
    part[t] += part[t + s];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (t == 0) {
  out[threadgroup_position_in_grid.x] = part[0];
}
"""


def test_barrier_reduction():
    x = mx.array(np.random.randn(1000).astype(np.float32))
    (out,) = run(
        REDUCE, [x], [(8,)], [F32], (1024, 1, 1), (128, 1, 1), names=["x"], template=[("TG", 128)]
    )
    ref = np.pad(np.array(x), (0, 24)).reshape(8, 128).sum(axis=1)
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-5)


def test_missing_barrier_is_caught():
    loop_barrier = "  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n}"
    assert loop_barrier in REDUCE
    racy = REDUCE.replace(loop_barrier, "  }\n}")
    x = mx.array(np.random.randn(256).astype(np.float32))
    with pytest.raises(KernelRaceError, match="depends on the thread schedule"):
        run(racy, [x], [(2,)], [F32], (256, 1, 1), (128, 1, 1), names=["x"], template=[("TG", 128)])


MMA = """
// 16 x 16 output, one 8 x 8 tile per simdgroup: C = A[16, K] @ B, B given as [K, 16] or, with
// TRANS, as [16, K] (W layout) and loaded transposed; ORIGIN addresses tiles by matrix_origin.
const uint sg = simdgroup_index_in_threadgroup;
const uint r0 = (sg / 2) * 8;
const uint c0 = (sg % 2) * 8;
const int K = a_shape[1];
simdgroup_matrix<T, 8, 8> acc = make_filled_simdgroup_matrix<T, 8, 8>(T(0));
for (int k = 0; k < K; k += 8) {
  simdgroup_matrix<T, 8, 8> am;
  simdgroup_matrix<T, 8, 8> bm;
  if (ORIGIN) {
    simdgroup_load(am, a, K, ulong2(k, r0));
  } else {
    simdgroup_load(am, a + r0 * K + k, K);
  }
  if (TRANS) {
    simdgroup_load(bm, b + c0 * K + k, K, ulong2(0, 0), true);
  } else {
    simdgroup_load(bm, b + k * 16 + c0, 16);
  }
  simdgroup_multiply_accumulate(acc, am, bm, acc);
}
if (ORIGIN) {
  simdgroup_store(acc, out, 16, ulong2(c0, r0));
} else {
  simdgroup_store(acc, out + r0 * 16 + c0, 16);
}
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("trans,origin", [(False, False), (True, False), (False, True)])
def test_simdgroup_matrix_gemm(dtype, trans, origin):
    K = 24
    a = np.random.randn(16, K).astype(np.float32)
    b = np.random.randn(K, 16).astype(np.float32)
    a_in = mx.array(a).astype(dtype)
    b_in = mx.array(b.T.copy() if trans else b).astype(dtype)
    (out,) = run(
        MMA,
        [a_in, b_in],
        [(16, 16)],
        [dtype],
        (128, 1, 1),
        (128, 1, 1),
        names=["a", "b"],
        template=[("T", dtype), ("TRANS", trans), ("ORIGIN", origin)],
    )
    ref = np.array(a_in.astype(F32)) @ np.array(
        b_in.astype(F32) if not trans else b_in.astype(F32).T
    )
    tol = 1e-6 if dtype == mx.float32 else 2e-3  # half: rounding of products and sums
    assert np.abs(np.array(out.astype(F32)) - ref).max() <= tol * np.abs(ref).max()


def test_simdgroup_matrix_gemm_bfloat():
    a = np.random.randn(16, 16).astype(np.float32)
    b = np.random.randn(16, 16).astype(np.float32)
    a_in, b_in = mx.array(a).astype(mx.bfloat16), mx.array(b).astype(mx.bfloat16)
    (out,) = run(
        MMA,
        [a_in, b_in],
        [(16, 16)],
        [mx.bfloat16],
        (128, 1, 1),
        (128, 1, 1),
        names=["a", "b"],
        template=[("T", mx.bfloat16), ("TRANS", False), ("ORIGIN", False)],
    )
    ref = np.array(a_in.astype(F32)) @ np.array(b_in.astype(F32))
    # bfloat16 accumulator: rounded after each of the two k-steps
    assert rel_err(out.astype(F32), ref) <= 2 * 2.0**-8


def test_simdgroup_barrier_orders_lanes():
    exchange = """
    threadgroup float t[64];
    const uint i = thread_index_in_threadgroup;
    t[i] = x[i];
    BARRIER
    out[i] = t[i ^ 1];
    """
    x = mx.arange(64).astype(F32)
    synced = exchange.replace("BARRIER", "simdgroup_barrier(mem_flags::mem_threadgroup);")
    (out,) = run(synced, [x], [(64,)], [F32], (64, 1, 1), (64, 1, 1), names=["x"])
    np.testing.assert_array_equal(np.array(out), np.arange(64) ^ 1)
    # Lanes are not assumed to run in lockstep: without the barrier this is a race.
    with pytest.raises(KernelRaceError):
        run(
            exchange.replace("BARRIER", ""),
            [x],
            [(64,)],
            [F32],
            (64, 1, 1),
            (64, 1, 1),
            names=["x"],
        )


def test_simdgroup_matrix_lane_layout():
    # thread_elements() must expose the elements where MLX's steel kernels expect them.
    source = """
    simdgroup_matrix<float, 8, 8> m;
    simdgroup_load(m, a, 8);
    const uint l = thread_index_in_simdgroup;
    out[2 * l] = m.thread_elements()[0];
    out[2 * l + 1] = m.thread_elements()[1];
    """
    a = mx.arange(64).astype(F32)
    (out,) = run(source, [a], [(64,)], [F32], (32, 1, 1), (32, 1, 1), names=["a"])
    lanes = np.arange(32)
    row = ((lanes // 4) & 4) + (lanes // 2) % 4
    col = ((lanes // 4) & 2) * 2 + (lanes % 2) * 2
    expected = np.stack([row * 8 + col, row * 8 + col + 1], axis=1).reshape(-1)
    np.testing.assert_array_equal(np.array(out), expected)


SIMD = """
const uint i = thread_position_in_grid.x;
if (i >= uint(n)) {
  return;  // these lanes are inactive for the simd functions below
}
const float v = x[i];
const uint lane = thread_index_in_simdgroup;
out0[i] = simd_sum(v);
out1[i] = simd_max(v);
out2[i] = simd_prefix_inclusive_sum(v);
out3[i] = simd_prefix_exclusive_sum(v);
out4[i] = simd_shuffle_xor(v, 1);
out5[i] = simd_shuffle_up(v, 3);
out6[i] = simd_broadcast(v, 2);
out7[i] = simd_shuffle(v, lane ^ 6);
"""


def test_simd_functions_over_partial_simdgroups():
    n = 72  # threadgroups of 64 and 32 threads; lanes 72..95 return at once
    x = np.random.randint(-50, 50, size=96).astype(np.float32)
    outs = run(
        SIMD,
        [mx.array(x), n],
        [(96,)] * 8,
        [F32] * 8,
        (96, 1, 1),
        (64, 1, 1),
        names=["x", "n"],
        init_value=0,
    )
    got = [np.array(o)[:n] for o in outs]
    exp = [np.zeros(n, np.float32) for _ in range(8)]
    for s in range(0, n, 32):
        v = x[s : min(s + 32, n)]
        lanes = np.arange(len(v))
        exp[0][s : s + len(v)] = v.sum()
        exp[1][s : s + len(v)] = v.max()
        exp[2][s : s + len(v)] = np.cumsum(v)
        exp[3][s : s + len(v)] = np.cumsum(v) - v
        exp[4][s : s + len(v)] = v[lanes ^ 1]
        exp[5][s : s + len(v)] = np.where(lanes >= 3, v[np.maximum(lanes - 3, 0)], v)
        exp[6][s : s + len(v)] = v[2]
        exp[7][s : s + len(v)] = v[lanes ^ 6]
    for k in range(8):
        np.testing.assert_array_equal(got[k], exp[k], err_msg=f"out{k}")


def test_shuffle_down_keeps_upper_lanes():
    source = "out[thread_position_in_grid.x] = simd_shuffle_down(x[thread_position_in_grid.x], 5);"
    x = np.arange(64).astype(np.float32)
    (out,) = run(source, [mx.array(x)], [(64,)], [F32], (64, 1, 1), (64, 1, 1), names=["x"])
    lanes = np.arange(64) % 32
    np.testing.assert_array_equal(np.array(out), np.where(lanes + 5 < 32, x + 5, x))


def test_thread_attributes_with_partial_threadgroup():
    # grid 8 x 3 in threadgroups of 4 x 2: the second row of threadgroups is one row tall.
    source = """
    const uint t = thread_position_in_grid.y * 8 + thread_position_in_grid.x;
    out[t * 8 + 0] = thread_position_in_threadgroup.x;
    out[t * 8 + 1] = thread_position_in_threadgroup.y;
    out[t * 8 + 2] = threadgroup_position_in_grid.y;
    out[t * 8 + 3] = threads_per_threadgroup.y;
    out[t * 8 + 4] = dispatch_threads_per_threadgroup.y;
    out[t * 8 + 5] = thread_index_in_threadgroup;
    out[t * 8 + 6] = threadgroups_per_grid.x * 10 + threadgroups_per_grid.y;
    out[t * 8 + 7] = simd_sum(1u);
    """
    (out,) = run(source, [mx.zeros((1,))], [(24 * 8,)], [mx.uint32], (8, 3, 1), (4, 2, 1))
    got = np.array(out).reshape(3, 8, 8)
    y, x = np.mgrid[0:3, 0:8]
    rows = np.where(y < 2, 2, 1)
    assert (got[..., 0] == x % 4).all() and (got[..., 1] == y % 2).all()
    assert (got[..., 2] == y // 2).all() and (got[..., 3] == rows).all()
    assert (got[..., 4] == 2).all()
    assert (got[..., 5] == (y % 2) * 4 + x % 4).all()
    assert (got[..., 6] == 22).all()
    assert (got[..., 7] == rows * 4).all()  # one simdgroup per threadgroup, of its size


def test_inputs_shapes_scalars_templates_init_value():
    source = """
    const uint i = thread_position_in_grid.x;
    if (i < 6) {
      out[i] = T(x[i] * alpha + x_shape[1] * 100 + x_strides[0] * 1000 + x_ndim * 10000 + N
                 + (B ? 7 : 0) + small[i % 3]);
    }
    """
    x = mx.arange(6).astype(mx.float16).reshape(2, 3)
    small = np.array([1, 2, 3], dtype=np.int32)  # NumPy inputs are taken too
    (out,) = run(
        source,
        [x, 0.5, small],
        [(8,)],
        [mx.float32],
        (8, 1, 1),
        (8, 1, 1),
        names=["x", "alpha", "small"],
        init_value=-1,
        template=[("T", mx.float32), ("N", 20), ("B", True)],
    )
    i = np.arange(6)
    expected = i * 0.5 + 300 + 3000 + 20000 + 20 + 7 + (i % 3 + 1)
    np.testing.assert_array_equal(np.array(out), np.concatenate([expected, [-1, -1]]))


def test_half_and_bfloat_conversions_and_arithmetic():
    source = """
    const uint i = thread_position_in_grid.x;
    out0[i] = half(x[i]);
    out1[i] = bfloat(x[i]);
    out2[i] = half(x[i]) * half(y[i]) + half(y[i]);
    out3[i] = float(bfloat(y[i]) / bfloat(x[i]));
    """
    special = [
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        1e6,
        -1e6,
        2.0**-24,
        2.0**-25,
        1.5 * 2.0**-25,
        2.0**-14 - 2.0**-25,
        1.0 + 2.0**-11,
        1.0 + 3 * 2.0**-11,
        np.inf,
        -np.inf,
        np.nan,
        3.3895314e38,
        1.00390625,
        1.01171875,
    ]
    rng = np.random.default_rng(0)
    x = np.concatenate([special, rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 7, 2000)])
    x = x.astype(np.float32)
    y = rng.standard_normal(len(x)).astype(np.float32)
    n = len(x)
    out = run(
        source,
        [mx.array(x), mx.array(y)],
        [(n,)] * 4,
        [mx.float16, mx.bfloat16, mx.float16, F32],
        (n, 1, 1),
        (256, 1, 1),
        names=["x", "y"],
    )
    with np.errstate(all="ignore"):  # overflow to inf is part of what is tested
        h = x.astype(np.float16)
        hy = y.astype(np.float16)
        h_ref = (h * hy) + hy  # numpy rounds each float16 operation, as MSL does
        bf = mx.array(x).astype(mx.bfloat16)
        by = np.array(mx.array(y).astype(mx.bfloat16).astype(F32))
        q = np.array(mx.array(by / np.array(bf.astype(F32))).astype(mx.bfloat16).astype(F32))
    np.testing.assert_array_equal(np.array(out[0]), h)
    assert np.array_equal(np.array(out[1].view(mx.uint16)), np.array(bf.view(mx.uint16)))
    np.testing.assert_array_equal(np.array(out[2]), h_ref)
    np.testing.assert_array_equal(np.array(out[3]), q)


def test_vector_types():
    source = """
    const uint i = thread_position_in_grid.x;
    const float4 v = ((const device float4*)x)[i];
    const uchar4 b = as_type<uchar4>(w[i]);
    float4 bf = float4(b);
    out[i] = dot(v, bf) + select(0.0f, 100.0f, all(v > float4(-10.0f))) + float2(v.x, v.w).y;
    """
    x = np.random.randn(16, 4).astype(np.float32)
    w = np.random.randint(0, 2**32, size=16, dtype=np.uint64).astype(np.uint32)
    (out,) = run(
        source, [mx.array(x), mx.array(w)], [(16,)], [F32], (16, 1, 1), (16, 1, 1), names=["x", "w"]
    )
    wb = w.view(np.uint8).reshape(16, 4).astype(np.float32)
    ref = (x * wb).sum(axis=1) + np.where((x > -10).all(axis=1), 100, 0) + x[:, 3]
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-6, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bugs the harness must catch.
# ------------------------------------------------------------------------------------------------
COPY = "const uint i = thread_position_in_grid.x;\n{body}"


# (body, report, the thread that faults first: forward runs place buffers against the upper guard
# and run thread 0 first; the reverse run places them against the lower guard)
@pytest.mark.parametrize(
    "body,pattern,thread",
    [
        (
            "out[i] = x[i + 1];",
            r"out-of-bounds read of buffer 'x' \(float, 64 elements\) "
            r"at element index 64",
            63,
        ),
        ("out[i] = x[int(i) - 1];", r"out-of-bounds read of buffer 'x' .* element index -1 ", 0),
        ("out[i + 1] = x[i];", r"out-of-bounds write of buffer 'out' .* element index 64 ", 63),
        (
            "threadgroup float tile[64];\ntile[i + 1] = x[i];\nout[i] = 0;",
            r"out-of-bounds write of threadgroup array 'tile' .* element index 64 ",
            63,
        ),
        ("out[i] = x[i + 4096];", r"out-of-bounds read of buffer 'x' .* element index 4096 ", 0),
    ],
)
def test_out_of_bounds_is_reported(body, pattern, thread):
    x = mx.arange(64).astype(F32)
    with pytest.raises(KernelRuntimeError, match=pattern) as err:
        run(
            COPY.format(body=body),
            [x],
            [(64,)],
            [F32],
            (64, 1, 1),
            (64, 1, 1),
            names=["x"],
            name="oob",
        )
    assert "kernel custom_kernel_oob_float_float" in str(err.value)
    assert f"thread_position_in_grid=({thread},0,0)" in str(err.value)


@pytest.mark.parametrize(
    "body,error,pattern",
    [
        (
            "if (i % 2 == 0) { out[i] = x[i]; }",
            KernelRaceError,
            "32 of 64 elements of output "
            "'out' hold the harness's poison bytes in every schedule: they are never written",
        ),
        (
            "threadgroup float t[64];\nout[i] = t[i];",
            KernelRaceError,
            "64 of 64 elements .* copied from uninitialised threadgroup memory",
        ),
        (
            "threadgroup float t[64];\nout[i] = x[i] + 0.5f * t[i];",
            KernelRaceError,
            "depends on the thread schedule",
        ),
        (
            "if (thread_index_in_simdgroup < 16) { out[i] = simd_sum(x[i]); }\n"
            "else { out[i] = simd_max(x[i]); }",
            KernelRuntimeError,
            "divergent simdgroup",
        ),
        (
            "if (i >= 60) { return; }\nthreadgroup_barrier(mem_flags::mem_threadgroup);\n"
            "out[i] = x[i];",
            KernelRuntimeError,
            "must reach each barrier",
        ),
        (
            "if (i < 32) { threadgroup_barrier(mem_flags::mem_threadgroup); }\nout[i] = x[i];",
            KernelRuntimeError,
            "must reach each barrier",
        ),
        (
            "if (thread_index_in_simdgroup < 16) { threadgroup_barrier(mem_flags::mem_none); }\n"
            "out[i] = simd_sum(x[i]);",
            KernelRuntimeError,
            "no progress",
        ),
        (
            "out[i] = simd_shuffle(x[i], thread_index_in_simdgroup + 1);",
            KernelRuntimeError,
            "reads lane 32, which is not an active lane",
        ),
        (
            "threadgroup float big[9000];\nbig[i] = 0;\nout[i] = x[i];",
            KernelRuntimeError,
            "exceeds the 32 KiB",
        ),
        (
            "simdgroup_matrix<float, 8, 8> m;\nsimdgroup_load(m, x + (i % 2) * 8, 8);\nout[i] = 0;",
            KernelRuntimeError,
            "arguments differ between lanes",
        ),
        ("out[i] = float(i / uint(x[0]));", KernelRuntimeError, "integer division by zero"),
    ],
)
def test_execution_errors_are_reported(body, error, pattern):
    x = mx.arange(64).astype(F32)
    with pytest.raises(error, match=pattern):
        run(COPY.format(body=body), [x], [(64,)], [F32], (64, 1, 1), (64, 1, 1), names=["x"])


def test_ragged_grid_with_multirow_threadgroups_is_refused():
    with pytest.raises(KernelRuntimeError, match="linear thread order"):
        run("out[0] = 0;", [mx.zeros((1,))], [(1,)], [F32], (6, 4, 1), (4, 2, 1))


@pytest.mark.parametrize(
    "body,pattern",
    [
        ("out[0] = quad_sum(1.0f);", "quad_sum is not supported"),
        ("out[0] = simd_lane_id;", "simd_lane_id"),  # not one of MLX's attributes
        ("threadgroup float a[4], b[4];\nout[0] = 0;", "one `threadgroup T name"),
        ("threadgroup float a = 1.0f;\nout[0] = a;", "unsupported use of 'threadgroup'"),
    ],
)
def test_unsupported_features_fail_to_compile(body, pattern):
    with pytest.raises(KernelCompileError, match=pattern):
        run(body, [mx.zeros((1,))], [(1,)], [F32], (1, 1, 1), (1, 1, 1))


def test_other_versions_prebuilt_headers_are_dropped_only_when_idle(tmp_path, monkeypatch):
    """Two checkouts with different harness versions can test at once: neither may delete the
    other's precompiled header while it is in use, but idle ones (a day) are cleaned up."""
    from metal_harness import driver

    monkeypatch.setenv("MSL_HARNESS_CACHE", str(tmp_path))
    mine, busy, idle = (tmp_path / f"prebuilt-{n}" for n in ("mine", "busy", "idle"))
    for d in (mine, busy, idle):
        (d / "x").mkdir(parents=True)
    day_and_more = driver.PREBUILT_IDLE_S + 60
    old = (tmp_path / "prebuilt-idle").stat().st_mtime - day_and_more
    os.utime(idle, (old, old))
    os.utime(mine, (old, old))  # idle too, but it is the one being used
    driver.drop_stale_prebuilt(keep=mine)
    assert mine.exists() and busy.exists() and not idle.exists()
