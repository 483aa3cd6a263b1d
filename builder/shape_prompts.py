"""The tiny presets' prompt language and the procedural generator that draws its images.

A prompt of the language names one shape on a plain background::

    a [small|large] <colour> <shape> [at the top left|at the top right|at the bottom left|
    at the bottom right|in the center] on a <colour> background

Size defaults to medium and position to the center when the prompt leaves them out; the shape's colour
differs from the background's. :func:`parse_prompt` reads a prompt into a :class:`Scene`,
:func:`render` draws a scene anti-aliased (at 4x, then a box down-sampling) at any size, so training data
are unlimited and exact. :func:`heldback_scenes` is the fixed evaluation set, never used in training: a
scene is held back when the sha256 of its canonical prompt falls in a fixed bucket, so the split is a pure
function of the language. numpy and Pillow only (no torch).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Palette (RGB). Far apart in RGB so that the scorer can name a colour from the image alone.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 135, 20),
    "purple": (140, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "medium", "large")  # "medium" is never written: it is the size of a prompt without one
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
#: Half the side of a shape's bounding box, as a fraction of the image side.
SIZE_FRACTIONS = {"small": 0.11, "medium": 0.17, "large": 0.24}
#: Gap between a corner shape's bounding box and the image edges, as a fraction of the image side.
MARGIN_FRACTION = 0.06
SUPERSAMPLE = 4
#: One scene in HELDBACK_BUCKETS of every HELDBACK_MODULUS is held back from training.
HELDBACK_MODULUS = 10
HELDBACK_BUCKETS = frozenset({3})
#: The words of the language (the tiny tokenizer has each as one token).
WORDS = tuple(sorted({*COLOURS, *SHAPES, "small", "large", "a", "at", "the", "top", "bottom", "left", "right",
                      "in", "center", "on", "background"}))


@dataclass(frozen=True, order=True)
class Scene:
    """What a prompt asks for: the shape, its colour, size and position, and the background colour."""

    colour: str
    shape: str
    background: str
    size: str = "medium"
    position: str = "center"

    def __post_init__(self) -> None:
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("background", self.background, COLOURS), ("size", self.size, SIZES),
                                     ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background are both {self.colour}")

    def prompt(self, explicit_defaults: bool = False) -> str:
        """The prompt for this scene; ``explicit_defaults`` writes "in the center" for a centred shape."""
        words = ["a"] + ([self.size] if self.size != "medium" else []) + [self.colour, self.shape]
        if self.position != "center":
            words += ["at", "the", self.position]
        elif explicit_defaults:
            words += ["in", "the", "center"]
        return " ".join(words + ["on", "a", self.background, "background"])

    def phrasings(self) -> list[str]:
        """Every prompt of the language that describes this scene."""
        out = [self.prompt()]
        if self.position == "center":
            out.append(self.prompt(explicit_defaults=True))
        return out

    def attributes(self) -> dict[str, str]:
        return {"background": self.background, "colour": self.colour, "shape": self.shape, "size": self.size,
                "position": self.position}


_PROMPT_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+)"
    r"(?: (?:at the (?P<position>top left|top right|bottom left|bottom right)|in the (?P<center>center)))?"
    r" on an? (?P<background>\w+) background$"
)


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt of the language describes (case and spacing are free; a trailing "." is allowed).

    Raises ValueError naming what does not fit the language."""
    text = " ".join(prompt.lower().replace(",", " ").split()).removesuffix(".").strip()
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(
            f"{prompt!r} is not a prompt of the shapes language: expected 'a [small|large] <colour> <shape> "
            f"[at the top left|... |in the center] on a <colour> background' with colours {', '.join(COLOURS)} "
            f"and shapes {', '.join(SHAPES)}"
        )
    return Scene(colour=m["colour"], shape=m["shape"], background=m["background"], size=m["size"] or "medium",
                 position=m["position"] or "center")


def all_scenes() -> list[Scene]:
    """Every scene of the language, in a fixed order."""
    return [Scene(c, s, b, z, p) for c, s, b, z, p in itertools.product(COLOURS, SHAPES, COLOURS, SIZES, POSITIONS)
            if c != b]


def is_heldback(scene: Scene) -> bool:
    """Whether a scene belongs to the held-back evaluation split (deterministic: a hash of its prompt)."""
    digest = hashlib.sha256(scene.prompt().encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDBACK_MODULUS in HELDBACK_BUCKETS


def training_scenes() -> list[Scene]:
    """The scenes training may use: every scene that is not held back."""
    return [s for s in all_scenes() if not is_heldback(s)]


def heldback_scenes(count: int | None = 60) -> list[Scene]:
    """The fixed evaluation set: the first ``count`` held-back scenes in the order of their prompts'
    sha256 (a spread of every attribute); ``None``: all of them."""
    held = sorted((s for s in all_scenes() if is_heldback(s)), key=lambda s: hashlib.sha256(s.prompt().encode()).digest())
    return held if count is None else held[:count]


def shape_box(scene: Scene, size: int) -> tuple[float, float, float, float]:
    """The shape's bounding box (x0, y0, x1, y1) in pixels of a ``size`` x ``size`` image."""
    half = SIZE_FRACTIONS[scene.size] * size
    margin = MARGIN_FRACTION * size
    cx = cy = size / 2
    if "left" in scene.position:
        cx = margin + half
    if "right" in scene.position:
        cx = size - margin - half
    if "top" in scene.position:
        cy = margin + half
    if "bottom" in scene.position:
        cy = size - margin - half
    return cx - half, cy - half, cx + half, cy + half


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as uint8 RGB (size, size, 3): drawn at SUPERSAMPLE x the size, then box-filtered down."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in shape_box(scene, size))
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # an upright isosceles triangle filling its box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def render_prompt(prompt: str, size: int = 64) -> np.ndarray:
    return render(parse_prompt(prompt), size)


def describe() -> dict[str, Any]:
    """The language's parts, for the training record."""
    return {"colours": COLOURS, "shapes": list(SHAPES), "sizes": list(SIZES), "positions": list(POSITIONS),
            "size_fractions": SIZE_FRACTIONS, "margin_fraction": MARGIN_FRACTION, "supersample": SUPERSAMPLE,
            "heldback": {"modulus": HELDBACK_MODULUS, "buckets": sorted(HELDBACK_BUCKETS)}}
