"""One transformer denoising step at the full 4B shapes: dense bf16 vs bonsai-packed binary/ternary.

    python benchmarks/step.py                          # 512^2 and 1024^2, eager and mx.compile
    python benchmarks/step.py --blocks --json step.json   # also one double and one single block
    python benchmarks/step.py --trace                  # also the top CUDA kernels of one step
    python benchmarks/step.py --tune                   # kernels.tune() each packed shape first
    python benchmarks/step.py --float32                # also bf16 eager/compiled vs a float32 step
    python benchmarks/step.py --deadline 420           # skip what is left after 420 s
    python benchmarks/step.py --tiny --blocks          # toy size on a CPU (seconds), as a check
    python benchmarks/step.py --layers 1,1 --sizes 256   # full widths, 2 blocks: a quick GPU check

Run from the repository root (PYTHONPATH=. where mlx_bonsai is not installed). Needs no files:
the model is built in memory with random weights. Every packed linear of docs/format.md §2 gets
random codes from `kernels.random_packed` (one binary and one ternary set, the same in every run);
"dense" is the exact bf16 decode of the binary codes, so dense and binary compute the same
function. All other weights are random bf16 shared by the variants. One variant is held at a
time; its codes are drawn again when it is built.

Per variant and size (batch 1, (size/16)^2 image tokens, 512 text tokens (--tiny: 16), sigma 0.7,
bf16 activations):
- step time: median of --repeats synchronous steps (`mx.eval(model(...))`, wall clock) after 2
  warm-up steps, per mode (--modes): eager (the model as the pipeline runs it: its elementwise
  chains compiled), unfused (the same with mx.disable_compile(): every operation its own kernel),
  blocks (evaluate_blocks=True inside kernels.fused_only(): the low-memory pipeline), compiled
  (the whole step in mx.compile; a failed compile is recorded, the run goes on), loop (4 steps
  chained by scheduler.euler_loop as the default pipeline denoises, each step's graph built while
  the GPU runs the previous one; time per step; no parity, as its output is that of 4 steps);
- memory: MLX active memory before a step (resident: weights and inputs) and the step's peak
  above it (max over the timed steps);
- parity: max|a-b| / max|b| in float32 of each step's output against the eager dense step
  (binary: same function, so 0 or bf16 rounding) or, for ternary, against its own eager step;
  and, for dense and binary, against the dense step computed in float32 (weights and
  activations; sigma rounded as the bf16 model rounds it): the error bf16 itself makes, eager or
  compiled;
- --blocks: model.transformer_blocks[0] and model.single_transformer_blocks[0] alone, the same way;
- --trace (CUDA only, best effort): GPU kernels of one eager step via torch.profiler (CUPTI), top 15
  by total device time, and the time the GPU ran any kernel (MLX's CUDA graphs run independent
  kernels concurrently); MLX launches through CUDA graphs, which CUPTI may not attribute.
Progress goes out line by line; --json is rewritten after every measurement; the table comes last,
also after --deadline, SIGTERM or Ctrl-C. Exit status: 1 if a measurement failed, 2 if interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_bonsai import kernels, quant
from mlx_bonsai.convert.layout import packed_layers, transformer_shapes
from mlx_bonsai.convert.sizes import FULL_CONFIG
from mlx_bonsai.scheduler import SchedulerConfig, euler_loop, sigmas
from mlx_bonsai.transformer import (
    Transformer,
    TransformerConfig,
    image_ids,
    load_weights,
    text_ids,
)

# Widths are multiples of 128, as every packed linear's in_features must be; 1 + 1 blocks.
TINY_CONFIG = dict(FULL_CONFIG, num_layers=1, num_single_layers=1, attention_head_dim=64,
                   num_attention_heads=2, joint_attention_dim=256, axes_dims_rope=[16] * 4)
VARIANTS = ("dense", "binary", "ternary")  # dense first: the others' parity needs its output
CODES = {"dense": "binary", "binary": "binary", "ternary": "ternary"}
SEEDS = {"common": 0, "binary": 1, "ternary": 2, "inputs": 3}
SIGMA = 0.7
WARMUP = 2
ENV_VARS = ("MLX_BONSAI_KERNELS", "MLX_MAX_MB_PER_BUFFER", "MLX_MAX_OPS_PER_BUFFER")
BF16 = mx.bfloat16
WHATS = ("step", "double", "single")
MODES = ("eager", "unfused", "blocks", "compiled", "loop")
LOOP_STEPS = 4

Key = tuple[int, str, str, str]  # (size, variant, what, mode)


# -- the model ---------------------------------------------------------------------------------


def common_weights(config: dict[str, Any], packed: set[str]) -> dict[str, mx.array]:
    """Every checkpoint tensor that is not a packed linear: random bf16, linears N(0, 1/fan_in)
    (keeps activations O(1)), norm weights 1 + 0.1 N(0, 1)."""
    names = [(n, shape) for n, shape in transformer_shapes(config, "config").items()
             if n.removesuffix(".weight") not in packed]
    keys = mx.random.split(mx.random.key(SEEDS["common"]), len(names))
    out = {}
    for (name, shape), key in zip(names, keys, strict=True):
        w = mx.random.normal(shape, key=key)
        w = 1 + 0.1 * w if len(shape) == 1 else w / shape[-1] ** 0.5
        out[name] = w.astype(BF16)
        mx.eval(out[name])  # one at a time: no float32 copy of all of them at once
    return out


def build_model(config: dict[str, Any], variant: str,
                common: dict[str, mx.array]) -> Transformer:
    """The transformer of `variant` with the shared `common` weights and fresh packed codes
    (the same codes each time: one fixed key per layer), loaded as a checkpoint is."""
    shapes = transformer_shapes(config, "config")
    kind = CODES[variant]
    layers = packed_layers(config)
    keys = mx.random.split(mx.random.key(SEEDS[kind]), len(layers))
    weights = dict(common)
    for name, key in zip(layers, keys, strict=True):
        n_out, n_in = shapes[f"{name}.weight"]
        w, s = kernels.random_packed(kind, n_out, n_in, key=key)
        if variant == "dense":
            # Evaluated per layer: the decode's temporaries (4 bytes a weight) stay one layer big.
            weights[f"{name}.weight"] = kernels.unpack_binary(w, s, BF16)
        else:
            weights[f"{name}.weight"], weights[f"{name}.scales"] = w, s
            mx.eval(s)
        mx.eval(weights[f"{name}.weight"])
    model = Transformer(TransformerConfig.from_dict(config))
    load_weights(model, weights, "random weights")  # strict: every tensor, in its shape
    del weights
    mx.eval(model.parameters())  # the fused q/k/v concatenations, before any timing
    return model


def model_bytes(model: Transformer) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def step_inputs(model: Transformer, size: int, n_txt: int) -> tuple[mx.array, ...]:
    """(x, context, t, cos, sin) of one step: the same random values for every variant."""
    cfg = model.config
    side = size // 16
    kx, kc = mx.random.split(mx.random.key(SEEDS["inputs"] + size))
    x = mx.random.normal((1, side * side, cfg.in_channels), key=kx).astype(BF16)
    ctx = mx.random.normal((1, n_txt, cfg.joint_attention_dim), key=kc).astype(BF16)
    t = mx.array([SIGMA], dtype=BF16)
    cos, sin = model.rope(text_ids(n_txt), image_ids(side, side))
    mx.eval(x, ctx, t, cos, sin)
    return x, ctx, t, cos, sin


def float32_step(model: Transformer, inputs: tuple[mx.array, ...]) -> mx.array:
    """The step of a dense bf16 model computed in float32; the model is bf16 again afterwards
    (bf16 -> float32 -> bf16 is exact)."""
    x, ctx, t, cos, sin = inputs
    params = model.parameters()
    model.update(tree_map(lambda a: a.astype(mx.float32), params))
    try:
        # The bf16 model rounds sigma * 1000 to bf16 (Transformer.__call__): give float32 the
        # same timestep, so that only the arithmetic differs.
        t32 = (t.astype(BF16) * 1000).astype(mx.float32) / 1000
        out = model(x.astype(mx.float32), ctx.astype(mx.float32), t32, (cos, sin))
        mx.eval(out)
    finally:
        model.update(params)
    return out


def block_inputs(model: Transformer, inputs: tuple[mx.array, ...]) -> dict[str, tuple]:
    """Arguments of one double and one single block: random bf16 streams, the modulations the
    model computes from t, the step's RoPE tables."""
    x, ctx, t, cos, sin = inputs
    dim, n_img, n_txt = model.config.dim, x.shape[1], ctx.shape[1]
    kx, kc, ks = mx.random.split(mx.random.key(SEEDS["inputs"] + n_img), 3)
    img = mx.random.normal((1, n_img, dim), key=kx).astype(BF16)
    txt = mx.random.normal((1, n_txt, dim), key=kc).astype(BF16)
    joint = mx.random.normal((1, n_txt + n_img, dim), key=ks).astype(BF16)
    temb = model.time_guidance_embed(t.astype(BF16) * 1000)  # as Transformer.__call__ does
    mod_img = model.double_stream_modulation_img(temb)
    mod_txt = model.double_stream_modulation_txt(temb)
    mod_single = model.single_stream_modulation(temb)
    args = {"double": (img, txt, mod_img, mod_txt, cos, sin),
            "single": (joint, mod_single, cos, sin)}
    mx.eval(args)
    return args


