"""Sigma schedules and Euler steps against diffusers' FlowMatchEulerDiscreteScheduler."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from mlx_bonsai.errors import ConfigError
from mlx_bonsai.scheduler import SchedulerConfig, empirical_mu, euler_loop, euler_step, sigmas

# scheduler/scheduler_config.json of FLUX.2 klein (architecture.md §2.4)
KLEIN = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
    invert_sigmas=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    stochastic_sampling=False,
)

SIZES = [(256, 256), (512, 512), (1024, 1024), (1536, 640), (2048, 2048)]


def reference_sigmas(config, steps, seq_len):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    base = np.linspace(1.0, 1 / steps, steps)  # what Flux2KleinPipeline passes
    sched.set_timesteps(sigmas=base, mu=compute_empirical_mu(seq_len, steps))
    return sched.sigmas.numpy(), sched.timesteps.numpy()


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("steps", range(1, 9))
def test_sigmas_match_diffusers(width, height, steps):
    seq_len = (width // 16) * (height // 16)
    expected, timesteps = reference_sigmas(KLEIN, steps, seq_len)
    ours = sigmas(SchedulerConfig.from_dict(KLEIN), steps, seq_len)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    assert np.abs(ours - expected).max() <= 1e-7
    assert np.abs(ours[:-1] * 1000 - timesteps).max() <= 1e-4


def test_known_values():
    # architecture.md §6.1, 4 steps at 1024^2
    s = sigmas(SchedulerConfig.from_dict(KLEIN), 4, 4096)
    np.testing.assert_allclose(s, [1.0, 0.967384, 0.9081439, 0.7671999, 0.0], atol=1e-6)
    assert empirical_mu(1024, 4) == pytest.approx(2.030690, abs=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_fixed_shift_matches_diffusers(steps):
    config = dict(KLEIN, use_dynamic_shifting=False, shift=3.0)
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=1.0)
    ours = sigmas(SchedulerConfig.from_dict(config), steps, 1024)
    assert np.abs(ours - sched.sigmas.numpy()).max() <= 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_matches_diffusers(dtype):
    sched = FlowMatchEulerDiscreteScheduler(**KLEIN)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=compute_empirical_mu(1024, 4))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, 16, 8)).astype(np.float32)).to(dtype)
    ours = mx.array(x.float().numpy()).astype(
        mx.bfloat16 if dtype == torch.bfloat16 else mx.float32
    )
    table = sched.sigmas.numpy()
    for i, t in enumerate(sched.timesteps):
        v = torch.from_numpy(rng.standard_normal((1, 16, 8)).astype(np.float32)).to(dtype)
        x = sched.step(v, t, x, return_dict=False)[0]
        v_mx = mx.array(v.float().numpy()).astype(ours.dtype)
        ours = euler_step(ours, v_mx, float(table[i]), float(table[i + 1]))
        assert ours.dtype == v_mx.dtype
        np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), x.float().numpy())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_euler_loop_is_the_steps_one_after_another(dtype):
    """The pipelined loop computes exactly the plain loop of euler_step, passing each step the
    timestep rounded as the reference does, and reports every step once, in order."""
    schedule = sigmas(SchedulerConfig.from_dict(KLEIN), 4, 1024)
    x0 = mx.random.normal((1, 16, 8), key=mx.random.key(3)).astype(dtype)
    weight = mx.random.normal((8, 8), key=mx.random.key(4)).astype(dtype)

    def velocity(x, t):
        return mx.tanh(x @ weight) * t

    seen, reported = [], []
    out = euler_loop(lambda x, t: (seen.append(t.item()), velocity(x, t))[1], x0, schedule,
                     reported.append)
    want = x0
    for i in range(4):
        t = mx.array(schedule[i] * 1000, dtype=dtype) / 1000
        assert seen[i] == t.item()
        want = euler_step(want, velocity(want, t), schedule[i], schedule[i + 1])
    assert reported == [0, 1, 2, 3]
    assert out.dtype == dtype and mx.array_equal(out, want)


def test_reads_scheduler_config(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(KLEIN))
    cfg = SchedulerConfig.from_pretrained(tmp_path)
    assert cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_karras_sigmas": True}, "'use_karras_sigmas' is not supported"),
        ({"time_shift_type": "cubic"}, "time_shift_type 'cubic' is unknown"),
        ({"num_train_timesteps": 0}, "num_train_timesteps must be a positive integer"),
    ],
)
def test_bad_config(tmp_path, change, message):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**KLEIN, **change}))
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig.from_pretrained(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="scheduler_config.json: file not found"):
        SchedulerConfig.from_pretrained(tmp_path)
