"""Run checked requests in engine calls of the bundle's static batch.

Requests that share a plan (mode, steps and, for img2img, the first step run) and, on a ControlNet bundle,
their control scales (one per net for the whole call) go into one call, in
arrival order, up to the bundle's batch; a short call is padded by repeating its last request. Each
request's noise is drawn from its own seed exactly as a batch-1 call draws it (`make_noise` with a batch
of one), then the rows are stacked, so a request's image does not depend on which requests share its call:
the ONNX Runtime and TensorRT graphs compute each batch row on its own. On a batch-1 bundle a request's
image is bit for bit what `TurboPipeline(prompt, seed=seed, ...)` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..inputs import Control, Noise, make_noise
from .requests import ServeRequest

Outcome = np.ndarray | Exception  # uint8 (H, W, 3), or the error for that request


def request_noise(pipe: Any, request: ServeRequest) -> Noise:
    """The request's random arrays, drawn as a batch-1 call with its seed draws them."""
    shapes = pipe.shapes
    shape = (1, shapes["latent_channels"], shapes["latent_height"], shapes["latent_width"])
    ancestral = request.plan.runs if pipe.scheduler["ancestral"] else 0
    return make_noise(request.seed, shape, request.image is not None, ancestral)


def request_control(pipe: Any, requests: Sequence[ServeRequest]) -> Control | None:
    """The control inputs of one call of requests sharing their scales: each request's images (black without
    one: its scales are 0) stacked along the batch, the scales for every UNet run."""
    nets = int(pipe.shapes.get("controlnets", 0))
    if not nets:
        return None
    shapes = pipe.shapes
    black = np.zeros((nets, shapes["height"], shapes["width"], 3), np.uint8)
    images = np.stack([black if r.control_image is None else r.control_image for r in requests], axis=1)
    scales = np.tile(np.asarray(requests[0].control_scale, np.float32), (requests[0].plan.runs, 1))
    return Control(np.ascontiguousarray(images), scales)


def stack_noise(noises: Sequence[Noise]) -> Noise:
    first = noises[0]
    return Noise(
        latents=np.concatenate([n.latents for n in noises]),
        sample=None if first.sample is None else np.concatenate([n.sample for n in noises]),  # type: ignore[misc]
        steps=None if first.steps is None else
        [np.concatenate([n.steps[k] for n in noises]) for k in range(len(first.steps))],  # type: ignore[index]
    )


def group_by_plan(requests: Sequence[ServeRequest | Exception], batch: int) -> list[list[int]]:
    """Indices of the good requests, grouped by plan key in arrival order, each group at most `batch` long."""
    groups: dict[tuple[Any, ...], list[list[int]]] = {}
    for index, request in enumerate(requests):
        if isinstance(request, Exception):
            continue
        chunks = groups.setdefault((*request.plan.key, *request.control_scale), [[]])
        if len(chunks[-1]) == batch:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in groups.values() for chunk in chunks]


def run_requests(pipe: Any, requests: Sequence[ServeRequest | Exception]) -> list[Outcome]:
    """Images for the good requests, the errors passed through for the bad ones (same order). A failure
    of one engine call (NonFiniteOutputError, an executor's error, any exception) fails only the requests
    in that call: each gets that exception, with its traceback (`errors.answers` logs it under an id)."""
    outcomes: list[Outcome] = [r if isinstance(r, Exception) else np.empty(0, np.uint8) for r in requests]
    for chunk in group_by_plan(requests, pipe.batch):
        members: list[ServeRequest] = [requests[i] for i in chunk]  # type: ignore[misc]
        padded = members + [members[-1]] * (pipe.batch - len(members))
        noise = stack_noise([request_noise(pipe, r) for r in padded])
        plan = members[0].plan
        pixels = None if plan.mode == "txt2img" else np.stack([r.image for r in padded])  # type: ignore[misc]
        control = request_control(pipe, padded)
        try:
            images = pipe.run_with_noise([r.prompt for r in members], plan, noise, pixels, control)
        except Exception as exc:  # noqa: BLE001 - one engine call's failure is its requests' outcome
            for i in chunk:
                outcomes[i] = exc
            continue
        for row, i in enumerate(chunk):
            outcomes[i] = np.ascontiguousarray(images[row])
    return outcomes


def warm_up(pipe: Any) -> int:
    """One call per plan a request is most likely to need (txt2img at every step count; img2img from the
    first step at every step count), so the first requests pay no first-call costs (session
    initialization). Then, when the executor captures graphs (TensorRT on a GPU: it has `prepare`),
    every plan's graphs are captured, both variants, so readiness means no request triggers a capture.
    Returns the number of engine calls made (captures not counted)."""
    from ..schedule import all_plans
    from .requests import ModelFacts, decode_request

    facts = ModelFacts.of(pipe)
    max_steps = int(pipe.scheduler["max_steps"])
    image = np.full((facts.height, facts.width, 3), 127, np.uint8)
    requests: list[ServeRequest | Exception] = []
    for steps in range(1, max_steps + 1):
        requests.append(decode_request({"prompt": b"warm-up", "seed": 0, "steps": steps}, facts))
        if facts.img2img:
            requests.append(decode_request({"prompt": b"warm-up", "seed": 0, "steps": steps, "image": image,
                                            "strength": 1.0}, facts))
    for outcome in run_requests(pipe, requests):
        if isinstance(outcome, Exception):
            raise outcome
    prepare = getattr(pipe.executor, "prepare", None)
    if callable(prepare):
        for plan in all_plans(pipe.scheduler):
            prepare(plan)
    return len(group_by_plan(requests, pipe.batch))
