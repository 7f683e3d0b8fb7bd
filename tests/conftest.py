import mlx.core as mx
import numpy as np
import pytest

from mlx_bonsai.kernels import unpack_ternary


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    mx.random.seed(0)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: one number that tolerances are stated in."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# metal/packed_fields.cu's documented layout: per stage of 64 weights (4 runs of 16) 4 uint32;
# input `at` of run r is digit code + 1 in the 2 bits at bit SHIFT[r, at] of word WORD[r, at]
# (word t of lane t = (at % 8) // 2; bits 16 (r // 2) + 2 (r % 2) + 4 (at % 2 + 2 (at // 8))).
_RUN, _AT = np.meshgrid(np.arange(4), np.arange(16), indexing="ij")
WORD = (_AT % 8) // 2
SHIFT = 16 * (_RUN // 2) + 2 * (_RUN % 2) + 4 * (_AT % 2 + 2 * (_AT // 8))


def fields_of(weight: mx.array) -> mx.array:
    """metal/packed_fields.cu's output, from its documented layout (WORD, SHIFT)."""
    n = weight.shape[0]
    codes = np.array(unpack_ternary(weight, mx.ones((n, weight.shape[1] // 26)), mx.float32))
    codes = codes.astype(np.int64).reshape(n, -1, 4, 16)
    words = np.zeros((*codes.shape[:2], 4), np.int64)
    for r, at in np.ndindex(4, 16):
        words[..., WORD[r, at]] |= (codes[..., r, at] + 1) << SHIFT[r, at]
    return mx.array(words.reshape(n, -1).astype(np.uint32))


def unfields(fields: mx.array) -> mx.array:
    """Codes {-1, 0, 1} [n, k] back from fields_of's words."""
    words = np.array(fields).astype(np.int64).reshape(fields.shape[0], -1, 4)
    digits = (words[..., WORD] >> SHIFT) & 3  # [n, stages, 4, 16]
    return mx.array((digits - 1).reshape(fields.shape[0], -1).astype(np.float32))
