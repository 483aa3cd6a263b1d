"""A prompt-following score computed from the image alone, for prompts of the shapes language.

:func:`read_image` measures what an image shows, with no model: the background colour (median of the
border pixels, named by the nearest palette colour), the shape's colour (median of the pixels furthest
from the background), each pixel's coverage by the shape (its projection on the background-to-shape
colour segment), and from the largest connected region of covered pixels: its bounding box, the fill
ratio of the box (square 1, circle pi/4, triangle 1/2) and the vertical offset of its centroid in the box
(an upright triangle's centroid sits at 2/3 of its height; a square's and a circle's at 1/2). The shape
class comes from those two moments, the size from the box side, the position from the box centre.
:func:`score` compares that reading with the prompt's scene attribute by attribute. numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .shape_prompts import COLOURS, SIZE_FRACTIONS, Scene, parse_prompt

ATTRIBUTES = ("background", "colour", "shape", "size", "position")
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Reading:
    """What an image shows, attribute by attribute (None: no shape found)."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    fill: float = 0.0  # fill ratio of the shape's bounding box
    centroid_offset: float = 0.0  # centroid's vertical position in the box, 0 top .. 1 bottom

    def attributes(self) -> dict[str, str | None]:
        return {"background": self.background, "colour": self.colour, "shape": self.shape, "size": self.size,
                "position": self.position}


def nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a stack flood fill; images are small)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(int(y0), int(x0))], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def read_image(image: np.ndarray) -> Reading:
    """Measure an RGB uint8 (H, W, 3) image (see the module docstring)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    pixels = image.astype(np.float64)
    h, w, _ = pixels.shape
    side = min(h, w)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = nearest_colour(bg)
    distance = np.sqrt(((pixels - bg) ** 2).sum(axis=2))
    if distance.max() < 40.0:  # nothing stands out from the background
        return Reading(background, None, None, None, None)
    core = distance >= 0.8 * np.percentile(distance, 99.5)
    fg = np.median(pixels[core], axis=0)
    colour = nearest_colour(fg)
    span = fg - bg
    coverage = np.clip(((pixels - bg) @ span) / max(float(span @ span), 1e-6), 0.0, 1.0)
    region = _largest_component(coverage > 0.5)
    ys, xs = np.nonzero(region)
    if len(ys) < 4:
        return Reading(background, colour, None, None, None)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_w, box_h = x1 - x0, y1 - y0
    fill = float(region.sum()) / float(box_w * box_h)
    centroid_offset = (float(ys.mean()) + 0.5 - y0) / box_h
    if fill < 0.64 or centroid_offset > 0.59:
        shape = "triangle"
    elif fill < 0.89:
        shape = "circle"
    else:
        shape = "square"
    box_side = max(box_w, box_h) / side
    size = min(SIZE_FRACTIONS, key=lambda s: abs(2 * SIZE_FRACTIONS[s] - box_side))
    dx = ((x0 + x1) / 2 - w / 2) / side
    dy = ((y0 + y1) / 2 - h / 2) / side
    if max(abs(dx), abs(dy)) < 0.1:
        position = "center"
    else:
        position = ("top" if dy < 0 else "bottom") + " " + ("left" if dx < 0 else "right")
    return Reading(background, colour, shape, size, position, fill, centroid_offset)


def score(image: np.ndarray, scene: Scene | str) -> dict[str, bool]:
    """Attribute -> whether the image shows what the scene (or a prompt of the language) asks for."""
    scene = parse_prompt(scene) if isinstance(scene, str) else scene
    seen = read_image(image).attributes()
    wanted = scene.attributes()
    return {a: seen[a] == wanted[a] for a in ATTRIBUTES}


def summarize(results: Iterable[dict[str, bool]]) -> dict[str, float]:
    """Fraction right per attribute and over all attributes ("all")."""
    rows = list(results)
    if not rows:
        raise ValueError("no results to summarize")
    out = {a: sum(r[a] for r in rows) / len(rows) for a in ATTRIBUTES}
    out["all"] = sum(sum(r.values()) for r in rows) / (len(rows) * len(ATTRIBUTES))
    return out
