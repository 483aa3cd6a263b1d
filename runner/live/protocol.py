"""The live server's WebSocket protocol (README, "Real time" > "`turbo-trt live`"): message checks, frame
decoding, result encoding.

Client -> server: a text message is a JSON object of settings, any subset of SETTINGS_KEYS, where
`"generate": true` also queues a text-to-image input with the settings (the only way one starts); a
binary message is one JPEG or PNG frame (an image-to-image input). On a ControlNet bundle `"control":
"canny"` steers every frame by its own edge map with `"control_scale"` (text-to-image inputs have no frame
and run the nets at scale 0). Server -> client: per result a text
JSON {"seq", "latency_ms", "skipped", "dropped", "fps"} followed by one binary message with the image;
for a bad message a text JSON {"error", "field", "input"}, where `input` says whether the message was an
input (a frame, or settings with "generate": true), which then queued nothing; for an input the engines
failed on {"error", "field": "frame", "input": true, "seq"}.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

SETTINGS_KEYS = ("prompt", "seed", "steps", "strength", "similarity", "format", "control", "control_scale", "generate")
#: `control` values: "canny" makes each frame's Canny edge map the ControlNet image (ControlNet bundles).
CONTROLS = ("none", "canny")
#: Longest prompt accepted, in characters (the text encoder keeps 77 tokens; this bounds the host work).
MAX_PROMPT_CHARS = 2000
FORMATS = ("jpeg", "png")
#: JPEG quality of results, with full-resolution colour (4:4:4: no chroma subsampling, which blurs the
#: colour edges of a restyled frame); PNG is lossless: a PNG result equals the runner's image.
JPEG_QUALITY = 90
#: Frames larger than this are refused before they are decoded (a small file can hold a huge image).
MAX_FRAME_PIXELS = 4096 * 4096


class MessageError(Exception):
    """A bad client message: `field` names the setting ("message" for the message as a whole, "frame" for
    a binary frame); `input` whether the message was an input (a frame or a generate request)."""

    def __init__(self, field: str, error: str, input: bool = False) -> None:
        super().__init__(error)
        self.field = field
        self.error = error
        self.input = input

    def reply(self) -> dict[str, Any]:
        return error_reply(self.error, self.field, self.input)


def error_reply(error: str, field: str, input: bool, seq: int | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": error, "field": field, "input": input}
    if seq is not None:
        reply["seq"] = seq
    return reply


def parse_settings(text: str) -> dict[str, Any]:
    """A settings message -> {key: value}; the values are checked by the stream (`Stream.update`), the keys,
    `format`, `generate` and the prompt's length here. An error says whether the message asked to generate."""
    try:
        settings = json.loads(text)
    except ValueError as exc:
        raise MessageError("message", f"message: not valid JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise MessageError("message", f"message: settings must be a JSON object, got {type(settings).__name__}")
    asks = settings.get("generate") is True
    for key in settings:
        if key not in SETTINGS_KEYS:
            raise MessageError(key, f"{key}: unknown setting; known: {', '.join(SETTINGS_KEYS)}", asks)
    for key, value in settings.items():
        if value is None and key != "similarity":
            raise MessageError(key, f"{key}: must not be null (only similarity takes null, to turn the filter off)",
                               asks)
    if "format" in settings and settings["format"] not in FORMATS:
        raise MessageError("format", f"format: must be one of {', '.join(FORMATS)}, got {settings['format']!r}",
                           asks)
    if "control" in settings and settings["control"] not in CONTROLS:
        raise MessageError("control", f"control: must be one of {', '.join(CONTROLS)}, got {settings['control']!r}",
                           asks)
    if "generate" in settings and not isinstance(settings["generate"], bool):
        raise MessageError("generate", f"generate: must be true or false, got {settings['generate']!r}")
    prompt = settings.get("prompt")
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise MessageError("prompt", f"prompt: {len(prompt)} characters is over the limit of {MAX_PROMPT_CHARS} "
                                     "(the text encoder reads 77 tokens)", asks)
    return settings


def decode_frame(data: bytes) -> Any:
    """A binary message -> a PIL image (RGB, L or RGBA as stored; the stream converts and resizes)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise MessageError("frame", f"frame: not a JPEG or PNG image ({type(exc).__name__})", True) from None
    if image.format not in ("JPEG", "PNG"):
        raise MessageError("frame", f"frame: must be JPEG or PNG, got {image.format}", True)
    width, height = image.size
    if width * height > MAX_FRAME_PIXELS:
        raise MessageError("frame", f"frame: {width}x{height} is over the limit of {MAX_FRAME_PIXELS} pixels", True)
    try:
        image.load()
    except Exception as exc:
        raise MessageError("frame", f"frame: the {image.format} data is damaged ({exc})", True) from None
    return image


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """uint8 (H, W, 3) -> JPEG (quality JPEG_QUALITY, 4:4:4) or PNG (lossless, fast compression)."""
    from PIL import Image

    out = io.BytesIO()
    picture = Image.fromarray(image)
    if fmt == "png":
        picture.save(out, format="PNG", compress_level=1)
    else:
        picture.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()
