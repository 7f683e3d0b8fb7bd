"""Reading checkpoints: config files, safetensors, and strict loading into modules.

Every component loads the same way: read the config, build the module, map the checkpoint's
names once (a `sanitize` step in the model file), then `load_into`, which refuses missing,
unexpected and misshapen tensors with an error naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import ConfigError, WeightsError


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def require(config: dict[str, Any], fields: Iterable[str], where: str) -> None:
    """Raise ConfigError naming the first field of `fields` missing from `config`."""
    for name in fields:
        if config.get(name) is None:
            raise ConfigError(f"{where}: required field '{name}' is missing")


def load_safetensors(path: str | Path) -> dict[str, mx.array]:
    """All tensors of one safetensors file, lazily mapped; a damaged file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        tensors = mx.load(str(path))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError for damaged files
        raise WeightsError(
            f"{path}: cannot read safetensors file ({e}); it may be truncated or corrupted, "
            "delete it and download it again"
        ) from None
    if not isinstance(tensors, dict):
        raise WeightsError(f"{path}: not a safetensors file")
    return tensors


def load_safetensors_dir(directory: str | Path) -> dict[str, mx.array]:
    """All tensors of every `*.safetensors` file in `directory` (sharded checkpoints)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no .safetensors files found")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_safetensors(f))
    return weights


def load_into(module: nn.Module, weights: dict[str, mx.array], where: str) -> None:
    """Load `weights` into `module`, refusing missing, unexpected or misshapen tensors."""
    expected = dict(tree_flatten(module.parameters()))
    for key in expected:
        if key not in weights:
            raise WeightsError(f"{where}: weight '{key}' is missing from the checkpoint")
    for key, value in weights.items():
        if key not in expected:
            raise WeightsError(f"{where}: unexpected weight '{key}' in the checkpoint")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{where}: weight '{key}' has shape {tuple(value.shape)}, "
                f"the config expects {tuple(expected[key].shape)}"
            )
    module.update(tree_unflatten(list(weights.items())))


def cast_floats(
    weights: dict[str, mx.array], dtype: mx.Dtype, keep: tuple[str, ...] = ()
) -> dict[str, mx.array]:
    """Cast floating-point tensors to `dtype`; packed integer tensors, and tensors whose name
    ends with one of `keep`, are left as they are."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(keep) else v
        for k, v in weights.items()
    }
