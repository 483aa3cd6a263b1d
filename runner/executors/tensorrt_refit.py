"""Refit deserialized TensorRT engines with new weights (run-time LoRAs), without a rebuild.

An engine built with `BuilderFlag.REFIT` (`turbo-trt build --refittable`) names its refittable weights by
the ONNX initializer names of the graph it was parsed from; runner/lora.py computes new values for exactly
the initializers a LoRA change touches, in the graph's layout and dtype. Per engine: one `Refitter`,
`set_named_weights` for each changed weight, then any weights TensorRT still reports missing (weights it
refits together with a changed one, e.g. a fused layer's other inputs) at their current values, and one
`refit_cuda_engine` (or `refit_cuda_engine_async` on the executor's stream). The arrays stay referenced
until the refit returns (TensorRT reads them then, it does not copy them earlier).

Shared by both flavors (tensorrt, tensorrt_rtx have the same Refitter API). The executor calls
`refit_engines` from its `set_weights(updates, current_weight)` between images (never during a graph
launch); captured CUDA graphs stay valid because a refit rewrites weights in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from turbo_trt.errors import FlavorError

if TYPE_CHECKING:  # the common API, typed by tensorrt-stubs (tensorrt_rtx has the same classes)
    import tensorrt as trt_api

#: component -> initializer name -> new value (graph layout and dtype), or None for "back to base".
Updates = Mapping[str, Mapping[str, "np.ndarray | None"]]
#: (component, initializer) -> the weight's value in the set being applied (the merge of its LoRAs, or
#: the base): `BundleLoras.current_weight` in runner/lora.py.
CurrentWeight = Callable[[str, str], np.ndarray]


class RefitError(FlavorError):
    """TensorRT refused new weights or the refit (engine not built refittable, wrong size or dtype)."""


@dataclass
class RefitReport:
    """What one refit did: weights and bytes sent per component, the extra weights TensorRT asked for,
    and seconds (setting weights + refitting)."""

    weights: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    missing_filled: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _prototype_matches(trt: Any, refitter: trt_api.Refitter, name: str, value: np.ndarray, component: str) -> None:
    prototype: trt_api.Weights = refitter.get_weights_prototype(name)
    expected = np.dtype(trt.nptype(prototype.dtype))
    if prototype.size != value.size or expected != value.dtype:
        raise RefitError(f"{component}: weight {name} is {prototype.size} x {expected.name} in the engine, the new "
                         f"value is {value.size} x {value.dtype.name}; the bundle's weight map does not fit its engine")


def refit_engines(
    trt: Any,
    engines: Mapping[str, trt_api.ICudaEngine],
    logger: trt_api.ILogger,
    updates: Updates,
    current_weight: CurrentWeight,
    stream: int | None = None,
    log: Callable[[str], None] | None = None,
) -> RefitReport:
    """Refit each engine named in `updates` (component -> {initializer: value or None}).

    `trt` is the flavor's module (`Flavor.trt`), `engines` the deserialized engines by component, `logger`
    the ILogger they were deserialized with. `current_weight(component, name)` supplies the value in the set
    being applied for None entries (the base) and for weights TensorRT reports missing. With `stream` (a
    CUDA stream handle) the refit is asynchronous on that stream (the caller synchronizes before the next
    launch). Raises RefitError if TensorRT rejects a weight or the refit; an engine that fails part-way
    must be refitted again (runner/lora.py re-sends every weight of both sets) or reloaded."""
    report = RefitReport()
    start = time.perf_counter()
    for component, changes in updates.items():
        if not changes:
            continue
        engine = engines.get(component)
        if engine is None:
            raise RefitError(f"no engine for {component} to refit")
        refitter: trt_api.Refitter = trt.Refitter(engine, logger)
        keep: list[np.ndarray] = []  # TensorRT reads these during refit_cuda_engine: keep them alive

        def put(name: str, value: np.ndarray, component: str = component, refitter: trt_api.Refitter = refitter,
                keep: list[np.ndarray] = keep) -> None:
            array = np.ascontiguousarray(value)
            _prototype_matches(trt, refitter, name, array, component)
            keep.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise RefitError(f"{component}: TensorRT rejected new weights for {name}; was the engine built "
                                 "with --refittable?")

        refittable = set(refitter.get_all_weights())
        unknown = sorted(name for name in changes if name not in refittable)
        if unknown:
            raise RefitError(f"{component}: the engine has no refittable weights named {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}; rebuild the bundle with --refittable")
        for name, value in changes.items():
            put(name, value if value is not None else current_weight(component, name))
        missing = refitter.get_missing_weights()
        for name in missing:
            given = changes.get(name)
            put(name, given if given is not None else current_weight(component, name))
        still = refitter.get_missing_weights()
        if still:
            raise RefitError(f"{component}: TensorRT still needs weights {', '.join(still[:5])} to refit")
        done = refitter.refit_cuda_engine() if stream is None else refitter.refit_cuda_engine_async(stream)
        if not done:
            raise RefitError(f"{component}: refitting the engine failed")
        report.weights[component] = len(keep)
        report.bytes[component] = sum(a.nbytes for a in keep)
        report.missing_filled[component] = len(missing)
        if log is not None and time.perf_counter() - start > 1.0:
            log(f"refitted {component}: {len(keep)} weights, {report.bytes[component] / 2**20:.1f} MiB "
                f"({time.perf_counter() - start:.1f} s so far)")
    report.seconds = time.perf_counter() - start
    return report
