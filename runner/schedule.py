"""Per-step coefficients of the fused UNet step, from the manifest's scheduler tables (numpy only).

The UNet graph computes `next = a * x + b * unet(c_in * x, t) + c * noise`. For the diffusers Euler and
Euler-ancestral schedulers (s_churn = 0) one step from sigma to sigma_next is, with dt the step in sigma:

    epsilon:       x0 = x - sigma * out                      -> a = 1, b = dt
    v_prediction:  x0 = -sigma / sqrt(sigma^2 + 1) * out + x / (sigma^2 + 1)
                                                              -> a = 1 + dt * sigma / (sigma^2 + 1),
                                                                 b = dt / sqrt(sigma^2 + 1)
    Euler:            dt = sigma_next - sigma, c = 0
    Euler-ancestral:  sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
                      sigma_down = sqrt(sigma_next^2 - sigma_up^2), dt = sigma_down - sigma, c = sigma_up

and c_in = 1 / sqrt(sigma^2 + 1) (`scale_model_input`). txt2img starts from raw standard-normal noise
N with x = init_noise_sigma * N: the first step's c_in and a absorb that factor, so no separate scaling
pass runs. img2img follows diffusers' `get_timesteps`: with n steps and strength s it skips the first
n - int(n * s) steps and starts from `scaled_latents + sigma_start * noise` (the VAE encoder graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from turbo_trt.errors import InputError


@dataclass(frozen=True)
class Plan:
    """Everything per (mode, steps, start) that the engines need besides the per-call data."""

    mode: str  # "txt2img" or "img2img"
    steps: int  # the num_inference_steps asked for
    start: int  # index of the first step run (img2img skips `start` steps)
    timesteps: np.ndarray  # (k,) float32, the UNet's timestep per step run
    coeffs: np.ndarray  # (k, 4) float32: c_in, a, b, c per step run
    noise_sigma: float  # img2img: sigma of the noise added to the encoded image; txt2img: 0

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.mode, self.steps, self.start)

    @property
    def runs(self) -> int:
        return len(self.timesteps)


def _table(scheduler: dict[str, Any], steps: int) -> dict[str, Any]:
    max_steps = int(scheduler["max_steps"])
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= max_steps:
        raise InputError(f"num_inference_steps must be an integer in 1..{max_steps}, got {steps!r}")
    return scheduler["tables"][str(steps)]


def _coefficients(sigma: float, sigma_next: float, ancestral: bool, prediction: str) -> list[float]:
    if ancestral and sigma_next > 0.0:
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    else:
        sigma_up, sigma_down = 0.0, sigma_next
    dt = sigma_down - sigma
    if prediction == "epsilon":
        a, b = 1.0, dt
    elif prediction == "v_prediction":
        a, b = 1.0 + dt * sigma / (sigma**2 + 1.0), dt / math.sqrt(sigma**2 + 1.0)
    else:
        raise InputError(f"prediction type {prediction!r} is not supported")
    return [1.0 / math.sqrt(sigma**2 + 1.0), a, b, sigma_up]


def _plan(scheduler: dict[str, Any], mode: str, steps: int, start: int, table: dict[str, Any]) -> Plan:
    sigmas = [float(s) for s in table["sigmas"]]
    rows = [_coefficients(sigmas[i], sigmas[i + 1], bool(scheduler["ancestral"]), scheduler["prediction_type"])
            for i in range(start, steps)]
    if mode == "txt2img":
        scale = float(table["init_noise_sigma"])
        rows[0][0] *= scale
        rows[0][1] *= scale
    return Plan(
        mode=mode, steps=steps, start=start,
        timesteps=np.asarray(table["timesteps"][start:], dtype=np.float32),
        coeffs=np.asarray(rows, dtype=np.float32),
        noise_sigma=sigmas[start] if mode == "img2img" else 0.0,
    )


def txt2img_plan(scheduler: dict[str, Any], steps: int) -> Plan:
    return _plan(scheduler, "txt2img", steps, 0, _table(scheduler, steps))


def img2img_plan(scheduler: dict[str, Any], steps: int, strength: float) -> Plan:
    """diffusers' rule: int(steps * strength) steps run; at least one must (strength in (0, 1])."""
    table = _table(scheduler, steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InputError(
            f"strength {strength} with {steps} steps runs int({steps} * {strength}) = 0 steps; "
            f"use strength >= {1 / steps:g} or more steps"
        )
    return _plan(scheduler, "img2img", steps, steps - run, table)


def all_plans(scheduler: dict[str, Any]) -> list[Plan]:
    """Every plan a bundle can run: txt2img for 1..max_steps, img2img for each (steps, first step run).
    Executors upload all their constants once at load, so no call allocates device memory."""
    max_steps = int(scheduler["max_steps"])
    plans = [txt2img_plan(scheduler, n) for n in range(1, max_steps + 1)]
    for n in range(1, max_steps + 1):
        table = _table(scheduler, n)
        plans += [_plan(scheduler, "img2img", n, start, table) for start in range(n)]
    return plans
