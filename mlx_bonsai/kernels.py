"""x @ W^T for bonsai-packed weights: Metal and CUDA kernels behind one dispatch.

`packed_matmul(x, weight, scales, kind)` multiplies activations [..., K] by a binary or ternary
packed weight (docs: format_spec "bonsai-packed v1") and returns [..., N] in x's dtype. It runs
one of four kernel strategies on the GPU, or the pure-MLX reference:

- "gemv":    few rows of x. Each threadgroup streams 4 weight rows once (its 4 simdgroups/warps
             split K), decodes them in registers and applies them to up to 4 rows of x per
             pass (metal/packed_gemv.*).
- "gemm":    tiled GEMM that decodes weight tiles into threadgroup/shared memory and multiplies
             with simdgroup matrices (Metal) or tensor cores (CUDA); W is never expanded in device
             memory (metal/packed_gemm.*).
- "wgmma":   Hopper GPUs (CUDA, compute capability 9.x) only: a GEMM around warpgroup MMA that
             decodes each thread's weights straight into the MMA's register operand, with x
             streamed through a ring of 128B-swizzled shared-memory stages by the tensor memory
             accelerator (metal/packed_wgmma.cu). Ternary weights reach it as per-lane digit
             words (metal/packed_fields.cu): held so since loading (`ternary_words`, below), or
             made from base-3 bytes per call. No Metal twin: Apple GPUs have no such
             instruction.
- "scratch": decode W to a dense copy in one pass and use MLX's own matmul
             (metal/packed_decode.*). The copy lives until the GPU has run the call; decoding
             in chunks would not bound that, as MLX keeps every chunk of a lazily built call
             until the GPU has run them all (BENCHMARKS.md), so `fused_only()` (the low-memory
             pipeline) avoids this strategy where a fused kernel can run the shape.
- "reference": `mlx_bonsai.quant.unpack_*` + matmul. The CPU path, the forced path
             (MLX_BONSAI_KERNELS=reference) and the fallback.

Ternary digit words: on Hopper GPUs the model holds ternary layers as 2-bit digit words instead
of base-3 bytes (`holds_ternary_words`; `quant.use_device_layout` converts them once at load,
except in the low-memory pipeline), 32 bytes a group of 128 instead of 26, because making them
per call cost 2.5-11% of every ternary call (BENCHMARKS.md). The CUDA GEMV and the wgmma kernel
take them (`WORDS_STRATEGIES`); the reference unpacks them (`unpack_ternary_words`).

The strategy is picked per (M, N, K): `tune()` measures on this GPU; untuned shapes use
`default_strategy` (measured on an H100 and an H200 for CUDA, see BENCHMARKS.md; for Metal
they are unmeasured defaults, as no Apple GPU was available). On the first use of each kernel
variant in a process, a self-check compares it with the reference on random data; a kernel that
fails (wrong numbers, NaN, or a build error) triggers one RuntimeWarning and the reference from
then on. All of this is decided on a shape's first call and kept as a plan (a launcher with
kernel, template and grid fixed) for later calls of the same shapes, dtypes and settings: a
step's graph is built in Python before the GPU runs it, ~80 packed calls a step.

Environment: MLX_BONSAI_KERNELS = auto (default) | reference | gemv | gemm | wgmma | scratch.

Harness contract (running the Metal sources without a Mac): every Metal kernel is created by
`factory(name=, input_names=, output_names=, source=, header=, ensure_row_contiguous=,
atomic_outputs=)`, keyword arguments, and launched as `kernel(inputs=, template=, grid=,
threadgroup=, output_shapes=, output_dtypes=, init_value=)` returning a list of arrays; that is
`mx.fast.metal_kernel`'s interface. `metal_packed_matmul(x, weight, scales, kind, strategy=...,
factory=F)` runs exactly the launch logic of the Metal path with kernels built by F (one
KernelSet per factory, built once). Sources are function bodies: MLX writes the signature from
input_names (x, weight, scales; decode: weight, scales), output_names (out; decode: dense), the
template arguments, `<input>_shape` arrays when a body mentions them, and the Metal attributes a
body mentions (threadgroup_position_in_grid, thread_position_in_grid, thread_index_in_threadgroup,
simdgroup_index_in_threadgroup, thread_index_in_simdgroup).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import BonsaiError, ConfigError, WeightsError
from .packing import (
    GROUP_SIZE,
    TERNARY_GROUP_BYTES,
    TRITS_PER_BYTE,
    WORD_OF,
    WORD_SHIFT,
    pack_trit_words,
    unpack_trits,
)

KINDS = ("binary", "ternary")
STRATEGIES = ("gemv", "gemm", "wgmma", "scratch")
WORDS_STRATEGIES = ("gemv", "wgmma")  # the CUDA kernels that take ternary digit words
ENV_VAR = "MLX_BONSAI_KERNELS"
SOURCE_DIR = Path(__file__).resolve().parent / "metal"

_FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
_GEMV_ROWS = 4  # weight rows per GEMV threadgroup (its 4 simdgroups / warps split K)
GEMV_MAX_M = 64  # the GEMV re-reads W every 4 rows of x: never worth timing past this
_DECODE_THREADS = 256

# Largest M that goes to the GEMV, and smallest M that goes to scratch + MLX matmul (between
# them: the portable fused GEMM), per backend. CUDA: measured on an H200 (BENCHMARKS.md): with
# scratch for every packed linear (all have M >= 512 in the model) a whole transformer step ran
# faster than with the GEMMs; below 512 rows the GEMM wins call by call. Metal: not measured (no
# Apple GPU here); there MLX's matmul runs at bf16 speed and decoding a layer costs about one
# weight write, so large M goes to scratch; call tune() on the Mac to measure instead.
_THRESHOLDS = {"metal": (4, 512), "cuda": (4, 512)}
# On Hopper GPUs the wgmma GEMM takes every call from the rows given here on, per kind. Whole
# steps decide (BENCHMARKS.md). Ternary (base-3 -> digit words per call, then the GEMM) beats the
# portable GEMM from 512 rows. With x fed by the TMA (session 22, H100) it also beat scratch at
# every 4608-row shape of the model (by 3-15% a call), and a 1024^2 step with its 4608-row calls
# on wgmma instead of scratch took 1.6-3.1% less time with 1.1-1.3 GB less peak memory: scratch
# holds every decoded layer of a lazily built step until the GPU has run it. Ternary digit words
# held since loading ("words", no per-call pass) take it from the first row past the GEMV, as
# binary does (session 23, H100, 64 rows: 0.85-0.95x bf16 at K = 3072, 1.6-2.0x at 9216 and 12288,
# where scratch on bytes took 1.4-1.8x; the portable GEMM on bytes 1.8-6.0x. The model's packed
# calls all have 512 rows or more).
_WGMMA_FROM = {"binary": 1, "ternary": 512, "words": 1}
# (BM, WG, STAGES) of the wgmma launches: BM rows of x by 64 * WG weight rows per block, a ring of
# STAGES x stages. 128-row blocks run two per SM (128 registers a thread), larger ones one (255
# for 256 threads, 168 for 384: wgmma_blocks_per_sm). Below WGMMA_WIDE_FROM rows of x, 128-row
# blocks; from there one of WGMMA_WIDE_TILES, whose decoded weights each feed more MMA work (H100,
# session 11, BENCHMARKS.md): the one whose busiest SM computes the fewest outputs (on
# HOPPER_SMS SMs), e.g. 1536 x 3072 outputs are 144 256 x 128 blocks (two waves, the second 12
# blocks) but 128 192 x 192 ones (one wave). Session 12 (H100): the rule picked the faster of the
# two at 32 of the 36 shapes and kinds of 1024-4608 rows, within 1.2% at 3 more, and lost 16% at
# one (ternary 1024 x 3072 x 3072); where it picks 192 x 192 the call ran 1.01-1.72x faster
# (median 1.50) at 1536 rows and 1.09-1.22x (1.16) at 4608.
WGMMA_TILE = (128, 2, 4)
WGMMA_WIDE_TILES = ((256, 2, 4), (192, 3, 4))
WGMMA_WIDE_FROM = 1024
HOPPER_SMS = 132  # H100 SXM, H200; a GPU with another count gets a worse-fitting tile, no error


def wgmma_shared_memory(bm: int, wg: int, stages: int) -> int:
    """Dynamic shared memory of a wgmma block: the x ring (or the epilogue tile, if larger),
    rounded to 128 bytes, then the tensor map of x (128) and an mbarrier a slot, plus 1 KiB to
    align the ring to 1024 bytes."""
    ring = -(-max(stages * bm * 128, bm * (128 * wg + 16)) // 128) * 128
    return ring + 128 + 8 * stages + 1024


def wgmma_blocks_per_sm(bm: int) -> int:
    """Blocks of BM rows of x that share an SM (the register cap is set for that many)."""
    return 2 if bm == 128 else 1


def wgmma_tile(m: int, n: int) -> tuple[int, int, int]:
    """(BM, WG, STAGES) of the wgmma launch for an [m, K] x [K, n] product."""
    if m < WGMMA_WIDE_FROM:
        return WGMMA_TILE

    def busiest_sm(tile: tuple[int, int, int]) -> int:  # outputs one SM computes, at most
        bm, wg, _ = tile
        blocks = math.ceil(m / bm) * math.ceil(n / (64 * wg))
        return math.ceil(blocks / HOPPER_SMS) * bm * 64 * wg

    return min(WGMMA_WIDE_TILES, key=busiest_sm)  # a tie keeps the first


# (x, weight, scales) -> x @ W^T for one shape, everything else decided (KernelSet.launcher).
Launch = Callable[..., mx.array]

_TUNED: dict[tuple, str] = {}
_FUSED_ONLY = contextvars.ContextVar("mlx_bonsai_fused_only", default=False)


@contextlib.contextmanager
def fused_only() -> Iterator[None]:
    """Inside: packed matmuls never decode weights to a dense copy (the "scratch" strategy)
    where a fused kernel takes the shape (on CUDA, float32 activations have none). The
    low-memory pipeline denoises in here: scratch holds a layer's whole dense weight until the
    GPU has run the call (up to 170 MB for the model's largest), the fused kernels nothing.
    Measured on the H200 only; on Apple GPUs the portable GEMM's speed is not measured."""
    token = _FUSED_ONLY.set(True)
    try:
        yield
    finally:
        _FUSED_ONLY.reset(token)


@functools.cache
def _source(name: str) -> str:
    """A kernel source file without comments and blank lines: MLX rebuilds and hashes the whole
    source on every launch, so shorter text is less CPU time per call."""
    text = re.sub(r"//[^\n]*", "", (SOURCE_DIR / name).read_text())
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip()) + "\n"


