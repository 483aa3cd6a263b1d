"""`turbo-trt bench`: honest latency figures for a bundle, with baselines in the same run.

Order of a run: cold start (verify, deserialize, allocate, capture) -> warm-up -> N timed end-to-end images
with the prompt cache off (the text encoder runs every time) -> N more with a repeated prompt (cache on)
-> an instrumented pass per stage (CUDA events on the GPU, wall time around each session on the CPU) ->
throughput with 1..K runners in parallel threads -> baselines (diffusers eager, torch.compile) on the same
model, resolution and steps with guidance 0.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from turbo_trt.errors import UsageError

from .environment import environment
from .flops import bundle_flops
from .stats import summarize

SCHEMA = "turbo-trt-bench/1"
#: Dense FP16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name fragment, from NVIDIA's data sheets.
KNOWN_PEAKS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "RTX 5090": 209.5}


@dataclass(frozen=True)
class BenchOptions:
    engines: Path
    executor: str = "auto"
    steps: int = 1
    iterations: int = 20
    warmup: int = 3
    parallel: int = 2
    prompt: str = "a photo of an astronaut riding a horse on mars"
    baselines: tuple[str, ...] = ("diffusers",)  # "diffusers", "compile"
    peak_tflops: float | None = None
    strict_targets: bool = True
    #: Quick mode for a short GPU lease: one runner (no forks) for throughput, and no cold starts in fresh
    #: child processes (TensorRT-RTX's runtime-cache comparison); the timed images are as many as asked.
    quick: bool = False


def _peak_for(gpu: dict[str, Any] | None, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "--peak-tflops"
    if gpu:
        for fragment, value in KNOWN_PEAKS.items():
            if fragment in gpu["name"]:
                return value, f"data-sheet dense FP16 peak for {fragment}"
    return None, "unknown (pass --peak-tflops)"


class _Memory:
    """Device memory checkpoints on a GPU (cudaMemGetInfo), process RSS on the CPU."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.points: dict[str, float] = {}
        self.base = self._used()

    def _used(self) -> float:
        if self.gpu:
            from turbo_trt.runner import cuda

            free, total = cuda.memory_info()
            return (total - free) / 2**20
        from turbo_trt.fsutil import peak_rss_mib

        return peak_rss_mib()

    def mark(self, name: str) -> None:
        self.points[name] = round(self._used() - self.base, 1)


def _load(opts: BenchOptions, executor: str, memory: _Memory, runtime_cache: bool = True,
          count_allocations: bool = False) -> tuple[Any, dict[str, float], float | None]:
    """Load the bundle, timing each cold-start phase; also returns the peak host RSS (MiB) while loading."""
    from turbo_trt.runner.bundle import open_bundle
    from turbo_trt.runner.pipeline import TurboPipeline

    from .host_memory import peak_mib, reset_peak

    cold: dict[str, float] = {}
    start = time.perf_counter()
    bundle = open_bundle(opts.engines, files="engine" if executor == "tensorrt" else "onnx", verify=True)
    cold["verify_s"] = time.perf_counter() - start
    reset_peak()
    if executor == "tensorrt":
        from turbo_trt.flavors import load_flavor
        from turbo_trt.gpu import current_gpu
        from turbo_trt.runner.bundle import check_engine_compatibility
        from turbo_trt.runner.executors.tensorrt import EngineSet, TensorRTExecutor

        flavor = load_flavor((bundle.manifest.get("engine") or {}).get("flavor"))
        gpu = current_gpu()
        check_engine_compatibility(bundle, flavor.name, flavor.version, gpu, opts.strict_targets)
        t = time.perf_counter()
        engines = EngineSet(bundle, flavor, gpu_name=str((gpu or {}).get("name", "gpu")), runtime_cache=runtime_cache,
                            count_allocations=count_allocations)
        cold["deserialize_s"] = time.perf_counter() - t
        engines.check_io()
        memory.mark("weights")
        t = time.perf_counter()
        runner: Any = TensorRTExecutor(engines, cache_size=8)
        cold["allocate_s"] = time.perf_counter() - t
        memory.mark("after_allocation")
        pipe = TurboPipeline(bundle, runner)
        t = time.perf_counter()
        runner.prepare(pipe.plan(opts.steps, None))
        cold["capture_s"] = time.perf_counter() - t
    else:
        t = time.perf_counter()
        if executor == "onnxruntime-cuda":
            from turbo_trt.runner.executors.onnxruntime_cuda import OnnxRuntimeCudaExecutor

            runner = OnnxRuntimeCudaExecutor(bundle, cache_size=8)
        else:
            from turbo_trt.runner.executors.onnxruntime import OnnxRuntimeExecutor

            runner = OnnxRuntimeExecutor(bundle, cache_size=8)
        cold["deserialize_s"] = time.perf_counter() - t
        memory.mark("after_load")
        pipe = TurboPipeline(bundle, runner)
        cold["allocate_s"] = 0.0  # ONNX Runtime allocates its own scratch inside its first run (first_run_s)
        cold["capture_s"] = 0.0  # ONNX Runtime captures its CUDA graphs inside the first run too
    load_peak = peak_mib()
    t = time.perf_counter()
    pipe(opts.prompt, num_inference_steps=opts.steps, seed=0, output_type="np")
    cold["first_run_s"] = time.perf_counter() - t
    cold["total_s"] = sum(cold.values())
    return pipe, {k: round(v, 4) for k, v in cold.items()}, load_peak


