"""What a stream holds per input and per result, and its size limits."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..inputs import Control, Noise
from ..schedule import Plan

if TYPE_CHECKING:
    from ..executors.base import Launched
    from .client import Stream

#: Results kept for the fps and latency figures of `stats()`.
FPS_WINDOW = 32
LATENCY_WINDOW = 512
#: Distinct prompts / noise sets kept per stream (tokens and seeded noise are made once each).
HOST_CACHE = 16
#: Engine failures kept per stream until `get` raises them (older ones are counted, not kept).
ERRORS_KEPT = 8


@dataclass(frozen=True)
class StreamResult:
    seq: int
    image: np.ndarray  # uint8 (H, W, 3)
    latency_s: float  # from push to the result being ready
    skipped: bool  # the similarity filter reused the last output


@dataclass(frozen=True)
class Settings:
    """What a stream's images depend on besides the frame; changed by `push(...)` keywords or `update`."""

    prompt: str
    seed: int
    steps: int
    strength: float


@dataclass
class _Input:
    seq: int
    pushed_at: float
    settings: Settings
    ids: dict[str, np.ndarray]
    plan: Plan
    noise: Noise
    pixels: np.ndarray | None  # uint8 (B, H, W, 3) for img2img
    thumb: np.ndarray | None  # the similarity filter's downscaled copy (when the filter is on)
    control: Control | None = None  # ControlNet bundles: this input's control images and per-run scales


@dataclass
class _Job:
    stream: Stream
    item: _Input
    launched: Launched | None = None
    lock: threading.Lock | None = None  # the pipeline's lock, held from launch to wait
    delivered: bool = False
    image: np.ndarray | None = None
    error: BaseException | None = None
    skipped: bool = False

