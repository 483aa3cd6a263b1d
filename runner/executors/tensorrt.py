"""TensorRT executor: every buffer allocated and every tensor address bound at load; one CUDA graph per
(plan, with or without text encoders).

Per image: fill pinned host buffers, one graph launch (which copies the plan's constants and the inputs
up, runs text encoder(s) -> [VAE encoder] -> UNet steps -> VAE decoder, and copies the image and the
non-finite count back), one sync. No device allocation happens per image. A repeated prompt skips the
text encoders: its embeddings are kept in preallocated device slots and copied into place before the
graph variant without encoders is launched. Buffers, bindings and the per-image program are laid out in
`tensorrt_layout.py`.

Device memory follows the TensorRT documentation: contexts are created with user-managed memory, and all
contexts of one executor share one scratch allocation sized to the largest need, since the stages of an
image run one after another on one stream (each fork has its own). A failed enqueue, launch or sync
leaves the executor usable: it synchronizes before its host buffers are touched again, fills no prompt
cache slot, and names the stage. A failed graph capture falls back to plain enqueues and is retried on a
later call (up to CAPTURE_ATTEMPTS times); every fallback is counted (`graph_stats`).

Engines (weights) live in an EngineSet that several executors share (`fork()`).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from turbo_trt.errors import ExecutionError
from turbo_trt.flavors import load_flavor

from .. import cuda
from ..bundle import Bundle, check_engine_compatibility
from ..inputs import Control, Noise
from ..schedule import Plan
from .base import Executor, Launched, Timings
from .tensorrt_engines import EngineSet
from .tensorrt_layout import ALIGN, Layout, Op

if TYPE_CHECKING:
    import tensorrt as trt_api

__all__ = ["EngineSet", "GraphCaptureWarning", "TensorRTExecutor"]

#: Captures tried per (plan, variant) before that variant stays on plain enqueues for good.
CAPTURE_ATTEMPTS = 3


class GraphCaptureWarning(RuntimeWarning):
    """CUDA graph capture failed; the executor runs plain enqueues instead (and retries later)."""


@dataclass
class _Captured:
    graph: Any
    graph_exec: Any


@dataclass
class _GraphLaunch(Launched):
    """An image launched on the executor's stream: what `wait` needs to finish it."""

    key: bytes
    new_slot: int | None
    guard: contextlib.ExitStack


