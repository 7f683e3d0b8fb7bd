"""A drop-in for `mx.fast.metal_kernel` that runs the kernel on the CPU.

`metal_kernel(...)` takes MLX's arguments and returns a callable with MLX's keyword arguments.
A call generates MLX's kernel source for the inputs it gets, translates it to C++, compiles it
once per distinct source (cached on disk), and runs the grid three times in parallel processes,
running the lowest-numbered ready thread first, the highest first, or a random one (threadgroups
forward, reversed, shuffled). Each run poisons
uninitialised outputs and threadgroup memory with a different byte and places buffers against
the other guard page, so a race, a missing barrier, a read of uninitialised memory or an output
element no thread writes shows up as a difference between runs, and an out-of-bounds access as
a fault. Any of these raises an error naming the kernel; otherwise the outputs come back as
MLX arrays.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from .source import TYPE_NAMES, ArgInfo, TranslationError, generate, translate

HERE = Path(__file__).resolve().parent
CXX = os.environ.get("MSL_HARNESS_CXX", "g++")
CXXFLAGS = [
    "-std=gnu++20",
    "-O1",
    "-g0",
    "-w",
    "-fno-strict-aliasing",  # kernels reinterpret buffers and fragments
    "-ffp-contract=off",  # no fused multiply-add unless the kernel asks for fma()
    f"-I{HERE}",
    f"-I{HERE / 'include'}",  # <metal_stdlib> and friends
]
if platform.machine() in ("x86_64", "AMD64"):
    # msl_runtime.cpp switches stacks by hand: keep CET shadow stacks off for these binaries.
    CXXFLAGS.append("-fcf-protection=none")
SCHEDULES = ("forward", "reverse", "random")
POISON = (0xFF, 0x7F, 0xFE)  # per schedule; must match kPoison in msl_runtime.cpp
RUN_TIMEOUT_S = float(os.environ.get("MSL_HARNESS_TIMEOUT", "120"))
SEED = int(os.environ.get("MSL_HARNESS_SEED", "20240607"))


class HarnessError(RuntimeError):
    """Base class of the harness's errors."""


class KernelCompileError(HarnessError):
    """The kernel does not compile against the MSL subset the harness implements."""


class KernelRuntimeError(HarnessError):
    """The kernel faulted or broke an execution rule (bounds, barriers, simdgroup uniformity)."""


class KernelRaceError(KernelRuntimeError):
    """The outputs depend on the schedule: a race, uninitialised reads, or unwritten outputs."""


def cache_dir() -> Path:
    d = os.environ.get("MSL_HARNESS_CACHE") or os.path.join(
        tempfile.gettempdir(), "mlx_bonsai_msl_harness"
    )
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def _toolchain_key() -> str:
    """What compiled binaries depend on besides the translation unit."""
    h = hashlib.sha256()
    h.update(" ".join([CXX, *CXXFLAGS]).encode())
    for path in sorted([*HERE.glob("*.h"), *HERE.glob("*.cpp"), *HERE.glob("include/*")]):
        h.update(path.read_bytes())
    return h.hexdigest()


PREBUILT_IDLE_S = 24 * 3600


