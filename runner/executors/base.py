"""The interface every executor implements; the pipeline logic above it is written once."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..bundle import Bundle
from ..inputs import Noise
from ..schedule import Plan

#: (stage label, seconds) in execution order: "text_encoder", "unet[0]", ..., "vae_decoder".
Timings = list[tuple[str, float]]


class Executor(ABC):
    """Runs text encoder(s) -> UNet steps -> VAE decoder (VAE encoder first for img2img) on one bundle.

    `run` gets everything already checked and shaped to the bundle's batch; it returns the uint8 images
    (B, H, W, 3) and the decoder's count of non-finite values.
    """

    name: str = "executor"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @abstractmethod
    def run(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
            image: np.ndarray | None) -> tuple[np.ndarray, int]:
        """One generation; `ids` maps encoder name -> (B, 77) int32."""

    @abstractmethod
    def run_profiled(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
                     image: np.ndarray | None) -> Timings:
        """The same work as `run`, without graphs or the prompt cache, timing each stage."""

    @abstractmethod
    def fork(self) -> Executor:
        """A new executor with its own execution state that shares this one's weights."""

    def cache_stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        """Release resources (device memory, sessions)."""