# -- measuring ---------------------------------------------------------------------------------


def time_calls(fn: Callable[..., Any], args: tuple, repeats: int) -> tuple[dict[str, Any], Any]:
    """Warm-up calls, then `repeats` timed synchronous ones; (numbers, first warm-up output)."""
    start = time.perf_counter()
    first = fn(*args)
    mx.eval(first)
    first_s = time.perf_counter() - start  # includes tracing / kernel builds on first use
    for _ in range(WARMUP - 1):
        mx.eval(fn(*args))
    resident = mx.get_active_memory()
    times, peaks = [], []
    for _ in range(repeats):
        mx.synchronize()  # the last call's buffers are released when the GPU has run it
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - start)
        peaks.append(mx.get_peak_memory() - before)
    numbers = dict(ms=statistics.median(times) * 1e3, times_ms=[t * 1e3 for t in times],
                   first_ms=first_s * 1e3, resident_bytes=resident,
                   peak_above_bytes=max(peaks))
    return numbers, first


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in us, in ms: the time the GPU ran at least
    one kernel (MLX's CUDA graphs run independent kernels concurrently, so the kernels' summed
    time can exceed it)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def kernel_summary(fn: Callable[..., Any], args: tuple) -> dict[str, Any]:
    """GPU activity (kernels, copies) of one call recorded by torch.profiler: per name, count and
    total ms; wall_ms is the call's wall clock under the profiler, busy_ms the time at least one
    kernel ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()  # inside: profiler start-up (CUPTI) is not the step's
        mx.eval(fn(*args))
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    totals: dict[str, list[float]] = {}
    intervals = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us() / 1e3
            intervals.append((event.time_range.start, event.time_range.end))
    if not totals:
        raise RuntimeError("the profiler recorded no CUDA kernels (CUPTI did not see MLX's)")
    rows = sorted(({"name": n, "count": c, "total_ms": ms} for n, (c, ms) in totals.items()),
                  key=lambda r: -r["total_ms"])
    return dict(wall_ms=wall_ms, kernel_ms=sum(r["total_ms"] for r in rows),
                busy_ms=busy_ms(intervals), kernels=rows)


def trace_problem() -> str | None:
    """Why --trace cannot work here, or None."""
    try:
        import torch
        from torch.profiler import ProfilerActivity  # noqa: F401
    except Exception as e:
        return f"torch.profiler does not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


class Bench:
    """The run's measurements, log and JSON; every measurement guarded and deadline-checked."""

    def __init__(self, args: argparse.Namespace, config: dict[str, Any]):
        self.args = args
        self.start = time.perf_counter()
        self.rows: dict[Key, dict[str, Any]] = {}
        self.reference: dict[tuple[int, str], mx.array] = {}  # eager step outputs
        self.reference32: dict[int, mx.array] = {}  # float32 dense step outputs
        self.data: dict[str, Any] = dict(
            meta=dict(
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                mlx=mx.__version__, device=str(mx.default_device()),
                device_info=str(mx.device_info()), python=platform.python_version(),
                platform=platform.platform(), argv=sys.argv[1:],
                env={k: os.environ.get(k) for k in ENV_VARS}),
            config=config, args=vars(args), builds={}, measurements=[], traces=[], skipped=[],
            errors=[], warnings=[])

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", flush=True)

    def warning(self, message: Warning | str, category: type[Warning], filename: str,
                lineno: int, file: Any = None, line: str | None = None) -> None:
        """warnings.showwarning: a kernel falling back to the reference explains a slow row."""
        text = f"{category.__name__}: {message}"
        self.log(f"warning: {text}")
        self.data["warnings"].append(text)

    def save(self) -> None:
        if not self.args.json:
            return
        self.data["elapsed_s"] = time.perf_counter() - self.start
        tmp = self.args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.args.json)

    def over_deadline(self, what: str) -> bool:
        """True (and `what` recorded as skipped) once --deadline has passed."""
        deadline = self.args.deadline
        if deadline is None or time.perf_counter() - self.start < deadline:
            return False
        self.log(f"skip {what} (deadline {deadline:g} s passed)")
        self.data["skipped"].append(what)
        return True

    def error(self, what: str, e: Exception) -> str:
        text = f"{type(e).__name__}: {e}"
        self.log(f"!! {what} failed: {text}")
        traceback.print_exc()
        self.data["errors"].append(dict(what=what, error=text, traceback=traceback.format_exc()))
        return text

    def measure(self, key: Key, fn: Callable[..., Any], args: tuple) -> None:
        """Time fn(*args) the way the key's mode says (with_mode); a failure is recorded in the
        row and the log."""
        size, variant, what, mode = key
        label = f"{variant} {size} {what} {mode}"
        if self.over_deadline(label):
            self.rows[key] = dict(skipped=True)
            return
        row: dict[str, Any] = dict(size=size, variant=variant, what=what, mode=mode)
        try:
            numbers, out = time_calls(with_mode(fn, mode), args, self.args.repeats)
            if mode == "loop":  # per step
                numbers["ms"] /= LOOP_STEPS
                numbers["times_ms"] = [t / LOOP_STEPS for t in numbers["times_ms"]]
            row.update(numbers)
            if what == "step" and mode != "loop":
                self.parity(row, out)
            times = row["times_ms"]
            err = "" if row.get("rel_err") is None else f", rel err {row['rel_err']:.2e}"
            if "rel_err_fp32" in row:
                err += f", vs float32 {row['rel_err_fp32']:.2e}"
            self.log(f"{label}: {row['ms']:.2f} ms (min {min(times):.2f}, max {max(times):.2f};"
                     f" first call {row['first_ms']:.0f} ms), resident "
                     f"{row['resident_bytes'] / 1e9:.2f} GB, peak +"
                     f"{row['peak_above_bytes'] / 1e6:.0f} MB{err}")
        except Exception as e:  # one failed measurement (e.g. compile) must not lose the rest
            row["error"] = self.error(label, e)
        self.rows[key] = row
        self.data["measurements"].append(row)
        self.save()

    def parity(self, row: dict[str, Any], out: mx.array) -> None:
        """Relative error of a step output against its reference (see the module docstring);
        the eager output of dense and ternary becomes the reference."""
        size, variant, mode = row["size"], row["variant"], row["mode"]
        if variant in ("dense", "binary") and size in self.reference32:
            row["rel_err_fp32"] = kernels.relative_error(out, self.reference32[size])
        ref_variant = "dense" if variant in ("dense", "binary") else variant
        if variant == ref_variant and mode == "eager":
            self.reference[(size, variant)] = out
            row["finite"] = bool(mx.all(mx.isfinite(out)).item())
            return
        ref = self.reference.get((size, ref_variant))
        if ref is not None:
            row["rel_err"] = kernels.relative_error(out, ref)
            row["rel_err_vs"] = f"{ref_variant} eager"

    def trace(self, size: int, variant: str, fn: Callable[..., Any], args: tuple) -> None:
        label = f"{variant} {size} trace"
        if self.over_deadline(label):
            return
        try:
            summary = kernel_summary(fn, args)
        except Exception as e:  # best effort: one line, then on
            self.log(f"trace {variant} {size}: no kernel summary ({type(e).__name__}: {e})")
            self.data["traces"].append(dict(size=size, variant=variant, error=str(e)))
            return
        self.data["traces"].append(dict(size=size, variant=variant, **summary))
        self.save()
        kernel_list = summary["kernels"]
        self.log(f"trace {variant} {size}: {len(kernel_list)} kernel names, "
                 f"{summary['kernel_ms']:.2f} ms of kernels, the GPU busy for "
                 f"{summary['busy_ms']:.2f} ms (the rest ran concurrently), in a "
                 f"{summary['wall_ms']:.2f} ms step (profiled); top 15:")
        for r in kernel_list[:15]:
            print(f"    {r['total_ms']:9.3f} ms {r['count']:6d}x  {r['name'][:110]}", flush=True)


