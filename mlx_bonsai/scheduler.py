"""Flow-matching Euler sampling for FLUX.2 klein (diffusers' FlowMatchEulerDiscreteScheduler).

The schedule is tiny and computed once per generation on the host in float32 NumPy, with the
same operation order as diffusers so that sigmas agree to the last bit. The Euler update runs
in MLX, in float32, and casts back to the model dtype as diffusers does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import ConfigError
from .weights import read_json

# FLUX.2's empirical fit of the shift mu over (image tokens, steps): lines for 10 and 200 steps.
_MU_10 = (8.73809524e-05, 1.89833333)
_MU_200 = (0.00016927, 0.45666666)

# Options of the diffusers scheduler that FLUX.2 klein never uses; refused rather than ignored.
_UNSUPPORTED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "shift_terminal",
    "stochastic_sampling",
)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Timestep-shift parameter for `image_seq_len` image tokens and `num_steps` steps."""
    m200 = _MU_200[0] * image_seq_len + _MU_200[1]
    if image_seq_len > 4300:
        return float(m200)
    m10 = _MU_10[0] * image_seq_len + _MU_10[1]
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * num_steps + b)


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "scheduler config") -> SchedulerConfig:
        for name in _UNSUPPORTED:
            if config.get(name):
                raise ConfigError(f"{where}: '{name}' is not supported by FLUX.2 klein sampling")
        shift_type = config.get("time_shift_type", "exponential")
        if shift_type not in ("exponential", "linear"):
            raise ConfigError(
                f"{where}: time_shift_type '{shift_type}' is unknown (exponential or linear)"
            )
        steps = config.get("num_train_timesteps", 1000)
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"{where}: num_train_timesteps must be a positive integer")
        return cls(
            num_train_timesteps=steps,
            shift=float(config.get("shift", 3.0)),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", True)),
            time_shift_type=shift_type,
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SchedulerConfig:
        path = Path(directory) / "scheduler_config.json"
        return cls.from_dict(read_json(path), str(path))


def sigmas(config: SchedulerConfig, num_steps: int, image_seq_len: int) -> np.ndarray:
    """float32 sigmas for `num_steps` steps plus the trailing 0 (length num_steps + 1)."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if config.use_dynamic_shifting:
        mu = empirical_mu(image_seq_len, num_steps)
        # NumPy promotes the Python floats to float32 here, exactly as in diffusers.
        if config.time_shift_type == "exponential":
            shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1) ** 1.0)
        else:
            shifted = mu / (mu + (1 / base - 1) ** 1.0)
    else:
        shifted = config.shift * base / (1 + (config.shift - 1) * base)
    return np.concatenate([shifted.astype(np.float32), np.zeros(1, np.float32)])


def euler_step(x: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x + (sigma_next - sigma) * v, accumulated in float32 and cast to the velocity's dtype.

    As in diffusers, the product dt * v is formed in the velocity's dtype (torch keeps a 0-d
    float32 scalar times a bf16 tensor in bf16); only the sum is float32.
    """
    dt = np.float32(sigma_next) - np.float32(sigma)
    step = mx.array(dt, dtype=velocity.dtype) * velocity
    return (x.astype(mx.float32) + step).astype(velocity.dtype)


def euler_loop(
    velocity: Callable[[mx.array, mx.array], mx.array],
    x: mx.array,
    schedule: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> mx.array:
    """Euler steps over `schedule` (sigmas from `sigmas`): x <- euler_step(x, velocity(x, t_i)),
    with t_i = sigma_i as the reference passes it (sigma * 1000 rounded to x's dtype, / 1000).
    Returns the final x, evaluated; progress(i) after step i.

    Step i's graph is built in Python while the GPU still runs step i - 1, and queued once that
    step is done: Python's time overlaps the GPU's, but no more work is in flight than one step's
    (queuing it before waiting was faster still on an H100, and raised the peak by 0.6-3 GB).
    """
    done = progress or (lambda i: None)
    for i in range(len(schedule) - 1):
        t = mx.array(schedule[i : i + 1] * 1000).astype(x.dtype) / 1000
        step = euler_step(x, velocity(x, t), schedule[i], schedule[i + 1])
        mx.eval(x)
        if i:
            done(i - 1)
        mx.async_eval(step)
        x = step
    mx.eval(x)
    done(len(schedule) - 2)
    return x
