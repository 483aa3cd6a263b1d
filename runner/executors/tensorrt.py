"""TensorRT executor: every buffer allocated at load, one CUDA graph per (mode, steps, start).

Per image: fill pinned host buffers, one graph launch (which copies inputs up, runs text encoder(s) ->
[VAE encoder] -> UNet steps -> VAE decoder, and copies the image and the non-finite count back), one
sync. No device allocation happens per image. A repeated prompt (token ids) skips the text encoders: its
embeddings are kept in preallocated device slots and copied into place before launching the graph variant
without encoders. If graph capture fails, the same sequence runs as plain enqueues (with a warning).

Engines (weights) live in an EngineSet that several executors share; each executor has its own
execution contexts, buffers, stream and graphs (`fork()`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from turbo_trt.errors import FlavorError
from turbo_trt.flavors import Flavor, load_flavor
from turbo_trt.io_contract import TensorIO, check_io

from .. import cuda
from ..bundle import EMBEDDING_FEEDS, Bundle, check_engine_compatibility
from ..inputs import Noise
from ..schedule import Plan, all_plans
from .base import Executor, Timings

if TYPE_CHECKING:  # the common API, typed by tensorrt-stubs (tensorrt_rtx has the same classes)
    import tensorrt as trt_api


class GraphCaptureWarning(RuntimeWarning):
    """CUDA graph capture failed; the executor runs plain enqueues instead."""


class EngineSet:
    """Deserialized engines of one bundle (the weights), shareable by several executors."""

    def __init__(self, bundle: Bundle, flavor: Flavor) -> None:
        self.bundle = bundle
        self.flavor = flavor
        trt = flavor.trt
        self.logger: trt_api.ILogger = trt.Logger(trt.Logger.WARNING)
        self.runtime: trt_api.Runtime = trt.Runtime(self.logger)
        self.engines: dict[str, trt_api.ICudaEngine] = {}
        for name in bundle.components():
            plan = (bundle.path / bundle.component(name)["engine"]).read_bytes()
            engine: trt_api.ICudaEngine | None = self.runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise FlavorError(f"{flavor.name} could not deserialize {bundle.component(name)['engine']}")
            self.engines[name] = engine

    def io(self, name: str) -> dict[str, TensorIO]:
        """tensor name -> shape, dtype and direction as the engine declares it."""
        trt = self.flavor.trt
        engine = self.engines[name]
        out = {}
        for index in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(index)
            dims = engine.get_tensor_shape(tensor)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor))).name
            is_input = engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            out[tensor] = TensorIO(shape, dtype, is_input)
        return out

    def check_io(self) -> None:
        """Every engine's IO matches the buffers the executor binds (see turbo_trt.io_contract)."""
        b = self.bundle
        check_io({name: self.io(name) for name in self.engines}, b.family, b.shapes, b.img2img,
                 f"engines in {b.path}")


@dataclass
class _Captured:
    graph: Any
    graph_exec: Any


#: Byte alignment TensorRT asks of every tensor address (IExecutionContext.set_tensor_address); each plan
#: constant gets a slot of its own this size, so every bound address is aligned.
ALIGN = 256


@dataclass
class _PlanBuffers:
    """Device addresses of one plan's constants and its captured graphs (with / without encoders).

    Layout from `base`, one ALIGN-byte slot each: timestep of step 0, its 4 coefficients, timestep of step
    1, ..., then the noise sigma after the last possible step."""

    base: int
    max_steps: int
    graphs: dict[bool, _Captured | None] = field(default_factory=dict)

    def timestep(self, k: int) -> int:
        return self.base + ALIGN * 2 * k

    def coeffs(self, k: int) -> int:
        return self.base + ALIGN * (2 * k + 1)

    @property
    def noise_sigma(self) -> int:
        return self.base + ALIGN * 2 * self.max_steps


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