def with_mode(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """fn as mode `mode` runs it (see the module docstring); "blocks" needs a step function."""
    if mode == "compiled":
        return mx.compile(fn)
    if mode == "blocks":
        def blocks(*args: Any) -> Any:
            with kernels.fused_only():  # as the low-memory pipeline denoises
                return fn(*args, evaluate_blocks=True)
        return blocks
    if mode == "loop":
        def loop(x: mx.array, ctx: mx.array, t: mx.array, cos: mx.array, sin: mx.array) -> Any:
            schedule = sigmas(SchedulerConfig(), LOOP_STEPS, x.shape[1])
            return euler_loop(lambda z, tz: fn(z, ctx, tz, cos, sin), x, schedule)
        return loop
    if mode == "unfused":
        def unfused(*args: Any) -> Any:
            mx.disable_compile()  # while the graph is built: compiled helpers run as Python
            try:
                return fn(*args)
            finally:
                mx.enable_compile()
        return unfused
    return fn


def packed_shapes(model: Transformer, size: int, n_txt: int) -> list[tuple[int, int, int]]:
    """(M, N, K) of every packed linear of a step at `size`: double blocks' image projections
    see the image tokens, their text projections (add_*, to_add_out, ff_context) the text
    tokens, single blocks both."""
    n_img = (size // 16) ** 2
    shapes = set()
    for prefix, block in [("double", model.transformer_blocks[0]),
                          ("single", model.single_transformer_blocks[0])]:
        for path, layer in block.named_modules():
            if not isinstance(layer, quant.Linear) or layer.storage == "dense":
                continue
            text = any(key in path for key in ("add_", "ff_context"))
            m = n_img + n_txt if prefix == "single" else n_txt if text else n_img
            shapes.add((m, layer.out_features, layer.in_features))
    return sorted(shapes)


def run_variant(bench: Bench, config: dict[str, Any], variant: str,
                common: dict[str, mx.array], n_txt: int) -> None:
    args = bench.args
    modes = [m for m in args.modes if not (args.no_compile and m == "compiled")]
    if bench.over_deadline(f"{variant} (build and all its measurements)"):
        return
    start = time.perf_counter()
    try:
        model = build_model(config, variant, common)
    except Exception as e:
        bench.error(f"build {variant}", e)
        return
    nbytes = model_bytes(model)
    bench.data["builds"][variant] = dict(seconds=time.perf_counter() - start, model_bytes=nbytes)
    bench.log(f"built {variant} in {time.perf_counter() - start:.1f} s: weights "
              f"{nbytes / 1e9:.3f} GB")

    def step(x: mx.array, ctx: mx.array, t: mx.array, cos: mx.array, sin: mx.array,
             evaluate_blocks: bool = False) -> mx.array:
        return model(x, ctx, t, (cos, sin), evaluate_blocks=evaluate_blocks)

    blocks = {"double": model.transformer_blocks[0],
              "single": model.single_transformer_blocks[0]} if args.blocks else {}
    for size in args.sizes:
        if args.tune and variant != "dense":
            try:
                tuned = kernels.tune(variant, packed_shapes(model, size, n_txt))
                bench.data.setdefault("tuned", {})[f"{variant} {size}"] = {
                    " ".join(map(str, shape)): {k: v * 1e3 for k, v in t.items()}
                    for shape, t in tuned.items()}
                bench.log(f"tuned {variant} {size}: " + ", ".join(
                    f"{shape}: {min(t, key=t.get)}" for shape, t in tuned.items() if t))
            except Exception as e:
                bench.error(f"tune {variant} {size}", e)
        try:
            inputs = step_inputs(model, size, n_txt)
            block_args = block_inputs(model, inputs) if args.blocks else {}
        except Exception as e:
            bench.error(f"{variant} {size} inputs", e)
            continue
        if variant == "dense" and args.float32:
            try:
                bench.reference32[size] = float32_step(model, inputs)
            except Exception as e:
                bench.error(f"float32 reference {size}", e)
        for mode in modes:
            bench.measure((size, variant, "step", mode), step, inputs)
            whole_step_only = mode in ("blocks", "loop")  # both need the whole model
            for what, block_arg in block_args.items() if not whole_step_only else ():
                bench.measure((size, variant, what, mode), blocks[what], block_arg)
        if args.trace:
            bench.trace(size, variant, step, inputs)
        del inputs, block_args  # before the next size's inputs exist


# -- the table ---------------------------------------------------------------------------------


def cell(row: dict[str, Any] | None, field: str, scale: float = 1.0, spec: str = ".2f") -> str:
    """row[field] * scale formatted, or why there is no number."""
    if row is None:
        return "-"
    if row.get("skipped"):
        return "skip"
    if "error" in row:
        return "ERR"
    return format(row[field] * scale, spec)


def rel_err_cell(step: dict[str, Any] | None) -> str:
    if step is None or "ms" not in step:
        return "-"
    if "rel_err" in step:
        return f"{step['rel_err']:.2e}"
    if "finite" in step:
        return "ref" if step["finite"] else "NONFINITE"
    return "-"


def print_table(bench: Bench) -> None:
    rows = bench.rows
    whats = [w for w in WHATS if any(k[2] == w for k in rows)]
    head = f"{'size':>5} {'variant':<8} {'mode':<8} |"
    for w in whats:
        head += f" {w + ' ms':>10} {'x dense':>7} |"
    head += f" {'model GB':>8} {'resident GB':>11} {'peak+ MB':>9} | {'rel err':>9}"
    head += f" {'vs fp32':>9}"
    print(f"\nOne denoising step, bf16 (median of {bench.args.repeats} after {WARMUP} warm-up; "
          "x dense: same size and mode; peak+: step peak above resident)")
    print(head)
    print("-" * len(head))
    if not rows:
        print("nothing measured")
    for size in sorted({k[0] for k in rows}):
        for variant in VARIANTS:
            for mode in MODES:
                if (size, variant, "step", mode) not in rows:
                    continue
                line = f"{size:>5} {variant:<8} {mode:<8} |"
                for w in whats:
                    row = rows.get((size, variant, w, mode))
                    dense = rows.get((size, "dense", w, mode)) or {}
                    ratio = "-"
                    if row and "ms" in row and "ms" in dense:
                        ratio = f"{row['ms'] / dense['ms']:.2f}"
                    line += f" {cell(row, 'ms'):>10} {ratio:>7} |"
                step = rows[(size, variant, "step", mode)]
                build = bench.data["builds"].get(variant)
                line += f" {cell(build, 'model_bytes', 1e-9, '.3f'):>8}"
                line += f" {cell(step, 'resident_bytes', 1e-9, '.3f'):>11}"
                line += f" {cell(step, 'peak_above_bytes', 1e-6, '.0f'):>9}"
                fp32 = f"{step['rel_err_fp32']:.2e}" if "rel_err_fp32" in step else "-"
                print(f"{line} | {rel_err_cell(step):>9} {fp32:>9}")
    print("rel err: max|a-b|/max|b| of the step output vs the eager dense step (ternary: vs its "
          "own eager step); ref = the reference itself; vs fp32: vs the float32 dense step "
          "(--float32)")
    for e in bench.data["errors"]:
        print(f"error: {e['what']}: {e['error'][:200]}")
    if bench.data["skipped"]:
        print(f"skipped (deadline): {', '.join(bench.data['skipped'])}")
    print(f"total {time.perf_counter() - bench.start:.1f} s", flush=True)


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--sizes", type=int, nargs="+",
                   help="image sides in pixels, multiples of 16 (default 512 1024; --tiny 64 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["eager", "compiled"],
                   help="how to run each step (module docstring); default eager compiled")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled mode")
    p.add_argument("--tune", action="store_true", help="before a packed variant's timings at a "
                   "size, kernels.tune() its linear shapes (the dispatch then uses the winners)")
    p.add_argument("--blocks", action="store_true", help="also time one double and one single "
                   "block alone")
    p.add_argument("--trace", action="store_true", help="CUDA only: top kernels of one step "
                   "per variant and size (torch.profiler)")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="skip measurements that would start after this many seconds")
    p.add_argument("--json", metavar="PATH", help="write every number here (after each one)")
    p.add_argument("--float32", action="store_true", help="also compute the dense step in "
                   "float32 and give every dense/binary step's error against it")
    p.add_argument("--tiny", action="store_true", help="toy model, 16 text tokens (CPU check)")
    p.add_argument("--layers", metavar="DOUBLE,SINGLE",
                   help="override the block counts, e.g. 1,1 for the full widths at 2 blocks")
    args = p.parse_args()
    args.sizes = args.sizes or ([64, 128] if args.tiny else [512, 1024])
    if any(s <= 0 or s % 16 for s in args.sizes):
        p.error("--sizes must be positive multiples of 16")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    # Canonical order whatever the command line says: dense's output is the others' reference.
    args.variants = [v for v in VARIANTS if v in args.variants]
    args.modes = [m for m in MODES if m in args.modes]  # eager first: the parity reference
    return args


