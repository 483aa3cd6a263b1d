"""Compile one ONNX graph into a serialized TensorRT engine: strongly typed, one static profile."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from turbo_trt.errors import EngineBuildError
from turbo_trt.flavors import Flavor
from turbo_trt.io_contract import TensorIO
from turbo_trt.progress import Progress

if TYPE_CHECKING:
    # The flavor's module is chosen at run time; for the type check, the common API is TensorRT's own
    # (typed by `tensorrt-stubs`). tensorrt_rtx has the same classes.
    import tensorrt as trt_api


#: Version of the fixed build recipe (strongly typed network, one static profile, graph-capture-ready
#: allocation). Part of every engine fingerprint: bump it when the recipe changes so engines rebuild.
ENGINE_RECIPE = 2


def capture_flag(flavor: Flavor) -> Any:
    """The builder flag that makes enqueue never allocate, so CUDA graph capture of it is legal
    (TensorRT-RTX's REQUIRE_USER_ALLOCATION), or None where the flavor has no such flag (TensorRT,
    whose static-shape engines capture after one warm-up enqueue)."""
    return getattr(flavor.trt.BuilderFlag, "REQUIRE_USER_ALLOCATION", None)


@dataclass(frozen=True)
class EngineOptions:
    """Build settings that change an engine (all are part of its fingerprint)."""

    optimization_level: int = 3
    workspace_gib: float | None = None  # None: TensorRT's default (the GPU's memory)
    # TensorRT-RTX compute capabilities ("8.9", or "current" for the local GPU); () = the build's default
    targets: tuple[str, ...] = field(default_factory=tuple)
    # BuilderFlag.REFIT: weights can be replaced in the built engine (run-time LoRAs, see runner/lora.py)
    refittable: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"optimization_level": self.optimization_level, "workspace_gib": self.workspace_gib,
                "targets": list(self.targets), "refittable": self.refittable}


def _make_progress_monitor(flavor: Flavor, progress: Progress, label: str) -> Any:
    base = flavor.trt.IProgressMonitor

    class _Monitor(base):  # type: ignore[misc, valid-type]
        """Shows the top-level phase's steps as a bar; nested phases name the current activity."""

        def __init__(self) -> None:
            base.__init__(self)
            self.totals: dict[str, int] = {}
            self.done: dict[str, int] = {}
            self.root: str | None = None
            self.current = ""

        def phase_start(self, parent_phase: str | None, phase_name: str, num_steps: int) -> None:
            self.totals[phase_name] = num_steps
            self.done[phase_name] = 0
            if parent_phase is None and self.root is None:
                self.root = phase_name
            self.current = phase_name
            self._draw()

        def step_complete(self, phase_name: str, step: int) -> bool:
            self.done[phase_name] = step + 1
            self._draw()
            return True

        def phase_finish(self, phase_name: str) -> None:
            if phase_name == self.root:
                self.done[phase_name] = self.totals.get(phase_name, 0)
            self._draw()

        def _draw(self) -> None:
            root = self.root or self.current
            progress.bar(label, self.done.get(root, 0), self.totals.get(root, 0), self.current)

    return _Monitor()