def drop_stale_prebuilt(keep: Path) -> None:
    """Remove the precompiled headers (large) of other harness versions idle for a day.

    Only idle ones: a checkout with another version of the harness may be running its tests at
    this moment, and removing its folder would fail its compiles.
    """
    now = time.time()
    for old in cache_dir().glob("prebuilt-*"):
        try:
            if old != keep and now - old.stat().st_mtime > PREBUILT_IDLE_S:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def _prebuilt(toolchain: str) -> tuple[Path, Path]:
    """(directory holding msl_shim.h.gch, msl_runtime.o), built once per toolchain.

    The precompiled header is found before msl_shim.h itself; together they leave only the
    kernel and its glue to compile per kernel.
    """
    d = cache_dir() / f"prebuilt-{toolchain[:16]}"
    d.mkdir(exist_ok=True)
    os.utime(d)  # marks it in use for drop_stale_prebuilt in other processes
    drop_stale_prebuilt(keep=d)
    gch, obj = d / "msl_shim.h.gch", d / "msl_runtime.o"
    for out, args in (
        (gch, ["-x", "c++-header", str(HERE / "msl_shim.h")]),
        (obj, ["-c", str(HERE / "msl_runtime.cpp")]),
    ):
        if not out.exists():
            tmp = d / f"{out.name}.{os.getpid()}.tmp"
            cmd = [CXX, *CXXFLAGS, *args, "-o", str(tmp)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise HarnessError(f"cannot build the harness ({' '.join(cmd)}):\n{result.stderr}")
            os.replace(tmp, out)
    return d, obj


def compile_unit(tu: str, kernel_name: str) -> Path:
    """Path of the executable for translation unit `tu`, compiling it if not cached."""
    toolchain = _toolchain_key()
    key = hashlib.sha256((toolchain + tu).encode()).hexdigest()[:24]
    d = cache_dir()
    exe = d / f"{key}.bin"
    if exe.exists():
        return exe
    src = d / f"{key}.cpp"
    src.write_text(tu)
    tmp = d / f"{key}.{os.getpid()}.tmp"
    pch_dir, runtime = _prebuilt(toolchain)
    result = subprocess.run(
        [CXX, f"-I{pch_dir}", *CXXFLAGS, str(src), str(runtime), "-o", str(tmp)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln or "static assertion" in ln]
        shown = "\n".join((errors or lines)[:20])
        raise KernelCompileError(
            f"kernel {kernel_name} does not compile under the MSL harness "
            f"(translation unit: {src}):\n{shown}"
        )
    os.replace(tmp, exe)  # atomic: concurrent test processes may compile the same unit
    return exe


def _raw(a: mx.array) -> np.ndarray:
    """Row-contiguous bytes of `a` as unsigned integers of the element size."""
    size = TYPE_NAMES[a.dtype][1]
    return np.ascontiguousarray(np.array(a.view(getattr(mx, f"uint{8 * size}"))))


def _from_raw(data: bytes, shape: Sequence[int], dtype: mx.Dtype) -> mx.array:
    size = TYPE_NAMES[dtype][1]
    bits = np.frombuffer(data, dtype=f"<u{size}").reshape(tuple(shape))
    return mx.array(bits).view(dtype)


def _describe(raw: np.ndarray, dtype: mx.Dtype) -> str:
    """One element's value for an error message."""
    value = _from_raw(raw.tobytes(), (), dtype)
    return f"{value.item()!r} (0x{int(raw):0{2 * raw.itemsize}x})"


def _run_error(stderr: str, schedule: str, rc: int) -> str:
    lines = [ln.removeprefix("MSLH-ERROR: ") for ln in stderr.splitlines() if "MSLH-ERROR" in ln]
    if lines:
        return f"{lines[0]} (schedule {schedule})"
    return (
        f"harness process exited with status {rc} (schedule {schedule}): {stderr.strip()[-2000:]}"
    )


class Kernel:
    """The callable `metal_kernel` returns."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str,
        atomic_outputs: bool,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise HarnessError(
                f"kernel {name}: atomic outputs are not supported by the MSL harness"
            )
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header

    def __call__(
        self,
        *,
        inputs: Sequence[object],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: Sequence[tuple[str, object]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream: object = None,  # the harness has one "device": the CPU
    ) -> list[mx.array]:
        for given, expected, what in (
            (len(inputs), len(self.input_names), "inputs"),
            (len(output_shapes), len(self.output_names), "output_shapes"),
            (len(output_dtypes), len(self.output_names), "output_dtypes"),
        ):
            if given != expected:
                raise ValueError(
                    f"[metal_kernel] Expected `{what}` to have size {expected} "
                    f"but got size {given}."
                )
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        try:
            gen = generate(
                self.name,
                self.input_names,
                self.output_names,
                self.source,
                self.header,
                [ArgInfo(a.dtype, a.ndim, a.size) for a in arrays],
                list(output_dtypes),
                list(template or []),
            )
            tu = translate(gen, self.name)
        except TranslationError as e:
            raise KernelCompileError(f"kernel {self.name}: {e}") from None
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.text}\n```")
        exe = compile_unit(tu, gen.kernel_name)

        # MLX dispatches dispatchThreads(grid, min(threadgroup, grid)).
        group = tuple(min(t, g) for t, g in zip(threadgroup, grid, strict=True))
        with tempfile.TemporaryDirectory(prefix="mslh-") as io:
            lines = [
                f"grid {grid[0]} {grid[1]} {grid[2]}",
                f"group {group[0]} {group[1]} {group[2]}",
            ]
            out_shapes: dict[int, tuple[Sequence[int], mx.Dtype]] = {}
            out_k = 0
            for i, p in enumerate(gen.params):
                if p.role == "output":
                    shape, dtype = output_shapes[out_k], output_dtypes[out_k]
                    out_k += 1
                    nbytes = int(np.prod(shape, dtype=np.int64)) * TYPE_NAMES[dtype][1]
                    if init_value is None:
                        init = "poison"
                    else:
                        init = _raw(mx.array(init_value, dtype=dtype)).tobytes().hex()
                    out_shapes[i] = (shape, dtype)
                    lines.append(f"buffer {i} {nbytes} {init}")
                    continue
                a = arrays[p.input_index]
                if p.role == "input":
                    data = _raw(a).tobytes()
                elif p.role == "shape":
                    data = np.array(a.shape, dtype="<i4").tobytes()
                elif p.role == "strides":
                    strides = [int(np.prod(a.shape[k + 1 :])) for k in range(a.ndim)]
                    data = np.array(strides, dtype="<i8").tobytes()
                else:
                    data = np.array(a.ndim, dtype="<i4").tobytes()
                Path(io, f"in{i}.bin").write_bytes(data)
                lines.append(f"buffer {i} {len(data)} file")
            Path(io, "launch.txt").write_text("\n".join(lines) + "\n")

            procs = [
                subprocess.Popen(
                    [str(exe), io, str(s), str(SEED)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for s in range(len(SCHEDULES))
            ]
            errors = []
            for s, proc in enumerate(procs):
                try:
                    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    for p in procs:
                        p.kill()
                    raise KernelRuntimeError(
                        f"kernel {gen.kernel_name}: did not finish within {RUN_TIMEOUT_S:.0f} s "
                        f"(schedule {SCHEDULES[s]}); a thread may loop forever"
                    ) from None
                if proc.returncode != 0:
                    errors.append(_run_error(stderr, SCHEDULES[s], proc.returncode))
            if errors:
                raise KernelRuntimeError(errors[0])

            results = []
            for i, (shape, dtype) in out_shapes.items():
                runs = [Path(io, f"out{i}.r{s}.bin").read_bytes() for s in range(len(SCHEDULES))]
                self._check_schedules(gen.kernel_name, gen.params[i].name, runs, dtype, init_value)
                results.append(_from_raw(runs[0], shape, dtype))
            return results

    @staticmethod
    def _check_schedules(
        kernel: str, output: str, runs: list[bytes], dtype: mx.Dtype, init_value: float | None
    ) -> None:
        """Raise KernelRaceError unless every schedule produced the same bytes."""
        if all(r == runs[0] for r in runs):
            return
        size = TYPE_NAMES[dtype][1]
        vals = [np.frombuffer(r, dtype=f"<u{size}") for r in runs]
        differ = np.zeros(vals[0].shape, dtype=bool)
        for v in vals[1:]:
            differ |= v != vals[0]
        first = int(np.flatnonzero(differ)[0])
        if init_value is None:
            poisoned = np.ones(vals[0].shape, dtype=bool)
            for v, byte in zip(vals, POISON, strict=True):
                poisoned &= v == int.from_bytes(bytes([byte]) * size, "little")
            if poisoned.any():
                where = int(np.flatnonzero(poisoned)[0])
                raise KernelRaceError(
                    f"kernel {kernel}: {int(poisoned.sum())} of {poisoned.size} elements of output "
                    f"'{output}' hold the harness's poison bytes in every schedule: they are never "
                    "written, or copied from uninitialised threadgroup memory "
                    f"(first at flat index {where})"
                )
        shown = ", ".join(
            f"{name}={_describe(v[first], dtype)}" for name, v in zip(SCHEDULES, vals, strict=True)
        )
        raise KernelRaceError(
            f"kernel {kernel}: output '{output}' depends on the thread schedule at "
            f"{int(differ.sum())} of {differ.size} elements "
            f"(first at flat index {first}: {shown}); a race between threads (missing "
            "threadgroup_barrier?) or a read of uninitialised threadgroup memory"
        )


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: dict | None = None,
) -> Callable[..., list[mx.array]]:
    """Same signature and call convention as `mx.fast.metal_kernel`, executed on the CPU."""
    math_mode = (compile_options or {}).get("math_mode", "safe")
    if set(compile_options or {}) - {"math_mode"} or math_mode != "safe":
        # The harness computes IEEE results; it cannot stand in for relaxed/fast math.
        raise HarnessError(f"kernel {name}: the MSL harness supports only math_mode 'safe'")
    # ensure_row_contiguous needs no action: inputs always go in row-contiguous (with their true
    # shapes/strides), a layout a kernel launched without it must handle too.
    return Kernel(name, input_names, output_names, source, header, atomic_outputs)


def have_compiler() -> bool:
    return shutil.which(CXX) is not None
