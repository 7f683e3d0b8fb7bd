"""Packed-matmul kernels against MLX at Bonsai Image 4B's linear shapes. Needs a Metal or CUDA GPU.

    python benchmarks/kernels.py                  # GPU checks, then the timing table
    python benchmarks/kernels.py --json out.json  # also every number as JSON
    python benchmarks/kernels.py --rounds 3       # medians of 3 rounds, every call in turn
    python benchmarks/kernels.py --profile gemm binary 4608 3072 3072   # 3 calls, for a profiler
    python benchmarks/kernels.py --gemm-tile 128,2,2   # also check and time another GEMM tile
    python benchmarks/kernels.py --wgmma-tile 128,2,4  # ... another wgmma tile (BM,WG,STAGES)

Checks (each fails the run): every strategy and kind at every benchmark shape, and a sweep of
dtypes (bf16, fp16, fp32) and ragged shapes, on fresh random inputs with outputs poisoned with NaN
(init_value) so unwritten elements fail; relative error max|y - ref| / max|ref| <= 1e-2 against
x(float32) @ W(float32)^T, NaN never passes. Where the device holds ternary layers as digit
words (Hopper; kernels.holds_ternary_words), the kernels that take them (gemv:words,
wgmma:words) are checked on the words the GPU pass makes too. Then the dispatch (packed_matmul)
must pass its self-checks without a warning, on base-3 bytes and on held words.
Timing: median time per call (`kernels.time_call`: runs of calls, each queued as its own
evaluation so that the GPU runs them one after another, as a model's dependent layers run; at
M = 1, where the host decides, each run's calls are evaluated together) of MLX's bf16 matmul (the
ceiling), MLX's quantized_matmul with bits 2 and 1 (where the backend has it), and our kernels
per strategy, launched as packed_matmul's plans launch them (`KernelSet.launcher`: kernel,
template and grid decided once per shape), ternary gemv and wgmma on digit words where the device
holds them (then "gemv-bytes" and "wgmma-bytes" are the same kernels on base-3 bytes, the wgmma
one with its per-call pass, for comparison); TFLOP/s = 2*M*N*K / time. With --rounds R, each
shape's calls are timed in R rounds, every call once per round (each round starting one call
later), and the median round counts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import platform
import statistics
import sys
import warnings

import mlx.core as mx

from mlx_bonsai import kernels
from mlx_bonsai.kernels import (
    GEMV_MAX_M,
    KINDS,
    STRATEGIES,
    kernel_set,
    random_packed,
    relative_error,
)

# (N, K) of the packed linears: qkv/out 3072x3072, ff in 18432, single qkv+mlp 27648, ff out
# 3072x9216, single out 3072x12288 (plus 9216x3072 as asked for).
NK = [(3072, 3072), (9216, 3072), (18432, 3072), (27648, 3072), (3072, 9216), (3072, 12288)]
MS = [1, 64, 1536, 4608]
TOLERANCE = 1e-2

SWEEP = [  # (M, N, K): ragged M and N (N % 4 != 0: the GEMV's 4-row blocks too), K multiples
    # of 128 but not of 512
    (1, 201, 384), (2, 202, 384), (3, 3001, 640), (5, 74, 1152), (64, 203, 384), (70, 201, 384),
    (135, 3003, 640), (300, 74, 384), (129, 1035, 3072),
]


def reference(x: mx.array, weight: mx.array, scales: mx.array, kind: str) -> mx.array:
    return kernels.reference_matmul(x.astype(mx.float32), weight, scales, kind)


def inputs(kind, m, n, k, dtype, scale_dtype, seed):
    kx, kw = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((m, k), key=kx).astype(dtype)
    weight, scales = random_packed(kind, n, k, scale_dtype, key=kw)
    mx.eval(x, weight, scales)
    return x, weight, scales


def candidates(ks, m, dtype, extra_tiles=(), extra_wgmma=()):
    """{label: (strategy, variant or None)} worth running at m rows.

    extra_tiles adds GEMM variants with other (BM, WM, WN) tiles (gemm@BMxWMxWN), extra_wgmma
    wgmma variants with other (BM, WG, STAGES) (wgmma@BMxWGxSTAGES)."""
    out = {s: (s, None) for s in STRATEGIES
           if ks.supports(s, dtype) and (s != "gemv" or m <= GEMV_MAX_M)}
    for strategy, tiles in (("gemm", extra_tiles), ("wgmma", extra_wgmma)):
        for tile in tiles if strategy in out else ():
            out[f"{strategy}@" + "x".join(map(str, tile))] = (strategy, tile)
    return out


def check(ks, failures, kind, m, n, k, dtype, scale_dtype, seed, extra=((), ()),
          misaligned=False):
    x, weight, scales = inputs(kind, m, n, k, dtype, scale_dtype, seed)
    ref = reference(x, weight, scales, kind)
    if misaligned:  # x 2 or 4 bytes past an aligned address: the kernels' element-wise loads
        x = kernels.misaligned(x)
    errs = {}
    # The words this device would hold (made once by the GPU pass), for the kernels that read them.
    words = kernels.ternary_words(weight) if kind == "ternary" and holds_words(dtype) else None
    for s, (strategy, variant) in candidates(ks, m, dtype, *extra).items():
        if misaligned and s.startswith("scratch") and ks.backend == "cuda":
            continue  # MLX's CUDA matmul itself rejects such x (cuBLASLt error 15), dense too
        runs = [(s, weight)]
        if words is not None and ks.takes_words(strategy):
            runs.append((f"{s}:words", words))
        for label, w in runs:
            y = ks.run(strategy, x, w, scales, kind, init_value=math.nan, variant=variant)
            err = relative_error(y, ref)
            errs[label] = err
            if not err <= TOLERANCE:
                failures.append(f"{kind} {label} {dtype} M={m} N={n} K={k}: rel err {err}")
    return errs


def holds_words(dtype) -> bool:
    """Whether this device holds ternary layers as digit words for `dtype` activations."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing pass self-check fails the run
        return kernels.holds_ternary_words(dtype)


