"""The similarity filter's measure: a downscaled copy of a frame and the cosine of two copies."""

from __future__ import annotations

import numpy as np

#: Side of the downscaled copy the similarity filter compares (area average over blocks).
SIMILARITY_SIDE = 32


def thumbnail(pixels: np.ndarray, side: int = SIMILARITY_SIDE) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 vector of the area-averaged side x side copy, scaled to [-1, 1] (the
    range the VAE sees), so cosine similarity responds to content rather than to overall brightness."""
    h, w = pixels.shape[:2]
    bh, bw = max(h // side, 1), max(w // side, 1)
    cropped = pixels[: (h // bh) * bh, : (w // bw) * bw].astype(np.float32)
    small = cropped.reshape(h // bh, bh, w // bw, bw, 3).mean(axis=(1, 3))
    return (small / 127.5 - 1.0).ravel()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))

