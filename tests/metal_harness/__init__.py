"""Run the package's Metal kernels on the CPU: an MSL execution harness for Linux CI.

`metal_kernel` is a drop-in for `mx.fast.metal_kernel`; see README.md in this folder.
"""

from .driver import (
    HarnessError,
    KernelCompileError,
    KernelRaceError,
    KernelRuntimeError,
    have_compiler,
    metal_kernel,
)

__all__ = [
    "HarnessError",
    "KernelCompileError",
    "KernelRaceError",
    "KernelRuntimeError",
    "have_compiler",
    "metal_kernel",
]
