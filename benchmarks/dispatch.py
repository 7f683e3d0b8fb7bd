"""Where the time of one packed matmul call goes at M = 1: wall clock, host-side graph building and
GPU kernel time, against MLX's bf16 matmul and stock 2-bit quantized_matmul. Needs a GPU.

    python benchmarks/dispatch.py                 # the model's (N, K) shapes, M = 1
    python benchmarks/dispatch.py --json out.json

Per path and shape:
- wall: `kernels.time_call` (batches of 20 calls evaluated together, median of 9), as
  benchmarks/kernels.py times M = 1;
- build: host time to build one call's graph node (Python and MLX, no evaluation), mean of 200;
- gpu: the GPU time of the call's kernels per call (torch.profiler / CUPTI; CUDA only).
Paths: "kernel" = KernelSet.run (the kernel alone, what benchmarks/kernels.py times),
"packed_matmul" = the dispatch (checks, strategy, self-check lookup), "Linear" = quant.Linear;
"floor, N KB" = a one-line custom kernel whose text carries N KB of header: what any call of
MLX's custom kernels costs, and what their text's length adds (MLX assembles the whole text on
every call and hashes it at every evaluation).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable

import mlx.core as mx
from kernels import NK  # benchmarks/kernels.py (on sys.path when run as a script): the shapes
from step import kernel_summary, trace_problem

from mlx_bonsai import kernels, quant


def build_us(fn: Callable[[], mx.array], calls: int = 200) -> float:
    start = time.perf_counter()
    outs = [fn() for _ in range(calls)]
    seconds = time.perf_counter() - start
    mx.eval(outs)
    return seconds / calls * 1e6


def gpu_us(fn: Callable[[], mx.array], calls: int = 20) -> float | None:
    """Total CUDA kernel time per call (step.py's CUPTI summary), or None where torch's profiler
    cannot see the GPU's kernels."""
    if trace_problem():
        return None
    mx.eval(fn())
    try:
        summary = kernel_summary(lambda: [fn() for _ in range(calls)], ())
    except RuntimeError:  # CUPTI recorded nothing
        return None
    return summary["kernel_ms"] * 1e3 / calls


def floor_kernel(backend: str, header_kb: int) -> Callable[[], mx.array]:
    """A call of a one-line custom kernel (copy 128 floats) with `header_kb` KB of comment."""
    if backend == "cuda":
        factory, body = mx.fast.cuda_kernel, "out[threadIdx.x] = a[threadIdx.x];"
    else:
        factory, body = mx.fast.metal_kernel, "uint i = thread_position_in_grid.x; out[i] = a[i];"
    kernel = factory(name=f"floor_{header_kb}", input_names=["a"], output_names=["out"],
                     source=body, header="// padding\n" * (header_kb * 1024 // 11))
    a = mx.zeros((128,))
    mx.eval(a)
    return lambda: kernel(inputs=[a], template=[("T", mx.float32)], grid=(128, 1, 1),
                          threadgroup=(128, 1, 1), output_shapes=[(128,)],
                          output_dtypes=[mx.float32])[0]


def paths(backend: str, n: int, k: int) -> dict[str, Callable[[], mx.array]]:
    kx, kw = mx.random.split(mx.random.key(n + k))
    x = mx.random.normal((1, k), key=kx).astype(mx.bfloat16)
    dense = (mx.random.normal((n, k), key=kw) * 0.02).astype(mx.bfloat16)
    q2 = mx.quantize(dense, group_size=128, bits=2)
    mx.eval(x, dense, *q2)
    out = {
        "bf16": lambda: x @ dense.T,
        "q2": lambda: mx.quantized_matmul(x, *q2, transpose=True, group_size=128, bits=2),
    }
    ks = kernels.kernel_set(backend)
    for kind in kernels.KINDS:
        weight, scales = kernels.random_packed(kind, n, k, key=kw)
        linear = quant.Linear(k, n)
        linear.set_storage(kind, scale_dtype=mx.bfloat16)
        linear.update({"weight": weight, "scales": scales})
        mx.eval(weight, scales)
        out[f"{kind} kernel"] = functools.partial(ks.run, "gemv", x, weight, scales, kind)
        out[f"{kind} packed_matmul"] = functools.partial(kernels.packed_matmul, x, weight,
                                                         scales, kind)
        out[f"{kind} Linear"] = functools.partial(linear, x)
    for header_kb in (0, 16):
        out[f"floor, {header_kb} KB"] = floor_kernel(backend, header_kb)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    backend = kernels._device_backend()
    if backend is None:
        sys.exit("dispatch.py needs MLX on a Metal or CUDA GPU")
    results = dict(mlx=mx.__version__, device=str(mx.device_info()), rows=[])
    for n, k in NK:
        for label, fn in paths(backend, n, k).items():
            row = dict(n=n, k=k, path=label,
                       wall_us=kernels.time_call(fn, warmup=5, repeats=9, calls=20,
                                                 together=True) * 1e6,
                       build_us=build_us(fn), gpu_us=gpu_us(fn))
            results["rows"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    labels = list(dict.fromkeys(r["path"] for r in results["rows"]))
    print(f"M = 1, bf16 x; us per call: wall / build / gpu   ({backend}, MLX {mx.__version__})")
    print(f"{'N x K':>12} " + " ".join(f"{label:>22}" for label in labels))
    for n, k in NK:
        cells = []
        for label in labels:
            r = next(r for r in results["rows"] if (r["n"], r["k"], r["path"]) == (n, k, label))
            gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.1f}"
            cells.append(f"{r['wall_us']:.1f} / {r['build_us']:.1f} / {gpu}")
        print(f"{n:>6}x{k:<5} " + " ".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