class _Logger:
    """Collects TensorRT's errors so a failed build can say what went wrong."""

    def __init__(self, flavor: Flavor) -> None:
        trt = flavor.trt
        base = trt.ILogger

        errors: list[str] = []

        class _L(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    errors.append(msg)

        self.errors = errors
        self.logger = _L()


def network_io(flavor: Flavor, network: trt_api.INetworkDefinition) -> dict[str, TensorIO]:
    """The IO tensors of a parsed network as TensorRT sees them (what the engine will declare)."""
    trt = flavor.trt
    out: dict[str, TensorIO] = {}
    for tensors, count, is_input in ((network.get_input, network.num_inputs, True),
                                     (network.get_output, network.num_outputs, False)):
        for index in range(count):
            tensor: trt_api.ITensor = tensors(index)
            dims = tensor.shape
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            out[tensor.name] = TensorIO(shape, np.dtype(trt.nptype(tensor.dtype)).name, is_input)
    return out


def parse_onnx(flavor: Flavor, onnx_path: Path, logger: Any) -> tuple[Any, trt_api.INetworkDefinition, Any]:
    """(builder, strongly typed network, parser) for `onnx_path`; the parser must outlive the network."""
    trt = flavor.trt
    builder: trt_api.Builder = trt.Builder(logger.logger)
    network: trt_api.INetworkDefinition = builder.create_network(flavor.network_flags())
    parser: trt_api.OnnxParser = trt.OnnxParser(network, logger.logger)
    if not parser.parse_from_file(str(onnx_path)):
        details = ("; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
                   or "; ".join(logger.errors))
        raise EngineBuildError(f"{flavor.name} could not parse {onnx_path.name}: {details}")
    return builder, network, parser


def build_engine(
    flavor: Flavor,
    onnx_path: Path,
    options: EngineOptions,
    progress: Progress,
    timing_cache: Path | None = None,
    label: str = "engine",
    expected_io: dict[str, TensorIO] | None = None,
) -> tuple[bytes, float]:
    """Parse `onnx_path`, build a serialized engine, return (engine bytes, seconds).

    With a timing cache path (tensorrt flavor), the cache is loaded if present and the updated cache
    written back atomically after the build. With `expected_io` (the manifest's record of the graph's
    IO), the parsed network must declare exactly those tensors, or the build stops before compiling.
    """
    trt = flavor.trt
    log = _Logger(flavor)
    start = time.perf_counter()
    builder, network, _parser = parse_onnx(flavor, onnx_path, log)
    if expected_io is not None:
        parsed = network_io(flavor, network)
        if parsed != expected_io:
            differ = sorted(n for n in set(parsed) | set(expected_io) if parsed.get(n) != expected_io.get(n))
            raise EngineBuildError(
                f"{flavor.name} parses {onnx_path.name} with IO that differs from the manifest in {differ}: "
                + "; ".join(f"{n}: {parsed[n].describe() if n in parsed else 'absent'} vs "
                            f"{expected_io[n].describe() if n in expected_io else 'absent'}" for n in differ))

    config: trt_api.IBuilderConfig = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    flag = capture_flag(flavor)
    if flag is not None:
        config.set_flag(flag)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    if flavor.ahead_of_time and options.targets:
        rtx_config: Any = config  # compute capabilities exist in TensorRT-RTX's API only
        rtx_config.num_compute_capabilities = len(options.targets)
        for index, target in enumerate(options.targets):
            rtx_config.set_compute_capability(flavor.compute_capability_enum(target), index)

    profile: trt_api.IOptimizationProfile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor: trt_api.ITensor = network.get_input(index)
        dims = tensor.shape
        if any(dims[i] < 0 for i in range(len(dims))):
            raise EngineBuildError(f"{onnx_path.name}: input {tensor.name} has a dynamic shape {dims}; "
                                   "bundles are static-shape")
        profile.set_shape(tensor.name, dims, dims, dims)
    config.add_optimization_profile(profile)
    config.progress_monitor = _make_progress_monitor(flavor, progress, label)

    cache: trt_api.ITimingCache | None = None
    if timing_cache is not None and flavor.uses_timing_cache:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=True)

    serialized: trt_api.IHostMemory | None = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{flavor.name} failed to build {onnx_path.name}: "
                               + ("; ".join(log.errors) or "no error message") + _refit_hint(flavor, options))
    if cache is not None and timing_cache is not None:
        from turbo_trt.fsutil import atomic_write_bytes

        atomic_write_bytes(timing_cache, memoryview(cache.serialize()))
    return bytes(serialized), time.perf_counter() - start


def _refit_hint(flavor: Flavor, options: EngineOptions) -> str:
    """TensorRT-RTX 1.7 fails every REFIT build on a machine without a GPU (Myelin's CUDA check), even a
    single MatMul; say so rather than leave the user with Myelin's message."""
    if not options.refittable:
        return ""
    from turbo_trt.gpu import current_gpu

    where = "" if current_gpu() is not None else f" (this machine has no GPU: {flavor.name} {flavor.version} builds " \
        "refittable engines only with one)"
    return (f". The build was --refittable{where}; build refittable engines on a machine with an NVIDIA GPU, or use "
            "--onnx-only --refittable to swap LoRAs with ONNX Runtime")


def _build_engine_file(flavor_name: str, onnx_path: Path, options: EngineOptions, engine_path: Path,
                       timing_cache: Path | None, label: str, show_progress: bool,
                       expected_io: dict[str, TensorIO] | None) -> dict[str, float]:
    """Child-process entry: build one engine and write it atomically to `engine_path`."""
    from turbo_trt.flavors import load_flavor
    from turbo_trt.fsutil import atomic_write_bytes, peak_rss_mib

    plan, seconds = build_engine(load_flavor(flavor_name), onnx_path, options, Progress(enabled=show_progress),
                                 timing_cache=timing_cache, label=label, expected_io=expected_io)
    atomic_write_bytes(engine_path, plan)
    return {"seconds": seconds, "bytes": float(len(plan)), "peak_rss_mib": peak_rss_mib()}


def build_engine_isolated(flavor: Flavor, onnx_path: Path, options: EngineOptions, engine_path: Path,
                          progress: Progress, timing_cache: Path | None = None, label: str = "engine",
                          expected_io: dict[str, TensorIO] | None = None) -> dict[str, float]:
    """`build_engine` in a fresh child process (see isolate.py), which writes the engine file itself.
    Returns {"seconds", "bytes", "peak_rss_mib"} (the child's own peak)."""
    from .isolate import run_isolated

    return run_isolated(f"building {onnx_path.name}", _build_engine_file, flavor.name, onnx_path, options,
                        engine_path, timing_cache, label, progress.enabled, expected_io)
