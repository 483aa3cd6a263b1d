"""The fused step's coefficients against diffusers' own schedulers, step by step, for Euler and
Euler-ancestral with epsilon and v-prediction, txt2img and img2img plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from turbo_trt.builder.schedules import scheduler_tables
from turbo_trt.errors import InputError
from turbo_trt.runner.schedule import all_plans, img2img_plan, txt2img_plan

SHAPE = (1, 4, 8, 8)


def _scheduler(cls, prediction):
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               timestep_spacing="trailing", prediction_type=prediction)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_txt2img_steps_match_diffusers(cls, prediction, steps):
    sched = _scheduler(cls, prediction)
    tables = scheduler_tables(sched)
    plan = txt2img_plan(tables, steps)
    sched.set_timesteps(steps)
    rng = np.random.default_rng(steps)
    raw = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
    x_ref = raw * sched.init_noise_sigma  # what the pipelines do with latents=
    x_ours = raw.clone()  # the fused graph gets the raw noise; the first step's c_in and a absorb the scale
    for k, t in enumerate(sched.timesteps):
        model_in_ref = sched.scale_model_input(x_ref, t)
        c_in, a, b, c = (float(v) for v in plan.coeffs[k])
        np.testing.assert_allclose((x_ours * c_in).numpy(), model_in_ref.numpy(), rtol=1e-5, atol=1e-6)
        assert float(plan.timesteps[k]) == float(t)
        out = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))  # stands in for the UNet
        generator = torch.Generator().manual_seed(k)
        x_ref = sched.step(out, t, x_ref, generator=generator).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        x_ours = a * x_ours + b * out + c * noise
        np.testing.assert_allclose(x_ours.numpy(), x_ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("steps, strength", [(2, 0.5), (4, 0.75), (4, 1.0), (3, 0.34)])
def test_img2img_plan_follows_get_timesteps(cls, steps, strength):
    sched = _scheduler(cls, "epsilon")
    plan = img2img_plan(scheduler_tables(sched), steps, strength)
    sched.set_timesteps(steps)
    run = min(int(steps * strength), steps)  # diffusers' get_timesteps
    start = steps - run
    assert plan.start == start and plan.runs == run
    np.testing.assert_array_equal(plan.timesteps, sched.timesteps[start:].numpy())
    assert plan.noise_sigma == pytest.approx(float(sched.sigmas[start]))
    # add_noise at the first img2img timestep is init + sigma * noise
    sched.set_begin_index(start)
    init, noise = torch.ones(SHAPE), torch.full(SHAPE, 2.0)
    noisy = sched.add_noise(init, noise, sched.timesteps[start:start + 1])
    np.testing.assert_allclose(noisy.numpy(), (init + plan.noise_sigma * noise).numpy(), rtol=1e-6)
    assert plan.coeffs[0][1] == pytest.approx(1.0)  # no initial-noise folding for img2img


def test_plan_errors_and_enumeration():
    tables = scheduler_tables(_scheduler(EulerDiscreteScheduler, "epsilon"))
    with pytest.raises(InputError, match="1..4"):
        txt2img_plan(tables, 0)
    with pytest.raises(InputError, match="runs int"):
        img2img_plan(tables, 2, 0.4)
    plans = all_plans(tables)
    assert len(plans) == 4 + (1 + 2 + 3 + 4)
    assert len({p.key for p in plans}) == len(plans)
