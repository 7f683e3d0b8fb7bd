"""Converter to bonsai-packed v1: `python -m mlx_bonsai.convert SOURCE OUTPUT [--variant ...]`.

This package lives at the repository top level and is reached as `mlx_bonsai.convert` through a
symlink, so the runtime package and the converter share one import path.
"""

from .converter import VARIANTS, convert

__all__ = ["VARIANTS", "convert"]