def run_checks(ks, extra):
    failures, log = [], []
    seed = 100
    for m in MS:
        for n, k in NK:
            for kind in KINDS:
                seed += 1
                errs = check(ks, failures, kind, m, n, k, mx.bfloat16, mx.bfloat16, seed,
                             extra=extra)
                log.append(dict(M=m, N=n, K=k, kind=kind, dtype="bfloat16", errors=errs))
    for i, (m, n, k) in enumerate(SWEEP):
        for dtype in (mx.bfloat16, mx.float16, mx.float32):
            for kind in KINDS:
                seed += 1
                scale_dtype = mx.float16 if dtype == mx.float16 else mx.bfloat16
                errs = check(ks, failures, kind, m, n, k, dtype, scale_dtype, seed, extra,
                             misaligned=i % 2 == 1)
                log.append(dict(M=m, N=n, K=k, kind=kind, dtype=str(dtype), errors=errs,
                                misaligned=i % 2 == 1))
    # The dispatch: self-checks must pass (a warning is an error here) and answers must match,
    # also inside fused_only() (the low-memory pipeline's choices).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype, kind, fused in itertools.product((mx.bfloat16, mx.float16, mx.float32), KINDS,
                                                    (False, True)):
            for m in (1, 3, 100, 1536, 4608):
                seed += 1
                x, weight, scales = inputs(kind, m, 3072, 3072, dtype, mx.bfloat16, seed)
                held = [weight]
                if kind == "ternary" and holds_words(dtype):
                    held.append(kernels.ternary_words(weight))
                for w in held:
                    with kernels.fused_only() if fused else contextlib.nullcontext():
                        y = kernels.packed_matmul(x, w, scales, kind)
                    err = relative_error(y, reference(x, weight, scales, kind))
                    if not err <= TOLERANCE:
                        failures.append(f"packed_matmul {kind} ({w.dtype}) {dtype} M={m} "
                                        f"fused_only={fused}: rel err {err}")
    worst = max((e for row in log for e in row["errors"].values()), default=math.nan)
    print(f"checks: {sum(len(r['errors']) for r in log)} kernel runs + dispatch, "
          f"worst rel err {worst:.2e}, {len(failures)} failures")
    for f in failures:
        print("  FAIL", f)
    return failures, log


