"""ONNX Runtime executor (CPU): runs the bundle's ONNX graphs, so the pipeline logic is exercised
without a GPU. FP16 graphs run as ONNX Runtime's CPU provider allows (it inserts FP32 casts around nodes
that lack FP16 kernels)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..bundle import EMBEDDING_FEEDS, Bundle
from ..inputs import Noise
from ..schedule import Plan
from .base import Executor, Timings


class OnnxRuntimeExecutor(Executor):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, cache_size: int = 8, sessions: dict[str, Any] | None = None,
                 threads: int | None = None) -> None:
        super().__init__(bundle, cache_size)
        import onnxruntime as ort

        self._threads = threads
        if sessions is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = threads
            sessions = {
                name: ort.InferenceSession(str(bundle.path / bundle.component(name)["onnx"]), options,
                                           providers=["CPUExecutionProvider"])
                for name in bundle.components()
            }
        self.sessions = sessions
        self._slots: dict[int, dict[str, np.ndarray]] = {}
        lat = bundle.manifest["shapes"]
        self._zeros = np.zeros((lat["batch"], lat["latent_channels"], lat["latent_height"], lat["latent_width"]),
                               np.float32)

    def fork(self) -> OnnxRuntimeExecutor:
        # ONNX Runtime sessions are safe to run from several threads: forks share them (and their weights).
        return OnnxRuntimeExecutor(self.bundle, self.cache_size, self.sessions, self._threads)

    def _run(self, name: str, feeds: dict[str, np.ndarray], timings: Timings | None = None,
             label: str | None = None) -> dict[str, np.ndarray]:
        session = self.sessions[name]
        names = [o.name for o in session.get_outputs()]
        start = time.perf_counter()
        result = dict(zip(names, session.run(names, feeds)))
        if timings is not None:
            timings.append((label or name, time.perf_counter() - start))
        return result

    def _encode(self, ids: dict[str, np.ndarray], timings: Timings | None = None) -> dict[str, np.ndarray]:
        outputs = {name: self._run(name, {"input_ids": ids[name]}, timings) for name in ids}
        return {unet_input: outputs[encoder][output]
                for encoder, output, unet_input in EMBEDDING_FEEDS[self.bundle.family]}

    def _embeddings(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = self.prompt_key(ids)
        slot = self._lru.lookup(key)
        if slot is not None:
            return self._slots[slot]
        embeddings = self._encode(ids)
        slot = self._lru.assign(key)
        if slot is not None:
            self._slots[slot] = embeddings
        return embeddings

    def _denoise_and_decode(self, plan: Plan, noise: Noise, image: np.ndarray | None,
                            embeddings: dict[str, np.ndarray], timings: Timings | None) -> tuple[np.ndarray, int]:
        if plan.mode == "img2img":
            assert image is not None and noise.sample is not None
            latents = self._run("vae_encoder", {
                "image": image, "sample_noise": noise.sample, "latent_noise": noise.latents,
                "noise_sigma": np.array([plan.noise_sigma], np.float32),
            }, timings)["latents"]
        else:
            latents = noise.latents
        for k in range(plan.runs):
            step_noise = noise.steps[k] if noise.steps else self._zeros
            latents = self._run("unet", {
                "latents": latents, "timestep": plan.timesteps[k:k + 1], "step_coeffs": plan.coeffs[k],
                "step_noise": step_noise, **embeddings,
            }, timings, f"unet[{k}]")["next_latents"]
        decoded = self._run("vae_decoder", {"latents": latents}, timings)
        return decoded["image"], int(decoded["nonfinite"][0])

    def run(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
            image: np.ndarray | None) -> tuple[np.ndarray, int]:
        return self._denoise_and_decode(plan, noise, image, self._embeddings(ids), None)

    def run_profiled(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
                     image: np.ndarray | None) -> Timings:
        timings: Timings = []
        self._denoise_and_decode(plan, noise, image, self._encode(ids, timings), timings)
        return timings

