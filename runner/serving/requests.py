"""Decode and check one served request, with the runner's own rules (runner/inputs.py, runner/schedule.py).

Each request is checked on its own before it joins an engine call, so a bad request fails alone and its
error names the field and the rule. Triton itself has already checked each input's datatype and dims
against the model config; the checks here cover the values (and repeat the shapes, for callers that
bypass Triton's checks).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from turbo_trt.errors import InputError

from ..inputs import MAX_SEED, check_control_images, check_image, check_seed, per_net
from ..schedule import Plan, img2img_plan, txt2img_plan
from .contract import DEFAULT_STEPS, DEFAULT_STRENGTH


class RequestError(InputError):
    """A served request broke a rule; the message starts with the field's name."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field


@dataclass(frozen=True)
class ModelFacts:
    """What the request checks need to know about the bundle."""

    height: int
    width: int
    img2img: bool
    scheduler: dict[str, Any]
    controlnets: int = 0

    @classmethod
    def of(cls, pipe: Any) -> ModelFacts:
        return cls(int(pipe.shapes["height"]), int(pipe.shapes["width"]), bool(pipe.bundle.img2img), pipe.scheduler,
                   int(pipe.shapes.get("controlnets", 0)))


@dataclass(frozen=True)
class ServeRequest:
    """One checked request: everything its image depends on."""

    prompt: str
    seed: int
    plan: Plan
    image: np.ndarray | None  # uint8 (H, W, 3) for img2img
    control_image: np.ndarray | None = None  # ControlNet bundles: uint8 (n, H, W, 3), one image per net
    control_scale: tuple[float, ...] = ()  # one per net (all 0 without a control image)


@contextmanager
def _field(name: str) -> Iterator[None]:
    """Re-raise the runner's InputError (its rules, runner/inputs.py and runner/schedule.py) as a RequestError
    naming the request's field."""
    try:
        yield
    except RequestError:
        raise
    except InputError as exc:
        raise RequestError(name, str(exc)) from None


def _scalar(inputs: Mapping[str, Any], name: str, kind: str) -> Any:
    """The single element of an input sent with dims [1] (and a leading batch dimension of 1)."""
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise RequestError(name, f"must hold exactly one value (dims [1]), got shape {list(array.shape)}")
    if kind == "bytes":
        ok = array.dtype == object or array.dtype.kind == "S"
    elif kind == "int":
        ok = array.dtype.kind in "iu"
    else:
        ok = array.dtype.kind == "f"
    if not ok:
        raise RequestError(name, f"has datatype {array.dtype}, expected {kind}")
    return array.reshape(-1)[0]


def _prompt(inputs: Mapping[str, Any]) -> str:
    raw = _scalar(inputs, "prompt", "bytes")
    if raw is None:
        raise RequestError("prompt", "is required (BYTES [1], UTF-8 text)")
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, (bytes, np.bytes_)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("prompt", f"must be UTF-8 text; byte {exc.start} is not valid UTF-8") from None
    else:
        raise RequestError("prompt", f"must be BYTES (UTF-8 text), got {type(raw).__name__}")
    if not text.strip():
        raise RequestError("prompt", "must not be empty")
    return text


def _seed(inputs: Mapping[str, Any]) -> int:
    raw = _scalar(inputs, "seed", "int")
    if raw is None:
        return secrets.randbelow(MAX_SEED)
    with _field("seed"):
        return check_seed(int(raw))


def _plan(inputs: Mapping[str, Any], facts: ModelFacts, img2img: bool) -> Plan:
    raw_steps = _scalar(inputs, "steps", "int")
    steps = DEFAULT_STEPS if raw_steps is None else int(raw_steps)
    raw_strength = _scalar(inputs, "strength", "float")
    if not img2img:
        if raw_strength is not None:
            raise RequestError("strength", "applies to image-to-image only; send an image too, or leave strength out")
        with _field("steps"):
            return txt2img_plan(facts.scheduler, steps)
    with _field("steps"):
        txt2img_plan(facts.scheduler, steps)  # the steps rule first, so its error names steps, not strength
    with _field("strength"):
        return img2img_plan(facts.scheduler, steps, DEFAULT_STRENGTH if raw_strength is None else float(raw_strength))


def _image(inputs: Mapping[str, Any], facts: ModelFacts) -> np.ndarray | None:
    value = inputs.get("image")
    if value is None:
        return None
    if not facts.img2img:
        raise RequestError("image", "this bundle has no VAE encoder (built with --no-img2img): image-to-image is unavailable")
    array = np.asarray(value)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.dtype != np.uint8 or array.shape != (facts.height, facts.width, 3):
        raise RequestError("image", f"must be UINT8 [{facts.height}, {facts.width}, 3] (the bundle's size, RGB), "
                                    f"got {array.dtype} {list(array.shape)}")
    with _field("image"):
        return check_image(array, facts.height, facts.width, 1)[0]


def _control(inputs: Mapping[str, Any], facts: ModelFacts) -> tuple[np.ndarray | None, tuple[float, ...]]:
    """control_image (n, H, W, 3) and control_scale (n), with the runner's rules (runner/inputs.py)."""
    value, scale = inputs.get("control_image"), inputs.get("control_scale")
    nets = facts.controlnets
    if value is None:
        if scale is not None:
            raise RequestError("control_scale", "given without control_image")
        return None, (0.0,) * nets
    if not nets:
        raise RequestError("control_image", "this bundle has no ControlNet (built without --controlnet)")
    array = np.asarray(value)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.dtype != np.uint8 or array.shape != (nets, facts.height, facts.width, 3):
        raise RequestError("control_image", f"must be UINT8 [{nets}, {facts.height}, {facts.width}, 3] (one RGB image "
                                            f"per ControlNet, the bundle's size), got {array.dtype} {list(array.shape)}")
    scales = [1.0] * nets
    if scale is not None:
        raw = np.asarray(scale)
        if raw.dtype.kind != "f" or raw.size != nets:
            raise RequestError("control_scale", f"must be FP32 [{nets}] (one scale per ControlNet), got {raw.dtype} "
                                                f"{list(raw.shape)}")
        with _field("control_scale"):
            scales = per_net([float(v) for v in raw.reshape(-1)], nets, "control_scale")
    with _field("control_image"):
        images = check_control_images(list(array), nets, facts.height, facts.width, 1)[:, 0]
    return images, tuple(scales)


def decode_request(inputs: Mapping[str, Any], facts: ModelFacts) -> ServeRequest:
    """One request's input arrays (by name; absent optional inputs missing or None) -> a checked request.
    Raises RequestError naming the first field that breaks a rule."""
    prompt = _prompt(inputs)
    image = _image(inputs, facts)
    plan = _plan(inputs, facts, image is not None)
    control_image, control_scale = _control(inputs, facts)
    return ServeRequest(prompt=prompt, seed=_seed(inputs), plan=plan, image=image, control_image=control_image,
                        control_scale=control_scale)


def decode_requests(batch: Iterable[Any], facts: ModelFacts,
                    inputs_of: Callable[[Any], Mapping[str, Any]] = dict) -> list[ServeRequest | Exception]:
    """Each request of a batch decoded on its own (`inputs_of(request)`: its input arrays by name): a checked
    request, or the exception that failed it, a RequestError for a bad request; any other exception (reading
    the request's tensors, a defect) is the server's fault and fails only that request."""
    decoded: list[ServeRequest | Exception] = []
    for request in batch:
        try:
            decoded.append(decode_request(inputs_of(request), facts))
        except Exception as exc:  # noqa: BLE001 - one request's failure is that request's outcome
            decoded.append(exc)
    return decoded