class TensorRTExecutor(Executor):
    name = "tensorrt"

    @classmethod
    def load(cls, bundle: Bundle, cache_size: int = 8, use_graphs: bool = True,
             strict_targets: bool = True) -> TensorRTExecutor:
        from turbo_trt.gpu import current_gpu

        engine_info = bundle.manifest.get("engine") or {}
        flavor = load_flavor(engine_info.get("flavor"))
        check_engine_compatibility(bundle, flavor.name, flavor.version, current_gpu(), strict_targets)
        engines = EngineSet(bundle, flavor)
        engines.check_io()
        return cls(engines, cache_size=cache_size, use_graphs=use_graphs)

    def __init__(self, engines: EngineSet, cache_size: int = 8, use_graphs: bool = True) -> None:
        super().__init__(engines.bundle, cache_size)
        self.engines = engines
        self.use_graphs = use_graphs
        self.memory = cuda.Memory()
        self.stream = cuda.new_stream()
        self.contexts: dict[str, trt_api.IExecutionContext] = {
            name: engine.create_execution_context() for name, engine in engines.engines.items()
        }
        self._plans: dict[tuple[str, int, int], _PlanBuffers] = {}
        self._warm: set[str] = set()  # modes (txt2img / img2img) whose contexts have run once
        self._marks: list[tuple[str, Any]] | None = None  # set during run_profiled
        self._events: list[Any] = []
        self._allocate()

    # -- load-time allocation -------------------------------------------------------------------------------
    def _allocate(self) -> None:
        b = self.bundle
        shapes = b.shapes
        mem = self.memory
        lat_shape = (shapes["batch"], shapes["latent_channels"], shapes["latent_height"], shapes["latent_width"])
        self.lat_bytes = _nbytes(lat_shape, np.float32)
        self.max_steps = int(b.manifest["scheduler"]["max_steps"])
        self.ancestral = bool(b.manifest["scheduler"]["ancestral"])
        self.ids = {e: mem.pinned_array((shapes["batch"], shapes["tokens"]), np.int32) for e in b.encoders}
        self.ids_dev = {e: mem.alloc(self.ids[e].array.nbytes) for e in b.encoders}
        unet_io = self.engines.io("unet")
        self.embeddings = {unet_input: mem.alloc(_nbytes(unet_io[unet_input].shape, unet_io[unet_input].dtype))
                           for _, _, unet_input in EMBEDDING_FEEDS[b.family]}
        self.latents = [mem.alloc(self.lat_bytes), mem.alloc(self.lat_bytes)]
        self.noise = mem.pinned_array(lat_shape, np.float32)
        self.step_noise = mem.pinned_array((self.max_steps, *lat_shape), np.float32)
        self.step_noise_dev = mem.alloc(self.step_noise.array.nbytes)
        self.zeros = mem.alloc(self.lat_bytes)
        cuda.memset(self.zeros.ptr, 0, self.lat_bytes, self.stream)
        image_shape = (shapes["batch"], shapes["height"], shapes["width"], 3)
        self.image = mem.pinned_array(image_shape, np.uint8)
        self.image_dev = mem.alloc(self.image.array.nbytes)
        self.nonfinite = mem.pinned_array((1,), np.int32)
        self.nonfinite_dev = mem.alloc(4)
        if b.img2img:
            self.init_image = mem.pinned_array(image_shape, np.uint8)
            self.init_image_dev = mem.alloc(self.init_image.array.nbytes)
            self.sample_noise_dev = mem.alloc(self.lat_bytes)
            self.sample_noise = mem.pinned_array(lat_shape, np.float32)
            self.latent_noise_dev = mem.alloc(self.lat_bytes)
        # Prompt-embedding cache: `cache_size` slots of all embeddings, allocated now.
        self._slots = [{k: mem.alloc(v.nbytes) for k, v in self.embeddings.items()} for _ in range(self.cache_size)]
        self._upload_plans()

    def _upload_plans(self) -> None:
        """Timesteps, coefficients and noise sigma of every plan, in one device buffer uploaded once."""
        plans = all_plans(self.bundle.manifest["scheduler"])
        slots = 2 * self.max_steps + 1
        staging = self.memory.pinned_array((len(plans), slots, ALIGN // 4), np.float32)
        device = self.memory.alloc(staging.array.nbytes)
        for row, plan in enumerate(plans):
            for k in range(plan.runs):
                staging.array[row, 2 * k, 0] = plan.timesteps[k]
                staging.array[row, 2 * k + 1, :4] = plan.coeffs[k]
            staging.array[row, 2 * self.max_steps, 0] = plan.noise_sigma
            self._plans[plan.key] = _PlanBuffers(base=device.ptr + row * slots * ALIGN, max_steps=self.max_steps)
        cuda.h2d(device.ptr, staging.ptr, staging.array.nbytes, self.stream)
        cuda.synchronize(self.stream)

    # -- the sequence (enqueued eagerly or captured) ---------------------------------------------------------
    def _bind(self, name: str, tensor: str, address: int) -> None:
        if address % ALIGN:
            raise RuntimeError(f"address {address:#x} for {name}.{tensor} is not {ALIGN}-byte aligned")
        if not self.contexts[name].set_tensor_address(tensor, address):
            raise RuntimeError(f"TensorRT refused address {address:#x} for {name}.{tensor}")

    def _mark(self, label: str) -> None:
        """During run_profiled: an event after the work enqueued so far, closing stage `label`."""
        if self._marks is not None:
            event = self._events[len(self._marks)]
            cuda.record(event, self.stream)
            self._marks.append((label, event))

    def _enqueue(self, name: str, label: str | None = None) -> None:
        if not self.contexts[name].execute_async_v3(int(self.stream)):
            raise RuntimeError(f"TensorRT failed to enqueue {name}")
        self._mark(label or name)

    def _sequence(self, plan: Plan, buffers: _PlanBuffers, with_encoders: bool) -> None:
        s = self.stream
        b = self.bundle
        ancestral = self.ancestral
        if with_encoders:
            for encoder in b.encoders:
                cuda.h2d(self.ids_dev[encoder].ptr, self.ids[encoder].ptr, self.ids[encoder].array.nbytes, s)
        if plan.mode == "img2img":
            cuda.h2d(self.init_image_dev.ptr, self.init_image.ptr, self.init_image.array.nbytes, s)
            cuda.h2d(self.sample_noise_dev.ptr, self.sample_noise.ptr, self.lat_bytes, s)
            cuda.h2d(self.latent_noise_dev.ptr, self.noise.ptr, self.lat_bytes, s)
        else:
            cuda.h2d(self.latents[0].ptr, self.noise.ptr, self.lat_bytes, s)
        if ancestral:
            cuda.h2d(self.step_noise_dev.ptr, self.step_noise.ptr, self.lat_bytes * plan.runs, s)
        self._mark("upload")
        bind = self._bind
        if with_encoders:
            for encoder in b.encoders:
                bind(encoder, "input_ids", self.ids_dev[encoder].ptr)
                for enc, output, unet_input in EMBEDDING_FEEDS[b.family]:
                    if enc == encoder:
                        bind(encoder, output, self.embeddings[unet_input].ptr)
                self._enqueue(encoder)
        if plan.mode == "img2img":
            for tensor, address in (("image", self.init_image_dev.ptr), ("sample_noise", self.sample_noise_dev.ptr),
                                    ("latent_noise", self.latent_noise_dev.ptr), ("noise_sigma", buffers.noise_sigma),
                                    ("latents", self.latents[0].ptr)):
                bind("vae_encoder", tensor, address)
            self._enqueue("vae_encoder")
        for name, buffer in self.embeddings.items():
            bind("unet", name, buffer.ptr)
        for k in range(plan.runs):
            bind("unet", "latents", self.latents[k % 2].ptr)
            bind("unet", "next_latents", self.latents[(k + 1) % 2].ptr)
            bind("unet", "timestep", buffers.timestep(k))
            bind("unet", "step_coeffs", buffers.coeffs(k))
            bind("unet", "step_noise", self.step_noise_dev.ptr + k * self.lat_bytes if ancestral else self.zeros.ptr)
            self._enqueue("unet", f"unet[{k}]")
        bind("vae_decoder", "latents", self.latents[plan.runs % 2].ptr)
        bind("vae_decoder", "image", self.image_dev.ptr)
        bind("vae_decoder", "nonfinite", self.nonfinite_dev.ptr)
        self._enqueue("vae_decoder")
        cuda.d2h(self.image.ptr, self.image_dev.ptr, self.image.array.nbytes, s)
        cuda.d2h(self.nonfinite.ptr, self.nonfinite_dev.ptr, 4, s)
        self._mark("download")

    def _graph(self, plan: Plan, buffers: _PlanBuffers, with_encoders: bool) -> _Captured | None:
        if with_encoders in buffers.graphs:
            return buffers.graphs[with_encoders]
        if plan.mode not in self._warm:  # each context runs once, eagerly, before any capture that uses it
            self._sequence(plan, buffers, True)
            cuda.synchronize(self.stream)
            self._warm.add(plan.mode)
        captured: _Captured | None = None
        try:
            self._check_capturable(plan)
            cuda.begin_capture(self.stream)
            try:
                self._sequence(plan, buffers, with_encoders)
            except BaseException:
                cuda.abort_capture(self.stream)
                raise
            captured = _Captured(*cuda.end_capture(self.stream))
        except Exception as exc:  # capture is an optimization: fall back to plain enqueues
            warnings.warn(f"CUDA graph capture failed ({exc}); running without graphs", GraphCaptureWarning,
                          stacklevel=4)
        buffers.graphs[with_encoders] = captured
        return captured

    def _check_capturable(self, plan: Plan) -> None:
        """TensorRT-RTX says up front whether a context can be stream-captured (TensorRT has no such query)."""
        names = [*self.bundle.encoders, "unet", "vae_decoder"] + (["vae_encoder"] if plan.mode == "img2img" else [])
        for name in names:
            query = getattr(self.contexts[name], "is_stream_capturable", None)
            if query is not None and not query(int(self.stream)):
                raise RuntimeError(f"{name}'s execution context is not stream-capturable "
                                   "(engine built without REQUIRE_USER_ALLOCATION? rebuild with `turbo-trt build`)")

    def _fill(self, ids: dict[str, np.ndarray], noise: Noise, image: np.ndarray | None) -> None:
        """Copy one call's inputs into the pinned host buffers the graphs read."""
        for encoder, array in ids.items():
            self.ids[encoder].array[...] = array
        self.noise.array[...] = noise.latents
        if noise.sample is not None:
            self.sample_noise.array[...] = noise.sample
        if noise.steps:
            for k, step in enumerate(noise.steps):
                self.step_noise.array[k] = step
        elif self.ancestral:  # no step noise given: zeros, as ONNX Runtime does
            self.step_noise.array[...] = 0
        if image is not None:
            self.init_image.array[...] = image

    def run(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
            image: np.ndarray | None) -> tuple[np.ndarray, int]:
        self._fill(ids, noise, image)
        buffers = self._plans[plan.key]
        key = self.prompt_key(ids)
        slot = self._lru.lookup(key)
        if slot is not None:
            for name, buffer in self.embeddings.items():
                cuda.d2d(buffer.ptr, self._slots[slot][name].ptr, buffer.nbytes, self.stream)
        with_encoders = slot is None
        graph = self._graph(plan, buffers, with_encoders) if self.use_graphs else None
        if graph is not None:
            cuda.launch(graph.graph_exec, self.stream)
        else:
            self._sequence(plan, buffers, with_encoders)
        if slot is None:
            new_slot = self._lru.assign(key)
            if new_slot is not None:
                for name, buffer in self.embeddings.items():
                    cuda.d2d(self._slots[new_slot][name].ptr, buffer.ptr, buffer.nbytes, self.stream)
        cuda.synchronize(self.stream)
        return self.image.array.copy(), int(self.nonfinite.array[0])

    def run_profiled(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
                     image: np.ndarray | None) -> Timings:
        """One eager pass (encoders included) with a CUDA event after each stage; GPU time per stage."""
        if not self._events:  # created once, on the first profiled call
            # one per stage mark (upload, each context, each UNet step, download) + the start
            self._events = [cuda.new_event() for _ in range(len(self.contexts) + self.max_steps + 3)]
        self._fill(ids, noise, image)
        self._marks = []
        try:
            cuda.record(self._events[-1], self.stream)
            self._sequence(plan, self._plans[plan.key], True)
            cuda.synchronize(self.stream)
            marks = self._marks
        finally:
            self._marks = None
        timings: Timings = []
        previous = self._events[-1]
        for label, event in marks:
            timings.append((label, cuda.elapsed_ms(previous, event) / 1e3))
            previous = event
        return timings

    def graph_counts(self) -> tuple[int, int]:
        """(graphs captured, captures that failed and fell back to plain enqueue) so far."""
        graphs = [g for buffers in self._plans.values() for g in buffers.graphs.values()]
        return sum(g is not None for g in graphs), sum(g is None for g in graphs)

    def prepare(self, plan: Plan) -> None:
        """Capture `plan`'s graphs now (both variants) rather than on its first call."""
        if self.use_graphs:
            for with_encoders in (True, False):
                self._graph(plan, self._plans[plan.key], with_encoders)

    def fork(self) -> TensorRTExecutor:
        return TensorRTExecutor(self.engines, self.cache_size, self.use_graphs)


    def close(self) -> None:
        """Free everything this executor owns (not the shared engines); it cannot run afterwards."""
        if self.stream is None:
            return
        cuda.synchronize(self.stream)
        for buffers in self._plans.values():
            for captured in buffers.graphs.values():
                if captured is not None:
                    cuda.destroy_graph(captured.graph, captured.graph_exec)
            buffers.graphs.clear()
        self.contexts.clear()
        self.memory.free_all()
        for event in self._events:
            cuda.destroy_event(event)
        self._events = []
        cuda.destroy_stream(self.stream)
        self.stream = None