def _timed(pipe: Any, opts: BenchOptions, prompts: list[str]) -> list[float]:
    samples = []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=opts.steps, seed=i, output_type="np")
        samples.append(time.perf_counter() - start)
    return samples


def _throughput(pipe: Any, opts: BenchOptions) -> list[dict[str, float]]:
    results = []
    per_runner = max(2, opts.iterations // 2)
    for runners in range(1, opts.parallel + 1):
        forks = [pipe.fork() for _ in range(runners - 1)]
        try:
            results.append(_throughput_with(pipe, forks, opts, per_runner))
        finally:
            for fork in forks:
                fork.close()
    return results


def _throughput_with(pipe: Any, forks: list[Any], opts: BenchOptions, per_runner: int) -> dict[str, float]:
    """Images/s of `pipe` and its forks, each in its own thread; a worker's exception fails the bench."""
    pipes = [pipe, *forks]
    for p in pipes:  # warm each fork (graph capture happens on its first call)
        p(opts.prompt, num_inference_steps=opts.steps, seed=0, output_type="np")
    barrier = threading.Barrier(len(pipes) + 1)
    errors: list[BaseException] = []

    def work(p: Any, index: int) -> None:
        barrier.wait()
        try:
            for i in range(per_runner):
                p(f"{opts.prompt} {index} {i}", num_inference_steps=opts.steps, seed=i, output_type="np")
        except BaseException as exc:  # reported after join
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p, n)) for n, p in enumerate(pipes)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a throughput runner failed: {errors[0]}") from errors[0]
    images = len(pipes) * per_runner * pipe.batch
    return {"runners": len(pipes), "images": images, "seconds": round(wall, 4), "images_per_s": round(images / wall, 3)}