class TensorRTExecutor(Executor):
    name = "tensorrt"

    @classmethod
    def load(cls, bundle: Bundle, cache_size: int = 8, use_graphs: bool = True,
             strict_targets: bool = True, runtime_cache: bool = True) -> TensorRTExecutor:
        from turbo_trt.gpu import current_gpu

        engine_info = bundle.manifest.get("engine") or {}
        flavor = load_flavor(engine_info.get("flavor"))
        gpu = current_gpu()
        check_engine_compatibility(bundle, flavor.name, flavor.version, gpu, strict_targets)
        engines = EngineSet(bundle, flavor, gpu_name=str((gpu or {}).get("name", "gpu")), runtime_cache=runtime_cache)
        engines.check_io()
        return cls(engines, cache_size=cache_size, use_graphs=use_graphs)

    def __init__(self, engines: EngineSet, cache_size: int = 8, use_graphs: bool = True) -> None:
        super().__init__(engines.bundle, cache_size)
        self.engines = engines
        self.use_graphs = use_graphs
        self.memory = cuda.Memory()
        self.stream = cuda.new_stream()
        self.contexts: dict[str, trt_api.IExecutionContext] = {}
        try:
            with engines.use_lock.shared():  # contexts are created against the shared runtime cache: no save now
                self._load()
            engines.runtime_cache_changed()  # creating contexts can compile into the cache: saved after an image
        except BaseException:
            self.contexts.clear()
            self.memory.free_all()
            cuda.destroy_stream(self.stream)
            self.stream = None
            raise
        self._graphs: dict[tuple[tuple[str, int, int], bool], _Captured] = {}
        self._capture_failures: dict[tuple[tuple[str, int, int], bool], int] = {}
        self.plain_runs = 0  # images run with plain enqueues although graphs were on
        self._warm: set[str] = set()  # contexts that have run once (eagerly) since load
        self._marks: list[tuple[str, Any]] | None = None  # set during run_profiled
        self._events: list[Any] = []
        self._broken: str | None = None  # a sync that could not complete: the CUDA context is unusable
        self._done: Any = None  # event recorded after a launched image (created on the first launch)
        self._launched: _GraphLaunch | None = None  # launched and not yet waited for
        self._weights_version = engines.weights_version

    def _load(self) -> None:
        engines = self.engines
        self.layout = Layout(self.bundle, self.memory, self.cache_size)
        for key, component in self.layout.contexts():
            self.contexts[key] = engines.create_context(component)
        # one scratch allocation for all contexts (they never run at the same time)
        self.scratch_bytes = max(engines.scratch_bytes().values())
        self.scratch = self.memory.alloc(self.scratch_bytes)
        for context in self.contexts.values():
            self._set_scratch(context)
        cuda.memset(self.layout.zeros.ptr, 0, self.layout.lat_bytes, self.stream)
        cuda.h2d(self.layout.plan_table_dev.ptr, self.layout.plan_table.ptr, self.layout.plan_table.array.nbytes,
                 self.stream)
        cuda.synchronize(self.stream)
        self._bind_all()

    # -- load -------------------------------------------------------------------------------------------------
    def _set_scratch(self, context: Any) -> None:
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self.scratch.ptr, self.scratch_bytes)
        else:  # TensorRT 10.0
            context.device_memory = self.scratch.ptr

    def _bind_all(self) -> None:
        """Set every tensor address of every context, once; each is checked and 256-byte aligned."""
        for key, tensors in self.layout.bindings().items():
            for tensor, address in tensors.items():
                if address % ALIGN:
                    raise ExecutionError(f"address {address:#x} for {key}.{tensor} is not {ALIGN}-byte aligned",
                                         stage=key)
                if not self.contexts[key].set_tensor_address(tensor, address):
                    raise ExecutionError(f"TensorRT refused address {address:#x} for {key}.{tensor}", stage=key)

    def memory_report(self) -> dict[str, Any]:
        """Device bytes of this executor's bundle: engine weights (measured at deserialization, shared by
        forks), the one shared scratch allocation, and the buffers; with what one scratch per context
        (TensorRT's default allocation) would have cost."""
        scratch = self.engines.scratch_bytes()
        per_context = sum(scratch[component] for _, component in self.layout.contexts())
        return {
            "weights_bytes": sum(self.engines.weights_bytes.values()),
            "weights_bytes_by_component": dict(self.engines.weights_bytes),
            "scratch_bytes": self.scratch_bytes,
            "scratch_bytes_by_component": scratch,
            "scratch_bytes_one_per_context": per_context,
            "contexts": len(self.contexts),
            "buffer_bytes": self.memory.device_bytes - self.scratch_bytes,
        }

    def describe_memory(self) -> str:
        """One line for humans: what `memory_report` says."""
        r = self.memory_report()
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        return (f"device memory: weights {mib(r['weights_bytes'])}, scratch {mib(r['scratch_bytes'])} shared by "
                f"{r['contexts']} contexts (one each would be {mib(r['scratch_bytes_one_per_context'])}), "
                f"buffers {mib(r['buffer_bytes'])}")

    # -- the program (enqueued eagerly or captured) ----------------------------------------------------------
    def _execute(self, ops: list[Op]) -> None:
        s = self.stream
        for op in ops:
            if op.kind == "enqueue":
                if not self.contexts[op.name].execute_async_v3(int(s)):
                    raise ExecutionError(f"TensorRT failed to enqueue {op.name}", stage=op.name)
            elif op.kind == "h2d":
                cuda.h2d(op.dst, op.src, op.nbytes, s)
            elif op.kind == "d2d":
                cuda.d2d(op.dst, op.src, op.nbytes, s)
            elif op.kind == "d2h":
                cuda.d2h(op.dst, op.src, op.nbytes, s)
            elif op.kind == "mark" and self._marks is not None:
                event = self._events[len(self._marks)]
                cuda.record(event, s)
                self._marks.append((op.name, event))

    def _ran_eagerly(self, program: list[Op]) -> None:
        """A plain (not captured) run enqueued these contexts: the first run of each compiles its kernels into
        the runtime cache (saved after the image); a later capture needs no eager run of them."""
        needed = {op.name for op in program if op.kind == "enqueue"}
        if not needed <= self._warm:
            self._warm |= needed
            self.engines.runtime_cache_changed()

    def _graph(self, plan: Plan, with_encoders: bool) -> _Captured | None:
        key = (plan.key, with_encoders)
        if key in self._graphs:
            return self._graphs[key]
        if self._capture_failures.get(key, 0) >= CAPTURE_ATTEMPTS:
            return None
        program = self.layout.program(plan, True)
        needed = {op.name for op in program if op.kind == "enqueue"}
        if not needed <= self._warm:  # every context runs once, eagerly, before any capture that uses it
            self._execute(program)
            cuda.synchronize(self.stream)
            self._warm |= needed
            self.engines.runtime_cache_changed()  # the JIT compiled these contexts' kernels: saved after the image
        try:
            self._check_capturable(plan)
            cuda.begin_capture(self.stream)
            try:
                self._execute(self.layout.program(plan, with_encoders))
            except BaseException:
                cuda.abort_capture(self.stream)
                raise
            captured = _Captured(*cuda.end_capture(self.stream))
        except Exception as exc:  # capture is an optimization: fall back to plain enqueues, retry later
            failures = self._capture_failures[key] = self._capture_failures.get(key, 0) + 1
            warnings.warn(f"CUDA graph capture failed ({exc}); running without graphs "
                          f"(attempt {failures} of {CAPTURE_ATTEMPTS})", GraphCaptureWarning, stacklevel=4)
            return None
        self._graphs[key] = captured
        return captured

    def _check_capturable(self, plan: Plan) -> None:
        """TensorRT-RTX says up front whether a context can be stream-captured (TensorRT has no such query)."""
        needed = {op.name for op in self.layout.program(plan, True) if op.kind == "enqueue"}
        for key in sorted(needed):
            query = getattr(self.contexts[key], "is_stream_capturable", None)
            if query is not None and not query(int(self.stream)):
                raise RuntimeError(f"{key}'s execution context is not stream-capturable "
                                   "(engine built without REQUIRE_USER_ALLOCATION? rebuild with `turbo-trt build`)")

    # -- run-time weights (LoRA) -------------------------------------------------------------------------------
    def set_weights(self, updates: Any, current_weight: Any = None) -> None:
        """Refit the shared engines with new graph weights: component -> {initializer: value, or None for the
        base value from `current_weight(component, name)`}. Needs engines built with --refittable. Every
        executor sharing the engines (forks) drops its captured graphs and prompt cache before its next image,
        since both were made with the old weights."""
        from .tensorrt_refit import refit_engines

        self._check_usable()
        cuda.synchronize(self.stream)
        engines = self.engines
        with engines.use_lock.exclusive():  # no fork is executing these engines during the refit
            try:
                refit_engines(engines.flavor.trt, engines.engines, engines.logger, updates, current_weight,
                              log=lambda message: print(f"turbo-trt: {message}", flush=True))
            finally:
                engines.weights_version += 1  # even a half-done refit changed weights: recapture everywhere

    def _follow_weights(self) -> None:
        """Drop graphs and cached embeddings made before the shared engines were last refitted."""
        if self._weights_version != self.engines.weights_version:
            cuda.synchronize(self.stream)
            for captured in self._graphs.values():
                cuda.destroy_graph(captured.graph, captured.graph_exec)
            self._graphs.clear()
            self._capture_failures.clear()
            self._warm.clear()
            self.invalidate_prompt_cache()
            self._weights_version = self.engines.weights_version

    # -- per image --------------------------------------------------------------------------------------------
    def _check_not_launched(self) -> None:
        """Before taking the engines' shared lock: a second call while a launch is in flight raises at once
        (taken after the lock, it could block behind a refit or cache save waiting for that launch)."""
        if self._launched is not None:
            raise ExecutionError("an image launched with launch() is still in flight: wait() for it first",
                                 stage="launch")

    @property
    def broken(self) -> str | None:
        return self._broken

    def _check_usable(self) -> None:
        if self._broken:
            raise ExecutionError(f"this executor is unusable after an earlier CUDA failure ({self._broken}); "
                                 "load the bundle again", stage="sync")
        if self.stream is None:
            raise ExecutionError("this executor was closed", stage="load")
        if self._launched is not None:
            raise ExecutionError("an image launched with launch() is still in flight: wait() for it first",
                                 stage="launch")
        self._follow_weights()

    def _recover(self, stage: str, exc: BaseException) -> ExecutionError:
        """After a failure: wait for whatever was enqueued before touching host buffers again."""
        try:
            cuda.synchronize(self.stream)
        except Exception as sync_exc:  # a sticky error: nothing more can run in this CUDA context
            self._broken = f"{stage}: {sync_exc}"
        if isinstance(exc, ExecutionError):
            return exc
        return ExecutionError(f"{stage} failed: {exc}", stage=stage)

    def run(self, ids: dict[str, Any], plan: Plan, noise: Noise, image: Any,
            control: Control | None = None) -> tuple[Any, int]:
        self._check_not_launched()
        with self.engines.use_lock.shared():
            result = self._run(ids, plan, noise, image, control)
        self.engines.save_runtime_cache_if_changed()  # outside the image: it waits for other forks' images
        return result

    def _run(self, ids: dict[str, Any], plan: Plan, noise: Noise, image: Any,
             control: Control | None = None) -> tuple[Any, int]:
        key, new_slot = self._enqueue(ids, plan, noise, image, control)
        try:
            cuda.synchronize(self.stream)
        except Exception as exc:
            self._abandon(new_slot)
            raise self._recover("synchronize", exc) from exc
        return self._finish(key, new_slot)

    def _enqueue(self, ids: dict[str, Any], plan: Plan, noise: Noise, image: Any,
                 control: Control | None = None) -> tuple[bytes, int | None]:
        """Everything of one image up to its last enqueue, without waiting: fill the pinned inputs, copy a
        cached prompt's embeddings into place (or run the encoders), launch the graph (plain enqueues where
        there is none), store new embeddings in their cache slot. Returns (prompt key, slot to assign once
        the image is done). On failure the slot is given up and the stream synchronized before raising."""
        self._check_usable()
        layout = self.layout
        layout.fill(ids, noise, image, plan.runs, control)
        key = self.prompt_key(ids)
        slot = self._lru.lookup(key)
        new_slot = None if slot is not None else self._lru.next_slot(key)
        stage = "prompt cache copy"
        try:
            if slot is not None:
                self._execute(layout.cache_copies(slot, store=False))
            with_encoders = slot is None
            stage = "warm-up and graph capture"
            graph = self._graph(plan, with_encoders) if self.use_graphs else None
            if graph is not None:
                stage = f"graph launch ({plan.mode}, {plan.runs} UNet run(s))"
                cuda.launch(graph.graph_exec, self.stream)
            else:
                stage = "plain enqueue"
                if self.use_graphs:
                    self.plain_runs += 1
                program = layout.program(plan, with_encoders)
                self._execute(program)
                self._ran_eagerly(program)
            if new_slot is not None:
                stage = "prompt cache store"
                self._execute(layout.cache_copies(new_slot, store=True))
        except Exception as exc:
            self._abandon(new_slot)
            raise self._recover(stage, exc) from exc
        return key, new_slot

    def _abandon(self, new_slot: int | None) -> None:
        if new_slot is not None:
            self._lru.evict_slot(new_slot)  # its device contents may be half-written

    def _finish(self, key: bytes, new_slot: int | None) -> tuple[Any, int]:
        """After the stream (or the launch's event) has synchronized: commit the cache slot, copy out."""
        if new_slot is not None:
            self._lru.assign(key)
        return self.layout.image.array.copy(), int(self.layout.nonfinite.array[0])

    # -- split launch / wait (frame streams) -------------------------------------------------------------------
    def launch(self, ids: dict[str, Any], plan: Plan, noise: Noise, image: Any,
               control: Control | None = None) -> Launched:
        """Fill the pinned inputs, launch the image's graph and record an event after it; returns without
        waiting, so the host can prepare the next frame and finish the last while the GPU runs this one.
        The engines' shared lock is held from here to `wait` (no refit can start in between)."""
        self._check_not_launched()
        guard = contextlib.ExitStack()
        guard.enter_context(self.engines.use_lock.shared())
        try:
            key, new_slot = self._enqueue(ids, plan, noise, image, control)
            try:
                if self._done is None:
                    self._done = cuda.new_event(timing=False)
                cuda.record(self._done, self.stream)
            except Exception as exc:
                self._abandon(new_slot)
                raise self._recover("event record", exc) from exc
        except BaseException:
            guard.close()
            raise
        launched = _GraphLaunch(key, new_slot, guard)
        self._launched = launched
        return launched

    def wait(self, launched: Launched) -> tuple[Any, int]:
        """Block on the launch's event (the GIL is released), then commit its cache slot and copy the image
        out of the pinned buffer. A failure raises ExecutionError like `run`; the executor stays usable."""
        if not isinstance(launched, _GraphLaunch) or launched is not self._launched:
            raise ExecutionError("wait() got a launch that this executor does not have in flight", stage="wait")
        self._launched = None
        with launched.guard:
            try:
                cuda.event_synchronize(self._done)
            except Exception as exc:
                self._abandon(launched.new_slot)
                raise self._recover("synchronize", exc) from exc
            result = self._finish(launched.key, launched.new_slot)
        self.engines.save_runtime_cache_if_changed()  # as `run`: outside the image (it waits for other forks')
        return result

    def run_profiled(self, ids: dict[str, Any], plan: Plan, noise: Noise, image: Any,
                     control: Control | None = None) -> Timings:
        """One eager pass (encoders included) with a CUDA event after each stage; GPU time per stage."""
        self._check_not_launched()
        with self.engines.use_lock.shared():
            return self._run_profiled(ids, plan, noise, image, control)

    def _run_profiled(self, ids: dict[str, Any], plan: Plan, noise: Noise, image: Any,
                      control: Control | None = None) -> Timings:
        self._check_usable()
        program = self.layout.program(plan, True)
        marks = sum(op.kind == "mark" for op in program)
        while len(self._events) < marks + 1:  # created once per size, then reused
            self._events.append(cuda.new_event())
        self.layout.fill(ids, noise, image, plan.runs, control)
        self._marks = []
        try:
            cuda.record(self._events[-1], self.stream)
            self._execute(program)
            self._ran_eagerly(program)
            cuda.synchronize(self.stream)
            recorded = self._marks
        except Exception as exc:
            raise self._recover("profiled run", exc) from exc
        finally:
            self._marks = None
        timings: Timings = []
        previous = self._events[-1]
        for label, event in recorded:
            timings.append((label, cuda.elapsed_ms(previous, event) / 1e3))
            previous = event
        return timings

    def graph_stats(self) -> dict[str, int]:
        """graphs captured; captures that failed; images run with plain enqueues although graphs were on."""
        return {"graphs_captured": len(self._graphs), "capture_failures": sum(self._capture_failures.values()),
                "plain_enqueue_fallbacks": self.plain_runs}

    def graph_counts(self) -> tuple[int, int]:
        """(graphs captured, captures that failed) so far."""
        stats = self.graph_stats()
        return stats["graphs_captured"], stats["capture_failures"]

    def prepare(self, plan: Plan) -> None:
        """Capture `plan`'s graphs now (both variants) rather than on its first call."""
        self._check_not_launched()
        with self.engines.use_lock.shared():
            self._check_usable()
            if self.use_graphs:
                for with_encoders in (True, False):
                    self._graph(plan, with_encoders)
        self.engines.save_runtime_cache_if_changed()

    def fork(self) -> TensorRTExecutor:
        return TensorRTExecutor(self.engines, self.cache_size, self.use_graphs)

    def close(self) -> None:
        """Free everything this executor owns (not the shared engines); it cannot run afterwards."""
        if self.stream is None:
            return
        if not self._broken:
            cuda.synchronize(self.stream)
        if self._launched is not None:  # launched and never waited for: the sync above finished it
            self._launched.guard.close()  # before the save, which takes the engines' lock exclusively
            self._launched = None
        if not self._broken:
            self.engines.save_runtime_cache()
        if self._done is not None:
            cuda.destroy_event(self._done)
            self._done = None
        for captured in self._graphs.values():
            cuda.destroy_graph(captured.graph, captured.graph_exec)
        self._graphs.clear()
        self.contexts.clear()  # contexts go before the scratch memory they use
        self.memory.free_all()
        for event in self._events:
            cuda.destroy_event(event)
        self._events = []
        cuda.destroy_stream(self.stream)
        self.stream = None