@functools.cache
def _cuda_text(*names: str, mentions: tuple[str, ...] = ()) -> str:
    """CUDA text that brings in the source files `names`: #include lines by absolute path
    (NVRTC opens them), else the files' text. MLX copies a custom kernel's whole source on every
    call and hashes it at every evaluation, about 0.2 us per KB (H100 host; 10-17 KB per
    kernel here), so a few lines of includes save 2-4 us a call. A digest of the files keeps
    MLX's compile cache, keyed by this text, from serving a build of older files. `mentions`:
    names MLX looks for in the body to add parameters (x_shape, ...)."""
    paths = [SOURCE_DIR / name for name in names]
    if not all(p.is_file() and re.fullmatch(r'[ -!#-\[\]-~]+', str(p)) for p in paths):
        return "".join(_source(name) for name in names)  # e.g. a path a directive cannot quote
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()[:16]
    lines = [f"// bonsai sources {digest} {' '.join(mentions)}".rstrip()]
    return "\n".join(lines + [f'#include "{p}"' for p in paths]) + "\n"


class KernelSet:
    """The kernels of one backend ("metal" or "cuda"), built from `factory` once and cached."""

    def __init__(self, backend: str, factory: Callable[..., Any]):
        if backend not in ("metal", "cuda"):
            raise ValueError(f"backend must be 'metal' or 'cuda', not {backend!r}")
        self.backend = backend
        self.factory = factory
        self._built: dict[str, Any] = {}

    def _kernel(self, name: str, input_names: list[str], output_names: list[str],
                key: str | None = None, shared_memory: int = 0, headers: tuple[str, ...] = (),
                header: str = "") -> Any:
        """Kernel `bonsai_<name>` from metal/packed_<name>.*, built once per `key` (variants that
        differ in dynamic shared memory are separate kernel objects in MLX); the source files
        `headers` (CUDA only), then the text `header`, come after the shared headers."""
        key = key or name
        kernel = self._built.get(key)
        if kernel is None:
            if self.backend == "metal":
                header = _source("bonsai_metal.h") + _source("bonsai_decode.h") + header
                extra = {"atomic_outputs": False}
                source = _source(f"packed_{name}.metal")
            else:
                header = _cuda_text("bonsai_decode.h", "bonsai_cuda.cuh", *headers) + header
                extra = {"shared_memory": shared_memory} if shared_memory else {}
                body = f"packed_{name}.cu"
                uses = tuple(f"{n}_{what}" for n in input_names
                             for what in ("shape", "strides", "ndim")
                             if f"{n}_{what}" in _source(body))
                source = _cuda_text(body, mentions=uses)
            kernel = self.factory(
                name=f"bonsai_{name}",
                input_names=input_names,
                output_names=output_names,
                source=source,
                header=header,
                ensure_row_contiguous=True,
                **extra,
            )
            self._built[key] = kernel
        return kernel

    def supports(self, strategy: str, dtype: mx.Dtype) -> bool:
        # The CUDA GEMMs feed tensor cores with 16-bit tiles; float32 goes through scratch.
        if strategy == "wgmma":
            return self.backend == "cuda" and dtype != mx.float32 and _hopper()
        return not (self.backend == "cuda" and strategy == "gemm" and dtype == mx.float32)

    def takes_words(self, strategy: str) -> bool:
        """Whether `strategy`'s kernel reads ternary digit words (CUDA gemv and wgmma)."""
        return self.backend == "cuda" and strategy in WORDS_STRATEGIES

    def gemm_tile(self, m: int) -> tuple[int, int, int]:
        """(BM = BN, WM, WN) of the GEMM launch for m rows. On CUDA, past 64 rows, 128 x 128
        tiles with 64 x 64 per warp (measured 10-15% faster than 64 x 32 per warp on an H100)."""
        if self.backend == "cuda" and m > 64:
            return 128, 2, 2
        return 64, 2, 2

    @staticmethod
    def gemv_rows(m: int) -> int:
        """Rows of x per GEMV pass (MR): 1, 2 or 4."""
        return 1 if m == 1 else 2 if m == 2 else 4

    def variant(self, strategy: str, m: int, n: int) -> tuple:
        """What distinguishes the compiled kernel an [m, K] x [K, n] call uses (for the
        self-check)."""
        if strategy == "gemv":
            return (self.gemv_rows(m),)
        if strategy == "gemm":
            return self.gemm_tile(m)
        if strategy == "wgmma":
            return wgmma_tile(m, n)
        return ()

    @staticmethod
    def _launch(kernel: Any, template: list, grid: tuple[int, int, int], threads: int,
                shape: tuple[int, int], dtype: mx.Dtype, init_value: float | None,
                scratch: int = 0) -> Launch:
        """kernel(inputs=...) with everything else fixed: (*inputs) -> its output. `scratch`:
        bytes of a second, uint8 output the kernel uses as device scratch."""
        shapes, dtypes = [shape], [dtype]
        if scratch:
            shapes, dtypes = [shape, (scratch,)], [dtype, mx.uint8]
        options = dict(template=template, grid=grid, threadgroup=(threads, 1, 1),
                       output_shapes=shapes, output_dtypes=dtypes, init_value=init_value)

        def launch(*inputs: mx.array) -> mx.array:
            return kernel(inputs=list(inputs), **options)[0]

        return launch

    def gemm(self, m: int, n: int, k: int, dtype: mx.Dtype, scale_dtype: mx.Dtype, ternary: bool,
             init_value: float | None, variant: tuple[int, int, int], out: tuple) -> Launch:
        bm, wm, wn = variant
        threads = 32 * wm * wn
        return self._launch(
            self._kernel("gemm", ["x", "weight", "scales"], ["out"]),
            [("T", dtype), ("S", scale_dtype), ("TERNARY", ternary), ("BM", bm), ("BN", bm),
             ("WM", wm), ("WN", wn)],
            (math.ceil(n / bm) * threads, math.ceil(m / bm), 1), threads, out, dtype, init_value)

    def wgmma(self, m: int, n: int, k: int, dtype: mx.Dtype, scale_dtype: mx.Dtype, ternary: bool,
              init_value: float | None, variant: tuple[int, int, int], out: tuple,
              words: bool = False) -> Launch:
        bm, wg, stages = variant
        threads = 128 * wg
        kernel = self._kernel("wgmma", ["x", "weight", "scales"], ["out", "maps"],
                              key=f"wgmma_{bm}_{wg}_{stages}",
                              shared_memory=wgmma_shared_memory(bm, wg, stages),
                              headers=("bonsai_wgmma.cuh",),
                              header=_register_cap(threads * wgmma_blocks_per_sm(bm)))
        grid = (math.ceil(n / (64 * wg)), math.ceil(m / bm))
        launch = self._launch(
            kernel,
            [("T", dtype), ("S", scale_dtype), ("TERNARY", ternary), ("BM", bm), ("WG", wg),
             ("STAGES", stages)],
            (grid[0] * threads, grid[1], 1), threads, out, dtype, init_value,
            scratch=(grid[0] * grid[1] + 1) * 128)  # a tensor map per block, 128-byte aligned
        if not ternary or words:
            return launch
        fields = self.fields(n, k)  # base-3 bytes -> digit words, per call
        return lambda x, weight, scales: launch(x, fields(weight), scales)

    def fields(self, n: int, k: int) -> Callable[[mx.array], mx.array]:
        """Ternary rows [n, k/128*26] (uint8) -> uint32 [n, k/16]: every weight's base-3 digit
        in 2 bits, where the wgmma lane that decodes it reads it (metal/packed_fields.cu)."""
        return self._launch(self._kernel("fields", ["weight"], ["fields"]), [],
                            (n * k // GROUP_SIZE, 1, 1), _DECODE_THREADS, (n, k // 16),
                            mx.uint32, None)

    def gemv(self, m: int, n: int, k: int, dtype: mx.Dtype, scale_dtype: mx.Dtype, ternary: bool,
             init_value: float | None, variant: tuple[int], out: tuple,
             words: bool = False) -> Launch:
        (mr,) = variant
        template = [("T", dtype), ("S", scale_dtype), ("TERNARY", ternary), ("MR", mr),
                    ("ROWS", _GEMV_ROWS)]
        if self.backend == "cuda":  # ternary digit words: CUDA only
            template.append(("WORDS", words))
        return self._launch(
            self._kernel("gemv", ["x", "weight", "scales"], ["out"]), template,
            (math.ceil(n / _GEMV_ROWS) * 128, math.ceil(m / mr), 1), 128, out, dtype, init_value)

    def decode(self, n: int, k: int, dtype: mx.Dtype, scale_dtype: mx.Dtype, ternary: bool,
               init_value: float | None = None) -> Callable[[mx.array, mx.array], mx.array]:
        """(weight, scales) of n packed rows of K = k -> dense [n, k] in `dtype`: a thread per 16
        weights, in whole threadgroups (the CUDA binary decode spreads a warp's 32 threads over
        64 chunks of 8 weights, which a partial warp would leave unwritten; surplus threads
        write nothing)."""
        threads = math.ceil(n * k // 16 / _DECODE_THREADS) * _DECODE_THREADS
        return self._launch(
            self._kernel("decode", ["weight", "scales"], ["dense"]),
            [("T", dtype), ("S", scale_dtype), ("TERNARY", ternary)], (threads, 1, 1),
            _DECODE_THREADS, (n, k), dtype, init_value)

    def scratch(self, m: int, n: int, k: int, dtype: mx.Dtype, scale_dtype: mx.Dtype,
                ternary: bool, init_value: float | None = None) -> Launch:
        """Decode W to dense in x's dtype, then MLX's matmul. One pass, not chunks over N: on an
        H200, 32 MiB chunks held as much memory per call as the whole decode (MLX frees them
        when the GPU has run the call) plus a concatenated copy of the output, and ran
        1.05-1.4x slower at M = 4608 (BENCHMARKS.md)."""
        decode = self.decode(n, k, dtype, scale_dtype, ternary, init_value)
        return lambda x, weight, scales: x @ decode(weight, scales).T

    def launcher(self, strategy: str, m: int, n: int, k: int, dtype: mx.Dtype,
                 scale_dtype: mx.Dtype, kind: str, init_value: float | None = None,
                 variant: tuple | None = None, lead: tuple[int, ...] | None = None,
                 words: bool = False) -> Launch:
        """(x [m, k] of `dtype`, weight, scales) -> x @ W^T by `strategy`: the kernel, its
        template and grid are decided here, once per shape, so that a call is the launch alone
        (packed_matmul keeps one per shape). `variant` (see variant()) defaults to the one this
        shape gets. `lead`: x's dimensions but the last (their product m) for x of another rank
        than 2. The kernels read x [M, K] and [B, L, K] as they are: a reshape on each side of
        the call would be two graph nodes, ~1.5 us each to evaluate on CUDA (H100), ~80 calls
        a step; other ranks go through [m, k]. `words`: the weight is ternary digit words
        (CUDA gemv and wgmma only)."""
        ternary = kind == "ternary"
        if words and not self.takes_words(strategy):
            raise BonsaiError(f"ternary digit words run on the CUDA "
                              f"{' and '.join(WORDS_STRATEGIES)} kernels only, not the "
                              f"{self.backend} {strategy} one")
        lead = (m,) if lead is None else tuple(lead)
        if math.prod(lead) != m:
            raise ValueError(f"lead {lead} does not hold {m} rows")
        if strategy == "scratch":  # MLX's matmul takes x of any rank
            return self.scratch(m, n, k, dtype, scale_dtype, ternary, init_value)
        if strategy not in ("gemv", "gemm", "wgmma"):
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        variant = variant or self.variant(strategy, m, n)
        shape = (*lead, n)
        direct = len(lead) in (1, 2)
        launch = getattr(self, strategy)(m, n, k, dtype, scale_dtype, ternary, init_value,
                                          variant, shape if direct else (m, n),
                                          **({"words": True} if words else {}))
        if direct:
            return launch
        return lambda x, weight, scales: launch(x.reshape(m, k), weight, scales).reshape(shape)

    def run(self, strategy: str, x: mx.array, weight: mx.array, scales: mx.array, kind: str,
            init_value: float | None = None, variant: tuple | None = None) -> mx.array:
        """x [..., K] @ W^T with one strategy (a launcher used once)."""
        k, n = x.shape[-1], weight.shape[0]
        return self.launcher(strategy, math.prod(x.shape[:-1]), n, k, x.dtype, scales.dtype,
                             kind, init_value, variant, x.shape[:-1],
                             is_ternary_words(kind, weight))(x, weight, scales)


_KERNEL_SETS: dict[tuple[str, Any], KernelSet] = {}


@functools.cache
def _register_cap(threads_per_sm: int) -> str:
    """A cap on the kernel's registers that lets `threads_per_sm` threads share an SM (what
    __launch_bounds__ would say). mx.fast.cuda_kernel writes the kernel's declaration itself, so
    the cap comes in through the `__global__` macro it uses, redefined with __maxnreg__ (CUDA >=
    12.4; without it, no cap). Uncapped, ptxas gives the ternary tiles about 160 registers, i.e.
    one block per SM instead of two."""
    regs = min(255, 65536 // threads_per_sm // 8 * 8)
    return ("#ifdef __maxnreg__\n#undef __global__\n"
            f"#define __global__ __location__(global) __maxnreg__({regs})\n#endif\n")


def kernel_set(backend: str, factory: Callable[..., Any] | None = None) -> KernelSet:
    """The cached KernelSet of `backend` built by `factory` (default: MLX's metal/cuda_kernel)."""
    if factory is None:
        factory = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    key = (backend, factory)
    if key not in _KERNEL_SETS:
        _KERNEL_SETS[key] = KernelSet(backend, factory)
    return _KERNEL_SETS[key]


def _check_inputs(x: mx.array, weight: mx.array, scales: mx.array, kind: str,
                  group_size: int) -> tuple[int, int]:
    """(N, K) after checking that x, weight and scales form one bonsai-packed matmul."""
    if kind not in KINDS:
        raise BonsaiError(f"packed kind must be one of {KINDS}, not {kind!r}")
    if group_size != GROUP_SIZE:
        raise BonsaiError(f"bonsai-packed v1 uses groups of {GROUP_SIZE}, not {group_size}")
    if x.ndim < 1 or x.dtype not in _FLOAT_DTYPES:
        raise BonsaiError(f"x must be a float16/bfloat16/float32 array [..., K], got {x.dtype} "
                          f"{tuple(x.shape)}")
    k = x.shape[-1]
    if k % GROUP_SIZE:
        raise BonsaiError(f"x has K = {k} inputs, not a multiple of the group size {GROUP_SIZE}")
    n = weight.shape[0] if weight.ndim == 2 else -1
    if kind == "binary":
        want, want_dtype = (n, k // 32), mx.uint32
    elif weight.dtype == mx.uint32:  # digit words (ternary_words)
        want, want_dtype = (n, k // 16), mx.uint32
    else:
        want, want_dtype = (n, k // GROUP_SIZE * TERNARY_GROUP_BYTES), mx.uint8
    if weight.ndim != 2 or tuple(weight.shape) != want or weight.dtype != want_dtype:
        raise WeightsError(f"{kind} weight for K = {k} must be {want_dtype} [N, {want[1]}], got "
                           f"{weight.dtype} {tuple(weight.shape)}")
    if tuple(scales.shape) != (n, k // GROUP_SIZE) or scales.dtype not in _FLOAT_DTYPES:
        raise WeightsError(f"scales must be float [{n}, {k // GROUP_SIZE}], got {scales.dtype} "
                           f"{tuple(scales.shape)}")
    return n, k


def unpack_binary(weight: mx.array, scales: mx.array, dtype: mx.Dtype) -> mx.array:
    """Binary layout -> dense [out, in] in `dtype`: bit (k % 32) of word k // 32 picks +s or -s."""
    n_out = weight.shape[0]
    bits = (weight[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    bits = bits.reshape(n_out, scales.shape[1], GROUP_SIZE).astype(mx.bool_)
    s = scales.astype(dtype)[..., None]
    return mx.where(bits, s, -s).reshape(n_out, -1)


def unpack_ternary(weight: mx.array, scales: mx.array, dtype: mx.Dtype) -> mx.array:
    """Ternary layout -> dense [out, in] in `dtype`: 5 base-3 digits t a byte, w = s*(t-1)."""
    n_out, n_groups = scales.shape
    powers = mx.array([3**i for i in range(TRITS_PER_BYTE)], dtype=mx.uint8)
    t = (weight.reshape(n_out, n_groups, TERNARY_GROUP_BYTES, 1) // powers) % 3
    t = t.reshape(n_out, n_groups, TERNARY_GROUP_BYTES * TRITS_PER_BYTE)[..., :GROUP_SIZE]
    w = (t.astype(dtype) - 1) * scales.astype(dtype)[..., None]
    return w.reshape(n_out, -1)


def unpack_ternary_words(weight: mx.array, scales: mx.array, dtype: mx.Dtype) -> mx.array:
    """Ternary digit words [out, in/16] -> dense [out, in] in `dtype` (packing.WORD_OF and
    WORD_SHIFT place each input's digit t; w = s*(t-1))."""
    n_out, n_groups = scales.shape
    words = weight.reshape(n_out, -1, 4)[..., mx.array(WORD_OF.reshape(-1))]
    shifts = mx.array(WORD_SHIFT.reshape(-1), dtype=mx.uint32)
    t = ((words >> shifts) & 3).reshape(n_out, n_groups, GROUP_SIZE)
    w = (t.astype(dtype) - 1) * scales.astype(dtype)[..., None]
    return w.reshape(n_out, -1)


def is_ternary_words(kind: str, weight: mx.array) -> bool:
    """Whether `weight` holds ternary digit words (uint32), not base-3 bytes (uint8)."""
    return kind == "ternary" and weight.dtype == mx.uint32


def reference_matmul(x: mx.array, weight: mx.array, scales: mx.array, kind: str,
                     group_size: int = GROUP_SIZE) -> mx.array:
    """The pure-MLX path: unpack W to dense in x's dtype, then x @ W^T."""
    _check_inputs(x, weight, scales, kind, group_size)
    if kind == "binary":
        unpack = unpack_binary
    else:
        unpack = unpack_ternary_words if is_ternary_words(kind, weight) else unpack_ternary
    return x @ unpack(weight, scales, x.dtype).T


def default_strategy(backend: str, kind: str, m: int, dtype: mx.Dtype,
                     words: bool = False) -> str:
    """The strategy an untuned shape gets (see _THRESHOLDS, _WGMMA_FROM and fused_only);
    `words`: ternary digit words, which only the GEMV and wgmma take (the GEMV any dtype)."""
    gemv_max, scratch_min = _THRESHOLDS[backend]
    ks = kernel_set(backend)
    if m <= gemv_max:
        return "gemv"
    wgmma, gemm = ks.supports("wgmma", dtype), ks.supports("gemm", dtype)
    if wgmma and m >= _WGMMA_FROM["words" if words else kind]:
        return "wgmma"
    if words:  # float32 x: no wgmma kernel
        return "gemv"
    if gemm and m < scratch_min:
        return "gemm"
    if _FUSED_ONLY.get() and (wgmma or gemm):
        return "wgmma" if wgmma else "gemm"
    return "scratch"


def choose_strategy(backend: str, kind: str, m: int, n: int, k: int, dtype: mx.Dtype,
                    words: bool = False) -> str:
    """The measured winner for this shape if tune() ran for it (unless it is scratch inside
    fused_only(), or a strategy that cannot take ternary digit words for `words`), else the
    default."""
    tuned = _TUNED.get((backend, kind, dtype, m, n, k))
    if (tuned and not (tuned == "scratch" and _FUSED_ONLY.get())
            and not (words and tuned not in WORDS_STRATEGIES)):
        return tuned
    return default_strategy(backend, kind, m, dtype, words)


@functools.cache
def _hopper() -> bool:
    """Whether MLX's CUDA device is a Hopper GPU (compute capability 9.x): wgmma exists there
    only (MLX compiles custom kernels for sm_90a on it)."""
    try:
        return mx.cuda.is_available() and mx.device_info().get("compute_capability_major") == 9
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _gpu_backend() -> str | None:
    """ "metal" or "cuda": the GPU backend of this MLX build, if it found a GPU (fixed for the
    process; cached because every packed matmul asks)."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def _device_backend() -> str | None:
    """ "metal" or "cuda" when MLX computes on a GPU with that backend, else None."""
    return _gpu_backend() if mx.default_device().type == mx.gpu else None


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "reference", *STRATEGIES):
        raise ConfigError(f"{ENV_VAR}={mode!r}: use auto, reference, {', '.join(STRATEGIES)}")
    return mode


def _run_backend(backend: str, x: mx.array, weight: mx.array, scales: mx.array, kind: str,
                 group_size: int, strategy: str | None, factory: Callable[..., Any] | None,
                 init_value: float | None) -> mx.array:
    n, k = _check_inputs(x, weight, scales, kind, group_size)
    ks = kernel_set(backend, factory)
    m = math.prod(x.shape[:-1])
    words = is_ternary_words(kind, weight)
    strategy = strategy or choose_strategy(backend, kind, m, n, k, x.dtype, words)
    if not ks.supports(strategy, x.dtype):
        raise BonsaiError(f"the {backend} {strategy} kernel does not take {x.dtype} activations")
    launch = ks.launcher(strategy, m, n, k, x.dtype, scales.dtype, kind, init_value,
                         lead=x.shape[:-1], words=words)
    return launch(x, weight, scales)


def metal_packed_matmul(x: mx.array, weight: mx.array, scales: mx.array, kind: str,
                        group_size: int = GROUP_SIZE, *, strategy: str | None = None,
                        factory: Callable[..., Any] | None = None,
                        init_value: float | None = None) -> mx.array:
    """The Metal path without self-check: kernels built by `factory` (the harness contract)."""
    return _run_backend("metal", x, weight, scales, kind, group_size, strategy, factory,
                        init_value)


def cuda_packed_matmul(x: mx.array, weight: mx.array, scales: mx.array, kind: str,
                       group_size: int = GROUP_SIZE, *, strategy: str | None = None,
                       factory: Callable[..., Any] | None = None,
                       init_value: float | None = None) -> mx.array:
    """The CUDA path without self-check (mx.fast.cuda_kernel unless `factory` is given)."""
    return _run_backend("cuda", x, weight, scales, kind, group_size, strategy, factory,
                        init_value)


def random_packed(kind: str, n: int, k: int, scale_dtype: mx.Dtype = mx.bfloat16,
                  key: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Random valid (weight, scales) of logical shape [n, k] (self-checks, tests, benchmarks)."""
    kw, ks = mx.random.split(key if key is not None else mx.random.key(0))
    if kind == "binary":
        bits = mx.random.randint(0, 2**16, (n, k // 32, 2), key=kw).astype(mx.uint32)
        weight = bits[..., 0] | (bits[..., 1] << 16)
    else:
        # Any byte <= 242 is valid; the spare digits of byte 25 are never read.
        weight = mx.random.randint(0, 243, (n, k // GROUP_SIZE * TERNARY_GROUP_BYTES),
                                   key=kw).astype(mx.uint8)
    scales = (mx.random.uniform(0.5, 1.5, (n, k // GROUP_SIZE), key=ks) * 0.05).astype(scale_dtype)
    return weight, scales


def misaligned(x: mx.array) -> mx.array:
    """x's values as a view one element past a 16-byte boundary: what the kernels' element-wise
    paths (x not aligned for vector or TMA loads) run on (self-checks, benchmarks)."""
    flat = mx.concatenate([mx.zeros((1,), x.dtype), x.reshape(-1)])
    return flat[1:].reshape(x.shape)


def relative_error(y: mx.array, ref: mx.array) -> float:
    """max |y - ref| / max |ref|, in float32; NaN anywhere in y gives NaN (never passes)."""
    y, ref = y.astype(mx.float32), ref.astype(mx.float32)
    if not mx.all(mx.isfinite(y)).item():
        return math.nan
    return (mx.abs(y - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-30)).item()


SELF_CHECK_TOLERANCE = 1e-2
_CHECKED: dict[tuple, bool] = {}


def _words_of(weight: mx.array) -> mx.array:
    """Ternary digit words of base-3 rows, made on the CPU (NumPy): what the checks compare
    the GPU's pass with and feed the kernels."""
    return mx.array(pack_trit_words(unpack_trits(np.array(weight))))


def _self_check(ks: KernelSet, strategy: str, kind: str, dtype: mx.Dtype, scale_dtype: mx.Dtype,
                variant: tuple, stacklevel: int = 3, words: bool = False) -> bool:
    """Run the kernel `variant` (see KernelSet.variant) on small random data, ternary weights
    as digit words if `words`; warn once on failure (the warning points `stacklevel` frames
    up)."""
    key = (ks.backend, ks.factory, strategy, kind, dtype, scale_dtype, variant, words)
    if key in _CHECKED:
        return _CHECKED[key]
    # Shapes that cross every tile edge: ragged M (a second, partial pass or tile), ragged N
    # (202: not a multiple of the GEMV's 4 or the GEMMs' 64 rows), K = 3 groups (not a multiple
    # of the GEMV's 2048-wide sweep; more K-steps than the wgmma ring has stages).
    if strategy == "gemv":
        rows = 2 * variant[0] - 1
    elif strategy in ("gemm", "wgmma"):
        rows = variant[0] + 7  # variant[0]: the tile's BM
    else:
        rows = 5
    n, k = 202, 3 * GROUP_SIZE
    kx, kw = mx.random.split(mx.random.key(1))
    x = mx.random.normal((rows, k), key=kx).astype(dtype)
    weight, scales = random_packed(kind, n, k, scale_dtype, key=kw)
    # x [M, K] and [1, M, K]: the kernels read both ranks themselves (KernelSet.launcher). The
    # wgmma kernel takes x 2 bytes off 16-byte alignment (a view) through another loop.
    xs = [x, x[None]]
    if strategy == "wgmma":
        xs.append(misaligned(x))
    try:
        ref = reference_matmul(x.astype(mx.float32), weight, scales, kind)
        packed = _words_of(weight) if words else weight
        err = max(relative_error(ks.run(strategy, xr, packed, scales, kind, init_value=math.nan,
                                        variant=variant or None).reshape(ref.shape), ref)
                  for xr in xs)
        reason = f"relative error {err:.3g} > {SELF_CHECK_TOLERANCE}"
        ok = err <= SELF_CHECK_TOLERANCE  # False for NaN
    except Exception as e:  # a kernel that does not build or launch: same fallback
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        held = " (digit words)" if words else ""
        warnings.warn(
            f"mlx_bonsai: the {ks.backend} '{strategy}' kernel for {kind} weights{held} and "
            f"{dtype} activations failed its self-check ({reason}); using the reference path "
            "instead",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    _CHECKED[key] = ok
    return ok


# What packed_matmul runs, per everything a call's choice depends on (see _plan_key): decided
# and checked on a shape's first call, so that later calls cost a dictionary lookup and the
# launch (10 -> 5.5 us of Python a call on the CI machine's CPU, ~80 calls a step).
_PLANS: dict[tuple, Launch] = {}


def _plan_key(x: mx.array, weight: mx.array, scales: mx.array, kind: str, group_size: int,
              strategy: str | None) -> tuple:
    return (kind, x.shape, x.dtype, weight.shape, weight.dtype, scales.shape, scales.dtype,
            group_size, strategy, os.environ.get(ENV_VAR), _device_backend(), _FUSED_ONLY.get())


def packed_matmul(x: mx.array, weight: mx.array, scales: mx.array, kind: str,
                  group_size: int = GROUP_SIZE, *, strategy: str | None = None) -> mx.array:
    """x [..., K] @ W^T for a bonsai-packed `weight`/`scales` of `kind` ("binary"/"ternary").

    GPU kernels where MLX runs on Metal or CUDA (strategy per shape, self-checked on first use),
    the pure-MLX reference elsewhere or when MLX_BONSAI_KERNELS=reference.
    """
    key = _plan_key(x, weight, scales, kind, group_size, strategy)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(x, weight, scales, kind, group_size, strategy)
        _PLANS[key] = plan
    return plan(x, weight, scales)


def _plan(x: mx.array, weight: mx.array, scales: mx.array, kind: str, group_size: int,
          strategy: str | None) -> Launch:
    """What packed_matmul runs for inputs of these shapes and dtypes, checked."""
    n, k = _check_inputs(x, weight, scales, kind, group_size)
    mode = _mode()
    backend = _device_backend()
    reference = functools.partial(reference_matmul, kind=kind)
    if mode == "reference" or backend is None:
        return reference
    m = math.prod(x.shape[:-1])
    words = is_ternary_words(kind, weight)
    strategy = strategy or (None if mode == "auto" else mode)
    strategy = strategy or choose_strategy(backend, kind, m, n, k, x.dtype, words)
    if strategy not in STRATEGIES:
        raise BonsaiError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    ks = kernel_set(backend)
    if words and not ks.takes_words(strategy):  # before the self-check, which would hide it
        raise ConfigError(f"ternary weights held as digit words run on the CUDA "
                          f"{' and '.join(WORDS_STRATEGIES)} kernels only, not {backend} "
                          f"{strategy}; set {ENV_VAR} before loading the model")
    if not ks.supports(strategy, x.dtype):
        raise ConfigError(f"the {backend} {strategy} kernel does not take {x.dtype} activations "
                          f"(strategy forced by {ENV_VAR} or the caller)")
    variant = ks.variant(strategy, m, n)  # once: the self-check and the launch both need it
    if not _self_check(ks, strategy, kind, x.dtype, scales.dtype, variant, stacklevel=4,
                       words=words):
        return reference
    return ks.launcher(strategy, m, n, k, x.dtype, scales.dtype, kind, variant=variant,
                       lead=x.shape[:-1], words=words)


def _fields_check(ks: KernelSet) -> bool:
    """Whether the GPU's base-3 -> digit words pass writes exactly the words of
    packing.pack_trit_words (random rows, 3 groups; once per KernelSet; warns on failure)."""
    key = (ks.backend, ks.factory, "fields")
    if key not in _CHECKED:
        weight, _ = random_packed("ternary", 202, 3 * GROUP_SIZE, key=mx.random.key(4))
        try:
            got = ks.fields(202, 3 * GROUP_SIZE)(weight)
            ok = bool(mx.array_equal(got, _words_of(weight)).item())
            reason = "words differ"
        except Exception as e:
            ok, reason = False, f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn(f"mlx_bonsai: the {ks.backend} pass that makes ternary digit words "
                          f"failed its self-check ({reason}); ternary layers stay base-3 bytes",
                          RuntimeWarning, stacklevel=4)
        _CHECKED[key] = ok
    return _CHECKED[key]


def holds_ternary_words(dtype: mx.Dtype) -> bool:
    """Whether ternary layers computing in `dtype` are best held as digit words on this device.

    Yes on Hopper GPUs in the default mode (or MLX_BONSAI_KERNELS=wgmma), for bf16 and fp16:
    making the words from the base-3 bytes in every call cost 2.5-11% of a ternary call on an
    H100 (BENCHMARKS.md); held, they take 32 bytes a group of 128 instead of 26 (+23% of the
    ternary weights' bytes). Elsewhere no: the Metal kernels and the other CUDA ones read
    base-3 bytes, and float32 has no wgmma kernel.
    """
    if _device_backend() != "cuda" or _mode() not in ("auto", "wgmma"):
        return False
    ks = kernel_set("cuda")
    return ks.supports("wgmma", dtype) and _fields_check(ks)


def ternary_words(weight: mx.array) -> mx.array:
    """Ternary base-3 rows [n, k/128*26] (uint8) -> digit words [n, k/16] (uint32), by the CUDA
    pass (metal/packed_fields.cu); lazy, like any MLX op."""
    if weight.ndim != 2 or weight.dtype != mx.uint8 or weight.shape[1] % TERNARY_GROUP_BYTES:
        raise WeightsError(f"ternary weight must be uint8 [N, K/128*26], got {weight.dtype} "
                           f"{tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[1] // TERNARY_GROUP_BYTES * GROUP_SIZE
    return kernel_set("cuda").fields(n, k)(weight)


def time_call(fn: Callable[[], mx.array], warmup: int = 3, repeats: int = 5,
              calls: int = 10, together: bool = False) -> float:
    """Median seconds per call of `fn` over `repeats` runs of `calls` calls, after `warmup`.

    By default each call is queued as an evaluation of its own, so the GPU runs them one after
    another, as a model's dependent layers run, while Python builds the next call. Calls
    evaluated together are independent nodes of one CUDA graph, which MLX's CUDA backend runs
    concurrently, filling each other's idle SMs: that flattered the wgmma kernel by up to 1.45x at
    1536 rows (H100, BENCHMARKS.md, session 10). `together=True` evaluates each run's calls
    together: for host-bound calls (one row of x), where one evaluation per call would time
    mostly the evaluation."""
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        mx.synchronize()
        t0 = time.perf_counter()
        if together:
            mx.eval([fn() for _ in range(calls)])
        else:
            outs = []  # held until the GPU has run them all
            for _ in range(calls):
                outs.append(fn())
                mx.async_eval(outs[-1])
            mx.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return sorted(times)[len(times) // 2]


def tune(kind: str, shapes: Iterable[tuple[int, int, int]], dtype: mx.Dtype = mx.bfloat16,
         scale_dtype: mx.Dtype = mx.bfloat16) -> dict[tuple[int, int, int], dict[str, float]]:
    """Time every strategy at each (M, N, K) on this GPU and use the fastest from then on.

    Returns {shape: {strategy: seconds}}. Strategies that fail their self-check are skipped.
    Calls are timed one after another, alone: inside a whole step the order can differ, as MLX's
    CUDA graphs run independent work concurrently, e.g. a scratch decode (it needs only the
    weights) beside earlier layers (BENCHMARKS.md, sessions 8 and 10), so check a tuned choice
    with a whole step.
    """
    backend = _device_backend()
    if backend is None:
        raise BonsaiError("tune() needs MLX on a Metal or CUDA GPU")
    ks = kernel_set(backend)
    results = {}
    for m, n, k in shapes:
        kx, kw = mx.random.split(mx.random.key(2))
        x = mx.random.normal((m, k), key=kx).astype(dtype)
        weight, scales = random_packed(kind, n, k, scale_dtype, key=kw)
        mx.eval(x, weight, scales)
        timings = {}
        for strategy in STRATEGIES:
            if (strategy == "gemv" and m > GEMV_MAX_M) or not ks.supports(strategy, dtype):
                continue
            variant = ks.variant(strategy, m, n)  # once: the self-checked kernel is the timed one
            if _self_check(ks, strategy, kind, dtype, scale_dtype, variant):
                launch = ks.launcher(strategy, m, n, k, dtype, scale_dtype, kind, variant=variant)
                timings[strategy] = time_call(functools.partial(launch, x, weight, scales),
                                              together=m == 1)
        if timings:
            _TUNED[(backend, kind, dtype, m, n, k)] = min(timings, key=timings.get)
            _PLANS.clear()  # plans made before hold the default strategy
        results[(m, n, k)] = timings
    return results
