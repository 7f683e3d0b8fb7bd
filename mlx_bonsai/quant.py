"""The one linear layer of the model code.

Model files build every projection as `Linear(in, out)` and never look at how its weight is
stored. Loading decides the storage (dense today; packed binary/ternary formats plug in here)
so that quantized checkpoints drop in without touching the model code.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


class Linear(nn.Module):
    """y = x @ W^T (no bias, as in every FLUX.2 transformer linear)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = mx.random.uniform(-bound, bound, (out_features, in_features))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.T
