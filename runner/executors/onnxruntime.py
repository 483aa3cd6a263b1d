"""ONNX Runtime executor (CPU): runs the bundle's ONNX graphs, so the pipeline logic is exercised
without a GPU. FP16 graphs run as ONNX Runtime's CPU provider allows (it inserts FP32 casts around nodes
that lack FP16 kernels).

Run-time LoRAs (`set_weights`): the sessions of the components whose weights change are created again
with the merged weights as overrides of the graph's external-data initializers
(`SessionOptions.add_external_initializers`; refittable graphs keep every weight in external data);
initializers without an override come from the graph's files, so dropping every override restores the
base bit for bit. A readers-writer lock shared by every fork keeps one image on one set of weights: images
take it shared, a swap exclusive (so no image runs its UNet on the new weights after encoding its prompt with
the old ones).
`create_sessions` is the one session factory, for other ONNX Runtime executors too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import EMBEDDING_FEEDS, Bundle
from ..inputs import Control, Noise
from ..rwlock import ReadWriteLock
from ..schedule import Plan
from .base import Executor, Timings


class OnnxRuntimeExecutor(Executor):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, cache_size: int = 8, sessions: dict[str, Any] | None = None,
                 threads: int | None = None) -> None:
        super().__init__(bundle, cache_size)
        self._threads = threads
        if sessions is None:
            sessions = create_sessions(bundle, bundle.components(), ["CPUExecutionProvider"],
                                       self._session_options)
        # One dict shared with forks and replaced entry by entry, so a weight swap reaches every fork.
        self.sessions = sessions
        # component -> initializer -> override value; kept alive while a session uses it (ONNX Runtime
        # reads the buffers it is given, it does not copy them).
        self._overrides: dict[str, dict[str, np.ndarray]] = {}
        self._weights_version = [0]  # shared with forks: part of the prompt cache's key
        self._use_lock = ReadWriteLock()  # shared with forks: images shared, weight swaps exclusive
        self._slots: dict[int, dict[str, np.ndarray]] = {}
        lat = bundle.manifest["shapes"]
        self._zeros = np.zeros((lat["batch"], lat["latent_channels"], lat["latent_height"], lat["latent_width"]),
                               np.float32)

    def _session_options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self._threads:
            options.intra_op_num_threads = self._threads
        return options

    def fork(self) -> OnnxRuntimeExecutor:
        # ONNX Runtime sessions are safe to run from several threads: forks share them (and their weights).
        twin = OnnxRuntimeExecutor(self.bundle, self.cache_size, self.sessions, self._threads)
        twin._overrides = self._overrides
        twin._weights_version = self._weights_version
        twin._use_lock = self._use_lock
        return twin

    def set_weights(self, updates: Mapping[str, Mapping[str, np.ndarray | None]],
                    current_weight: Callable[[str, str], np.ndarray] | None = None) -> None:
        """Replace graph weights: component -> {initializer: new value in the graph's layout, or None for
        the base value}. Only the named components' sessions are created again; if one fails, the old
        sessions and weights stay in place. `current_weight` is unused here (the graph files hold the base)."""
        fresh: dict[str, Any] = {}
        overrides: dict[str, dict[str, np.ndarray]] = {}
        for component, changes in updates.items():
            current = dict(self._overrides.get(component, {}))
            for name, value in changes.items():
                if value is None:
                    current.pop(name, None)
                else:
                    current[name] = np.ascontiguousarray(value)
            fresh[component] = create_sessions(self.bundle, [component], ["CPUExecutionProvider"],
                                               self._session_options, {component: current})[component]
            overrides[component] = current
        with self._use_lock.exclusive():  # no image is between its first and last session run
            for component, session in fresh.items():
                self.sessions[component] = session
                self._overrides[component] = overrides[component]
            if any(component in self.bundle.encoders for component in fresh):
                self._weights_version[0] += 1  # cached prompt embeddings came from the old text encoder weights

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
        key = self.prompt_key(ids) + self._weights_version[0].to_bytes(8, "little")
        slot = self._lru.lookup(key)
        if slot is not None:
            return self._slots[slot]
        embeddings = self._encode(ids)
        slot = self._lru.assign(key)
        if slot is not None:
            self._slots[slot] = embeddings
        return embeddings

    def _denoise_and_decode(self, plan: Plan, noise: Noise, image: np.ndarray | None,
                            embeddings: dict[str, np.ndarray], timings: Timings | None,
                            control: Control | None = None) -> tuple[np.ndarray, int]:
        control = self.control_or_off(control, plan.runs)
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
            feeds = {"latents": latents, "timestep": plan.timesteps[k:k + 1], "step_coeffs": plan.coeffs[k],
                     "step_noise": step_noise, **embeddings}
            if control is not None:
                feeds.update(control_image=control.images, control_scale=control.scales[k])
            latents = self._run("unet", feeds, timings, f"unet[{k}]")["next_latents"]
        decoded = self._run("vae_decoder", {"latents": latents}, timings)
        return decoded["image"], int(decoded["nonfinite"][0])

    def run(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
            image: np.ndarray | None, control: Control | None = None) -> tuple[np.ndarray, int]:
        with self._use_lock.shared():
            return self._denoise_and_decode(plan, noise, image, self._embeddings(ids), None, control)

    def run_profiled(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
                     image: np.ndarray | None, control: Control | None = None) -> Timings:
        timings: Timings = []
        with self._use_lock.shared():
            self._denoise_and_decode(plan, noise, image, self._encode(ids, timings), timings, control)
        return timings



def create_sessions(bundle: Bundle, names: list[str], providers: list[Any], options: Callable[[], Any],
                    initializers: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """One `InferenceSession` per named component of `bundle`, each with fresh options from `options()`
    and, from `initializers` (component -> initializer name -> array), overrides of graph weights."""
    import onnxruntime as ort

    sessions = {}
    for name in names:
        opts = options()
        overrides = dict((initializers or {}).get(name, {}))
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in overrides.values()]
        if overrides:
            # Refittable graphs keep their weights in external data; ONNX Runtime 1.32 ignores
            # add_initializer for an initializer the graph defines, but takes external ones from here.
            opts.add_external_initializers(list(overrides), values)
        graph: Path = bundle.path / bundle.component(name)["onnx"]
        session = ort.InferenceSession(str(graph), opts, providers=providers)
        session._turbo_trt_weights = values  # ONNX Runtime uses these buffers: keep them alive with the session
        sessions[name] = session
    return sessions
