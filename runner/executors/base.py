"""The interface every executor implements; the pipeline logic above it is written once."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..bundle import Bundle
from ..cache import SlotLRU
from ..inputs import Control, Noise
from ..schedule import Plan

#: (stage label, seconds) in execution order: "text_encoder", "unet[0]", ..., "vae_decoder".
Timings = list[tuple[str, float]]


class Launched:
    """One generation started by `Executor.launch`; hand it to that executor's `wait`, once."""


class _InWorker(Launched):
    def __init__(self, future: Future[tuple[np.ndarray, int]]) -> None:
        self.future = future


class Executor(ABC):
    """Runs text encoder(s) -> UNet steps -> VAE decoder (VAE encoder first for img2img) on one bundle.

    `run` gets everything already checked and shaped to the bundle's batch; it returns the uint8 images
    (B, H, W, 3) and the decoder's count of non-finite values. `launch` + `wait` split the same work in two
    (start, finish) so a caller can do host work while the engines run (frame streams, runner/stream/).
    `control` (ControlNet bundles): the control images and per-run scales; None runs the nets at scale 0.
    """

    name: str = "executor"

    def __init__(self, bundle: Bundle, cache_size: int) -> None:
        self.bundle = bundle
        self.cache_size = cache_size
        self._lru = SlotLRU(cache_size)
        self._launcher: ThreadPoolExecutor | None = None

    @abstractmethod
    def run(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
            image: np.ndarray | None, control: Control | None = None) -> tuple[np.ndarray, int]:
        """One generation; `ids` maps encoder name -> (B, 77) int32."""

    @abstractmethod
    def run_profiled(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
                     image: np.ndarray | None, control: Control | None = None) -> Timings:
        """The same work as `run`, without graphs or the prompt cache, timing each stage."""

    def launch(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise, image: np.ndarray | None,
               control: Control | None = None) -> Launched:
        """Start the work of `run` and return at once; `wait` returns what `run` would have. One launch at a
        time per executor: wait for it before launching again. This default runs `run` in the executor's
        own worker thread (ONNX Runtime releases the GIL while it computes, so the caller keeps working);
        the TensorRT executor launches its CUDA graph and records an event instead."""
        if getattr(self, "_launcher", None) is None:
            self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"turbo-trt-{self.name}")
        assert self._launcher is not None
        return _InWorker(self._launcher.submit(self.run, ids, plan, noise, image, control))

    def wait(self, launched: Launched) -> tuple[np.ndarray, int]:
        """Finish a launch: the images and non-finite count `run` returns, or the exception it raised."""
        if not isinstance(launched, _InWorker):
            raise TypeError(f"{type(launched).__name__} was not launched by a {type(self).__name__}")
        return launched.future.result()

    @property
    def broken(self) -> str | None:
        """Why this executor can run nothing more (e.g. a sticky CUDA error), or None while it is usable."""
        return None

    @abstractmethod
    def fork(self) -> Executor:
        """A new executor with its own execution state that shares this one's weights."""

    @staticmethod
    def prompt_key(ids: dict[str, np.ndarray]) -> bytes:
        """The prompt cache's key: the token ids of every encoder."""
        return b"".join(ids[name].tobytes() for name in sorted(ids))

    def cache_stats(self) -> dict[str, int]:
        return {"hits": self._lru.hits, "misses": self._lru.misses, "entries": len(self._lru)}

    def invalidate_prompt_cache(self) -> None:
        """Forget every cached prompt (its embeddings came from weights that have changed)."""
        self._lru.clear()
        self._cache_generation = getattr(self, "_cache_generation", 0) + 1

    @contextlib.contextmanager
    def prompt_cache_disabled(self) -> Iterator[None]:
        """Within the block every call runs the text encoders (for measuring the full path)."""
        saved, generation = self._lru, getattr(self, "_cache_generation", 0)
        self._lru = SlotLRU(0)
        try:
            yield
        finally:
            if getattr(self, "_cache_generation", 0) != generation:
                saved.clear()  # invalidated while set aside
            self._lru = saved

    def control_or_off(self, control: Control | None, runs: int) -> Control | None:
        """`control`, or for a ControlNet bundle called without one every net at scale 0."""
        nets = int(self.bundle.shapes.get("controlnets", 0))
        if control is None and nets:
            from ..inputs import no_control

            return no_control(nets, runs, self.bundle.shapes)
        return control

    def close(self) -> None:
        """Release resources (device memory, sessions; the launch worker thread, after its work)."""
        launcher, self._launcher = getattr(self, "_launcher", None), None
        if launcher is not None:
            launcher.shutdown(wait=True)
