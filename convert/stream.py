"""Write one safetensors file tensor by tensor, so a conversion never holds the whole model.

safetensors puts every tensor's dtype, shape and byte range in the header, before the data. The
converter knows all of them before it quantizes anything, so the header is written first and
each tensor's bytes are appended as soon as that tensor is ready.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

# dtype name (as mx.Dtype prints without the "mlx.core." prefix) -> (safetensors code, bytes)
DTYPES = {
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "uint8": ("U8", 1),
    "uint32": ("U32", 4),
}
_SAME_SIZE_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}


class TensorSpec:
    """Name, dtype name (a key of DTYPES) and shape of one tensor to be written."""

    def __init__(self, name: str, dtype: str, shape: Sequence[int]):
        self.name, self.dtype, self.shape = name, dtype, tuple(int(n) for n in shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for `specs` in order, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPES[spec.dtype][0],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def file_size(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    return len(header_bytes(specs, metadata)) + sum(s.nbytes for s in specs)


class SafetensorsWriter:
    """Context manager: `write` each tensor of `specs` in order; a clean exit checks that all
    were written."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec],
                 metadata: dict[str, str] | None = None):
        self._path, self._specs, self._metadata = path, list(specs), metadata
        self._next = 0

    def __enter__(self) -> SafetensorsWriter:
        self._file = open(self._path, "wb")
        self._file.write(header_bytes(self._specs, self._metadata))
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._file.close()
        if exc_type is None and self._next != len(self._specs):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._specs)} tensors")

    def write(self, name: str, array: mx.array | np.ndarray) -> None:
        spec = self._specs[self._next]
        if isinstance(array, np.ndarray):
            array = mx.array(array)
        if name != spec.name or dtype_name(array.dtype) != spec.dtype or \
                tuple(array.shape) != spec.shape:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.dtype} {spec.shape}, got {name} "
                f"{dtype_name(array.dtype)} {tuple(array.shape)}"
            )
        # An unsigned int view of the same width hands NumPy the raw bits (it has no bfloat16)
        # without a copy; safetensors is little-endian, which is a no-op cast on MLX's hosts.
        raw = np.asarray(mx.view(array, _SAME_SIZE_UINT[DTYPES[spec.dtype][1]]))
        raw = raw.astype(raw.dtype.newbyteorder("<"), copy=False)
        self._file.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
        self._next += 1