def baseline_quantized(x, dense, bits):
    """MLX's own affine quantized matmul of `dense`, or None where the backend refuses `bits`."""
    try:
        wq, sq, bq = mx.quantize(dense, group_size=128, bits=bits)
        fn = functools.partial(mx.quantized_matmul, x, wq, sq, bq, transpose=True,
                               group_size=128, bits=bits)
        mx.eval(fn())
        return fn
    except (RuntimeError, ValueError):
        return None


def baselines(x, weight, scales):
    """{label: fn}: bf16 matmul with the decoded weight, and MLX's quantized_matmul of it at bits
    2 and 1 (None where the backend refuses them)."""
    dense = kernels.unpack_binary(weight, scales, mx.bfloat16)
    mx.eval(dense)
    return {"bf16": lambda: x @ dense.T,
            **{f"q{bits}": baseline_quantized(x, dense, bits) for bits in (2, 1)}}


def run_timing(ks, extra, rounds):
    """Per shape, `rounds` rounds that each time every baseline and candidate once, in turn;
    the median round counts (the bf16 baseline alone moved by up to 20% between runs at the
    largest shapes on an H100: one run's single pass made the 1.10x counts noisy). Each round
    starts one call later, so that no call always runs first."""
    rows = []
    for m in MS:
        for n, k in NK:
            flop = 2.0 * m * n * k
            x, wb, sb = inputs("binary", m, n, k, mx.bfloat16, mx.bfloat16, 7)
            _, wt, st = inputs("ternary", m, n, k, mx.bfloat16, mx.bfloat16, 8)
            calls = 50 if flop < 1e10 else 10 if flop < 1e11 else 3
            fns = baselines(x, wb, sb)
            cands = candidates(ks, m, mx.bfloat16, *extra)
            words = kernels.ternary_words(wt) if holds_words(mx.bfloat16) else None
            for kind, w, s in (("binary", wb, sb), ("ternary", wt, st)):
                for label, (strategy, variant) in cands.items():
                    held = words is not None and kind == "ternary" and ks.takes_words(strategy)
                    launch = ks.launcher(strategy, m, n, k, mx.bfloat16, mx.bfloat16, kind,
                                         variant=variant, words=held)
                    fns[f"{kind}_{label}"] = functools.partial(launch, x, words if held else w, s)
                    if held and label in kernels.WORDS_STRATEGIES:  # the same on base-3 bytes
                        launch = ks.launcher(strategy, m, n, k, mx.bfloat16, mx.bfloat16, kind)
                        fns[f"{kind}_{label}-bytes"] = functools.partial(launch, x, w, s)
            runs = {key: [] for key, fn in fns.items() if fn}
            keys = list(runs)
            for r in range(rounds):
                for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                    runs[key].append(kernels.time_call(fns[key], repeats=7, calls=calls,
                                                       together=m == 1))  # see time_call
            row = dict(M=m, N=n, K=k, **{key: (statistics.median(runs[key]) if key in runs
                                                else None) for key in fns})
            if rounds > 1:
                row["rounds"] = runs
            row["auto"] = kernels.choose_strategy(ks.backend, "binary", m, n, k, mx.bfloat16)
            rows.append(row)
            best = min(row[f"binary_{label}"] for label in cands)
            print(f"  M={m:5d} N={n:6d} K={k:6d} bf16 {row['bf16'] * 1e3:8.3f} ms  "
                  f"binary best {best * 1e3:8.3f} ms", flush=True)
    return rows


def fmt_ms(t):
    return "   n/a" if t is None else f"{t * 1e3:7.3f}"


