"""Scheduler tables for the manifest, taken from the pipeline's real diffusers scheduler.

The runner needs no diffusers: for each step count 1..MAX_STEPS it gets the timesteps the UNet sees, the
sigmas (one more than timesteps; the last is 0) and the initial noise scale, and derives the fused step's
coefficients from them (Euler / Euler-ancestral, epsilon or v-prediction).
"""

from __future__ import annotations

import copy
from typing import Any

from turbo_trt.errors import SourceError

MAX_STEPS = 4
SUPPORTED = {"EulerDiscreteScheduler": False, "EulerAncestralDiscreteScheduler": True}
PREDICTIONS = ("epsilon", "v_prediction")


def scheduler_tables(scheduler: Any) -> dict[str, Any]:
    name = type(scheduler).__name__
    if name not in SUPPORTED:
        raise SourceError(
            f"scheduler {name} is not supported; turbo-trt fuses Euler and Euler-ancestral steps "
            f"({', '.join(SUPPORTED)})"
        )
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTIONS:
        raise SourceError(f"prediction type {prediction!r} is not supported ({', '.join(PREDICTIONS)})")
    tables: dict[str, Any] = {}
    for steps in range(1, MAX_STEPS + 1):
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(steps)
        tables[str(steps)] = {
            "timesteps": [float(t) for t in sched.timesteps],
            "sigmas": [float(s) for s in sched.sigmas],
            "init_noise_sigma": float(sched.init_noise_sigma),
        }
    return {
        "class": name,
        "ancestral": SUPPORTED[name],
        "prediction_type": prediction,
        "timestep_spacing": scheduler.config.get("timestep_spacing"),
        "num_train_timesteps": int(scheduler.config.num_train_timesteps),
        "max_steps": MAX_STEPS,
        "tables": tables,
    }


def scheduler_tables_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Tables from a scheduler_config.json dict (no weights needed): instantiates the named class."""
    import diffusers

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None) if name in SUPPORTED else None
    if cls is None:
        raise SourceError(
            f"scheduler {name or '(unnamed)'} is not supported; turbo-trt fuses Euler and Euler-ancestral "
            f"steps ({', '.join(SUPPORTED)})"
        )
    return scheduler_tables(cls.from_config(config))
