"""The live server's WebSocket protocol (README, "Live"): message checks, frame decoding, result encoding.

Client -> server: a text message is a JSON object of settings, any subset of SETTINGS_KEYS; a binary
message is one JPEG or PNG frame. Server -> client: per result a text JSON {"seq", "latency_ms",
"skipped", "dropped", "fps"} followed by one binary message with the image; for a bad message a text
JSON {"error", "field"}; for a frame the engines failed on {"error", "field": "frame", "seq"}.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

SETTINGS_KEYS = ("prompt", "seed", "steps", "strength", "similarity", "format")
FORMATS = ("jpeg", "png")
#: JPEG quality of results, with full-resolution colour (4:4:4: no chroma subsampling, which blurs the
#: colour edges of a restyled frame); PNG is lossless: a PNG result equals the runner's image.
JPEG_QUALITY = 90
#: Frames larger than this are refused before they are decoded (a small file can hold a huge image).
MAX_FRAME_PIXELS = 4096 * 4096


class MessageError(Exception):
    """A bad client message: `field` names the setting ("message" for the message as a whole, "frame" for
    a binary frame)."""

    def __init__(self, field: str, error: str) -> None:
        super().__init__(error)
        self.field = field
        self.error = error

    def reply(self) -> dict[str, Any]:
        return {"error": self.error, "field": self.field}


def parse_settings(text: str) -> dict[str, Any]:
    """A settings message -> {key: value}; the values are checked by the stream (`Stream.update`), the keys
    and `format` here."""
    try:
        settings = json.loads(text)
    except ValueError as exc:
        raise MessageError("message", f"message: not valid JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise MessageError("message", f"message: settings must be a JSON object, got {type(settings).__name__}")
    for key in settings:
        if key not in SETTINGS_KEYS:
            raise MessageError(key, f"{key}: unknown setting; known: {', '.join(SETTINGS_KEYS)}")
    for key, value in settings.items():
        if value is None and key != "similarity":
            raise MessageError(key, f"{key}: must not be null (only similarity takes null, to turn the filter off)")
    if "format" in settings and settings["format"] not in FORMATS:
        raise MessageError("format", f"format: must be one of {', '.join(FORMATS)}, got {settings['format']!r}")
    return settings


def decode_frame(data: bytes) -> Any:
    """A binary message -> a PIL image (RGB, L or RGBA as stored; the stream converts and resizes)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise MessageError("frame", f"frame: not a JPEG or PNG image ({type(exc).__name__})") from None
    if image.format not in ("JPEG", "PNG"):
        raise MessageError("frame", f"frame: must be JPEG or PNG, got {image.format}")
    width, height = image.size
    if width * height > MAX_FRAME_PIXELS:
        raise MessageError("frame", f"frame: {width}x{height} is over the limit of {MAX_FRAME_PIXELS} pixels")
    try:
        image.load()
    except Exception as exc:
        raise MessageError("frame", f"frame: the {image.format} data is damaged ({exc})") from None
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