def print_table(rows, labels):
    print("\nStrategy times (ms per call), binary / ternary:")
    print(f"{'M':>5} {'N':>6} {'K':>6} | " + " | ".join(f"{s:>15}" for s in labels))
    for r in rows:
        cells = []
        for s in labels:
            b, t = r.get(f"binary_{s}"), r.get(f"ternary_{s}")
            cells.append(f"{fmt_ms(b)}/{fmt_ms(t)}" if b or t else f"{'-':>15}")
        print(f"{r['M']:5d} {r['N']:6d} {r['K']:6d} | " + " | ".join(cells))
    print("\nTime per call (ms); ours = best strategy [name]; ratios ours/bf16 and q2/ours:")
    head = (f"{'M':>5} {'N':>6} {'K':>6} | {'bf16':>7} {'q2':>7} {'q1':>7} | "
            f"{'binary':>7} {'':9} {'ternary':>7} {'':9} | {'bin/bf16':>8} {'ter/bf16':>8} "
            f"{'q2/bin':>7} {'q2/ter':>7} | {'TF/s bf16':>9} {'bin':>6} {'ter':>6} | trit cost")
    print(head)
    for r in rows:
        best = {}
        for kind in KINDS:  # the best strategy on the layout the device holds
            cand = {s: r[f"{kind}_{s}"] for s in labels
                    if f"{kind}_{s}" in r and not s.endswith("-bytes")}
            s = min(cand, key=cand.get)
            best[kind] = (s, cand[s])
        tb, tt = best["binary"][1], best["ternary"][1]
        flop = 2.0 * r["M"] * r["N"] * r["K"]
        # Base-3 decode cost: ternary over binary time in the same strategy (binary's best).
        sb = best["binary"][0]
        trit = r[f"ternary_{sb}"] / r[f"binary_{sb}"] - 1
        q2 = r["q2"]
        print(f"{r['M']:5d} {r['N']:6d} {r['K']:6d} | {fmt_ms(r['bf16'])} {fmt_ms(q2)} "
              f"{fmt_ms(r['q1'])} | {fmt_ms(tb)} [{best['binary'][0]:7}] {fmt_ms(tt)} "
              f"[{best['ternary'][0]:7}] | {tb / r['bf16']:8.2f} {tt / r['bf16']:8.2f} "
              f"{(q2 / tb if q2 else math.nan):7.2f} {(q2 / tt if q2 else math.nan):7.2f} | "
              f"{flop / r['bf16'] / 1e12:9.1f} {flop / tb / 1e12:6.1f} {flop / tt / 1e12:6.1f} | "
              f"{trit * 100:+6.1f}% ({sb})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--profile", nargs=5, metavar=("STRATEGY", "KIND", "M", "N", "K"))
    p.add_argument("--gemm-tile", action="append", default=[], metavar="BM,WM,WN",
                   help="also check and time the GEMM with this tile")
    p.add_argument("--wgmma-tile", action="append", default=[], metavar="BM,WG,STAGES",
                   help="also check and time the wgmma kernel with this tile (Hopper)")
    p.add_argument("--m", type=int, nargs="+", help="time these M instead of " + str(MS))
    p.add_argument("--no-check", action="store_true", help="timing only")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each shape's calls in this many rounds, in turn; report medians")
    args = p.parse_args()
    extra_tiles = [tuple(int(v) for v in t.split(",")) for t in args.gemm_tile]
    extra_wgmma = [tuple(int(v) for v in t.split(",")) for t in args.wgmma_tile]
    extra = (extra_tiles, extra_wgmma)
    backend = kernels._device_backend()
    if backend is None:
        print("benchmarks/kernels.py needs MLX on a Metal or CUDA GPU", file=sys.stderr)
        return 2
    ks = kernel_set(backend)
    info = dict(mlx=mx.__version__, backend=backend, device=mx.device_info(),
                python=platform.python_version())
    print(json.dumps(info, default=str))
    if args.profile:
        label, kind, m, n, k = args.profile
        strategy, variant = candidates(ks, int(m), mx.bfloat16, *extra)[label]
        x, w, s = inputs(kind, int(m), int(n), int(k), mx.bfloat16, mx.bfloat16, 3)
        for _ in range(3):
            mx.eval(ks.run(strategy, x, w, s, kind, variant=variant))
        return 0
    if args.m:
        MS[:] = args.m
    failures, check_log = ([], []) if args.no_check else run_checks(ks, extra)
    rows = [] if args.check_only else run_timing(ks, extra, args.rounds)
    if rows:
        labels = (list(STRATEGIES) + ["gemm@" + "x".join(map(str, t)) for t in extra_tiles]
                  + ["wgmma@" + "x".join(map(str, t)) for t in extra_wgmma])
        labels += [f"{s}-bytes" for s in kernels.WORDS_STRATEGIES
                   if any(f"ternary_{s}-bytes" in r for r in rows)]
        print_table(rows, labels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, checks=check_log, failures=failures, timing=rows), f,
                      indent=1, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