def _stages(pipe: Any, opts: BenchOptions) -> dict[str, dict[str, float]]:
    from turbo_trt.runner.inputs import latent_shape, make_noise

    plan = pipe.plan(opts.steps, None)
    ids = pipe.token_ids([opts.prompt])
    samples: dict[str, list[float]] = {}
    passes = 3 if opts.quick else max(3, opts.iterations // 2)  # quick: the fewest passes a median needs
    for i in range(passes):
        noise = make_noise(i, latent_shape(pipe.shapes), False, plan.runs if pipe.scheduler["ancestral"] else 0)
        for label, seconds in pipe.executor.run_profiled(ids, plan, noise, None):
            samples.setdefault(label, []).append(seconds)
    return {label: summarize(values) for label, values in samples.items()}


def _device_free() -> int:
    from turbo_trt.runner import cuda

    return cuda.memory_info()[0]


def _plain_twin(pipe: Any) -> Any:
    """The same executor kind without graphs, on the same weights: the reference for graph replay."""
    from turbo_trt.runner.pipeline import TurboPipeline

    executor = pipe.executor
    if executor.name == "tensorrt":
        from turbo_trt.runner.executors.tensorrt import TensorRTExecutor

        return TurboPipeline(pipe.bundle, TensorRTExecutor(executor.engines, cache_size=1, use_graphs=False))
    from turbo_trt.runner.executors.onnxruntime_cuda import OnnxRuntimeCudaExecutor

    return TurboPipeline(pipe.bundle, OnnxRuntimeCudaExecutor(pipe.bundle, cache_size=1, cuda_graphs=False))


def _checks(pipe: Any, opts: BenchOptions, before_timing: tuple[int, int] | None) -> dict[str, Any]:
    """Correctness of the fast path, measured in the same run as its speed (GPU only): whether CUDA graphs
    were captured (and how often an image fell back to plain enqueues), whether graph replay equals plain
    enqueue bit for bit on identical inputs (txt2img at the benched steps, and img2img when the bundle has
    it), and how much device memory the timed images allocated (the design says none): the drop in free
    device memory (2 MiB pages) and, for TensorRT, every allocation TensorRT asked its allocator for."""
    if before_timing is None:
        return {"kind": "CPU run: ONNX Runtime executor, no CUDA graphs to check"}
    import numpy as np

    free_before, allocations_before = before_timing
    allocated = free_before - _device_free()  # read before the reference executor below allocates
    allocator = getattr(getattr(pipe.executor, "engines", None), "allocator", None)
    tensorrt_allocations = None if allocator is None else allocator.allocations - allocations_before
    stats = pipe.executor.graph_stats()
    plain = _plain_twin(pipe)
    cases: list[tuple[str, dict[str, Any]]] = [("txt2img", {})]
    if pipe.bundle.img2img and opts.steps >= 2:
        image = np.random.default_rng(0).integers(0, 256, (pipe.shapes["height"], pipe.shapes["width"], 3),
                                                  dtype=np.uint8)
        cases.append(("img2img", {"image": image, "strength": 0.5}))
    compared = {}
    try:
        for name, extra in cases:
            kwargs = dict(num_inference_steps=opts.steps, seed=1234, output_type="np", **extra)
            graphed, reference = pipe(opts.prompt, **kwargs), plain(opts.prompt, **kwargs)
            compared[name] = {"bit_equal": bool(np.array_equal(graphed, reference)),
                              "max_abs_diff": int(np.abs(graphed.astype(int) - reference.astype(int)).max())}
    finally:
        plain.close()
    if pipe.executor.name == "tensorrt":
        captured, failed = stats["graphs_captured"], stats["capture_failures"]
    else:
        captured, failed = stats["sessions_with_graphs"], stats["sessions_without_graphs"]
    return {"graphs_captured": captured, "graph_capture_failed": failed,
            "plain_enqueue_fallbacks": stats.get("plain_enqueue_fallbacks", 0),
            "graph_vs_plain_enqueue": compared, "device_bytes_allocated_during_timed_images": allocated,
            "tensorrt_allocations_during_timed_images": tensorrt_allocations}


def _efficiency(stages: dict[str, dict[str, float]], flops: dict[str, int], batch: int,
                peak: float | None) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for label, summary in stages.items():
        component = label.split("[")[0]
        if component not in flops:
            continue
        gflop = flops[component] * batch / 1e9
        tflops = gflop / summary["p50_ms"]  # GFLOP per ms == TFLOP per s
        out[label] = {"gflop_per_image": round(flops[component] / 1e9, 3), "achieved_tflops": round(tflops, 3),
                      "share_of_peak": round(tflops / peak, 4) if peak else None}
    return out


def _runtime_cache_cold_starts(pipe: Any, opts: BenchOptions, log: Any) -> dict[str, Any] | None:
    """TensorRT-RTX only: cold start in fresh processes without, then with, the bundle's runtime cache
    (which this bench's own load has written by now)."""
    engines = getattr(pipe.executor, "engines", None)
    if engines is None or getattr(engines, "cache", None) is None:
        return None
    if opts.quick:
        engines.save_runtime_cache()
        return {"cache_file": str(engines.cache_file), "skipped": "quick mode: no cold starts in child processes"}
    from .cold_start import measure_in_child

    engines.save_runtime_cache()
    log("cold start in fresh processes, without and with the runtime cache ...")
    runs = {label: measure_in_child(opts.engines, "tensorrt", opts.steps, on, opts.strict_targets)
            for label, on in (("without", False), ("with", True))}
    return {"cache_file": str(engines.cache_file), **runs}


def run_bench(opts: BenchOptions, log: Any = print, partial: Any = None) -> dict[str, Any]:
    """Everything measured, as one dict. `partial(result)`, when given, is called after each stage (load,
    timing, checks, stages, each baseline) with what is known so far (`complete` False), so a run cut short
    still leaves its results behind."""
    from turbo_trt.gpu import current_gpu
    from turbo_trt.runner.executor_choice import EXECUTORS, ExecutorChoice, choose_executor

    if opts.executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}")
    if opts.iterations < 2 or opts.warmup < 0 or opts.parallel < 1:
        raise UsageError("--iterations must be >= 2, --warmup >= 0 and --parallel >= 1")
    if opts.quick and opts.parallel > 1:
        opts = replace(opts, parallel=1)
    choice = choose_executor(opts.engines, opts.strict_targets) if opts.executor == "auto" \
        else ExecutorChoice(opts.executor)
    executor = choice.name
    log(choice.describe())
    gpu = current_gpu() if executor != "onnxruntime" else None
    memory = _Memory(gpu is not None)
    log(f"loading {opts.engines} with the {executor} executor ...")
    pipe, cold, load_peak = _load(opts, executor, memory, count_allocations=True)
    manifest = pipe.bundle.manifest
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": False,
        "stage": "load",
        "environment": environment(),
        "bundle": {"path": str(opts.engines), "model": manifest["model"]["id"], "kind": manifest["model"]["kind"],
                   "family": manifest["model"]["family"], "shapes": manifest["shapes"],
                   "engine": manifest.get("engine")},
        "executor": executor,
        "executor_choice": {"name": choice.name, "passed_over": choice.passed_over, "notes": choice.notes},
        "device": gpu["name"] if gpu else "CPU",
        "settings": {"steps": opts.steps, "iterations": opts.iterations, "warmup": opts.warmup,
                     "prompt": opts.prompt, "parallel": opts.parallel, "guidance_scale": 0.0,
                     "quick": opts.quick},
        "cold_start": cold,
        "load_host_peak_rss_mib": load_peak,
    }

    def reached(stage: str, **values: Any) -> None:
        result.update(values, stage=stage)
        if partial is not None:
            partial(result)

    reached("load")
    for i in range(opts.warmup):
        pipe(opts.prompt, num_inference_steps=opts.steps, seed=i, output_type="np")
    allocator = getattr(getattr(pipe.executor, "engines", None), "allocator", None)
    before_timing = (_device_free(), allocator.allocations if allocator else 0) if gpu is not None else None
    log(f"timing {opts.iterations} images (prompt cache off) ...")
    with pipe.executor.prompt_cache_disabled():
        uncached = _timed(pipe, opts, [f"{opts.prompt} #{i}" for i in range(opts.iterations)])
    log(f"timing {opts.iterations} images with a repeated prompt (cache on) ...")
    cached = _timed(pipe, opts, [opts.prompt] * opts.iterations)
    memory.mark("peak_after_runs")
    reached("timing", latency=summarize(uncached), latency_cached_prompt=summarize(cached),
            samples_ms=[round(s * 1e3, 3) for s in uncached])
    log("checks (graph replay vs plain enqueue, allocation) ...")
    checks = _checks(pipe, opts, before_timing)
    reached("checks", checks=checks)
    log("per-stage pass ...")
    stages = _stages(pipe, opts)
    reached("stages", stages=stages)
    log(f"throughput with 1..{opts.parallel} runners ...")
    throughput = _throughput(pipe, opts)
    peak, peak_source = _peak_for(gpu, opts.peak_tflops)
    flops = bundle_flops(pipe.bundle.path, manifest)
    result.update({
        "cold_start_runtime_cache": _runtime_cache_cold_starts(pipe, opts, log),
        "device_memory": pipe.executor.memory_report() if executor == "tensorrt" else None,
        "device_memory_line": pipe.executor.describe_memory() if executor == "tensorrt" else None,
        "throughput": throughput,
        "memory_mib": {"kind": "device (cudaMemGetInfo deltas)" if gpu else "host peak RSS growth",
                       **memory.points},
        "flops": {"per_image_gflop": {k: round(v / 1e9, 3) for k, v in flops.items()},
                  "peak_tflops": peak, "peak_source": peak_source,
                  "stages": _efficiency(stages, flops, pipe.batch, peak)},
        "baselines": [],
    })
    reached("throughput")
    for name in opts.baselines:
        from .baselines import run_baseline

        log(f"baseline {name} ...")
        baseline = run_baseline(name, manifest, opts, on_gpu=gpu is not None)
        if baseline.get("latency"):
            baseline["speedup_p50"] = round(baseline["latency"]["p50_ms"] / result["latency"]["p50_ms"], 2)
        result["baselines"].append(baseline)
        reached(f"baseline {name}")
    pipe.close()
    result.update(complete=True, stage="done")
    return result