def main() -> int:
    args = parse_args()
    config = dict(TINY_CONFIG if args.tiny else FULL_CONFIG)
    if args.layers:
        config["num_layers"], config["num_single_layers"] = map(int, args.layers.split(","))
    if args.blocks and not (config["num_layers"] and config["num_single_layers"]):
        sys.exit("--blocks needs at least one double and one single block")
    n_txt = 16 if args.tiny else 512
    bench = Bench(args, config)
    bench.data["meta"]["text_tokens"] = n_txt
    warnings.showwarning = bench.warning
    # The `run` time limit ends a command with SIGTERM: still print and save what was measured.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    bench.log(f"mlx {mx.__version__} on {mx.default_device()} {mx.device_info()}; "
              f"env {bench.data['meta']['env']}")
    if args.trace:
        # Checked once up front: torch (and CUDA in it) starts before any measurement.
        problem = trace_problem()
        if problem:
            bench.log(f"--trace off: {problem}")
            args.trace = False
    status = 0
    try:
        start = time.perf_counter()
        common = common_weights(config, set(packed_layers(config)))
        bench.log(f"shared dense weights in {time.perf_counter() - start:.1f} s: "
                  f"{sum(v.nbytes for v in common.values()) / 1e9:.3f} GB")
        for variant in args.variants:
            run_variant(bench, config, variant, common, n_txt)
            # The model went with run_variant's frame; hand its buffers back before the next.
            gc.collect()
            mx.clear_cache()
    except (KeyboardInterrupt, SystemExit) as e:
        bench.log(f"interrupted ({type(e).__name__}); the table has what was measured")
        status = 2
    finally:
        bench.save()
        print_table(bench)
    return status or (1 if bench.data["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
