"""Tier 2: the GPU executors on a real NVIDIA GPU (skipped without one).

Builds the tiny SD bundle on this GPU with the installed flavor (or, with TURBO_TRT_GPU_BUNDLE set, uses that
prebuilt bundle: the GPU kit carries one, so nothing is exported there), then checks, for the TensorRT executor and
(where onnxruntime-gpu is installed) the ONNX Runtime CUDA executor: output against the ONNX Runtime CPU
executor, CUDA-graph replay against plain enqueue bit for bit (1, 2, 4 steps, txt2img and img2img), no
device allocation per image, the prompt cache, forks in threads, and an injected failure that leaves the
executor usable. Allocation is measured two ways: free device memory (2 MiB pages) and, for TensorRT, a
counting allocator that sees every allocation TensorRT makes, however small.
"""

from __future__ import annotations

import numpy as np
import pytest

from turbo_trt.flavors import installed_flavors
from turbo_trt.gpu import current_gpu

from .conftest import quiet_build, tiny_options

pytestmark = pytest.mark.gpu

if current_gpu() is None:
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    """The tiny bundle, with engines of the installed flavor built on this GPU (ONNX only without one:
    the ONNX Runtime CUDA executor still runs); a copy of TURBO_TRT_GPU_BUNDLE when that is set."""
    import os
    import shutil

    out = tmp_path_factory.mktemp("gpu") / "tiny-sd-turbo"
    if os.environ.get("TURBO_TRT_GPU_BUNDLE"):
        return shutil.copytree(os.environ["TURBO_TRT_GPU_BUNDLE"], out, ignore=shutil.ignore_patterns("*.lock"))
    flavors = installed_flavors()
    quiet_build(tiny_options("tiny-sd-turbo", out, flavor=flavors[0] if flavors else None, onnx_only=not flavors))
    return out


def _executor_wanted(name: str) -> None:
    """TURBO_TRT_GPU_EXECUTORS (comma-separated, e.g. `onnxruntime-cuda`) limits the executors tested; the GPU
    kit sets it when TensorRT-RTX did not run in its probe, so TensorRT-RTX is not even loaded then."""
    import os

    wanted = [w.strip() for w in os.environ.get("TURBO_TRT_GPU_EXECUTORS", "").split(",") if w.strip()]
    if wanted and name not in wanted:
        pytest.skip(f"TURBO_TRT_GPU_EXECUTORS={','.join(wanted)} leaves out {name}")


def _need_tensorrt() -> None:
    _executor_wanted("tensorrt")
    if not installed_flavors():
        pytest.skip("needs TensorRT or TensorRT-RTX")


def _strict(bundle) -> bool:
    """TensorRT-RTX's default engines target 8.0, 8.6, 8.9 and 12.x; Hopper (9.0) is outside them, and
    whether they run there anyway is what a GPU session finds out, so the check only warns on such a GPU."""
    from turbo_trt.manifest import read_manifest

    gpu = current_gpu()
    return gpu is None or gpu["compute_capability"] in read_manifest(bundle)["engine"]["targets"] \
        or read_manifest(bundle)["engine"]["flavor"] != "tensorrt-rtx"


@pytest.fixture(scope="module")
def trt_pipe(gpu_bundle):
    from turbo_trt.runner import TurboPipeline

    _need_tensorrt()
    return TurboPipeline.from_bundle(gpu_bundle, executor="tensorrt", strict_targets=_strict(gpu_bundle))


@pytest.fixture(scope="module")
def counted_pipe(gpu_bundle):
    """TensorRT with a counting IGpuAllocator on its runtime (every allocation TensorRT makes)."""
    from turbo_trt.flavors import load_flavor
    from turbo_trt.manifest import read_manifest
    from turbo_trt.runner import TurboPipeline
    from turbo_trt.runner.bundle import open_bundle
    from turbo_trt.runner.executors.tensorrt import EngineSet, TensorRTExecutor

    _need_tensorrt()
    bundle = open_bundle(gpu_bundle, files="engine")
    flavor = load_flavor(read_manifest(gpu_bundle)["engine"]["flavor"])
    engines = EngineSet(bundle, flavor, count_allocations=True)
    return TurboPipeline(bundle, TensorRTExecutor(engines))


def _cuda_pipe(gpu_bundle, **kwargs):
    from turbo_trt.runner.bundle import open_bundle
    from turbo_trt.runner.executors.onnxruntime_cuda import OnnxRuntimeCudaExecutor, cuda_unavailable_reason
    from turbo_trt.runner.pipeline import TurboPipeline

    _executor_wanted("onnxruntime-cuda")
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(f"onnxruntime-cuda: {reason}")
    bundle = open_bundle(gpu_bundle, files="onnx")
    return TurboPipeline(bundle, OnnxRuntimeCudaExecutor(bundle, **kwargs))


@pytest.fixture(scope="module", params=["tensorrt", "onnxruntime-cuda"])
def gpu_pipes(request, gpu_bundle):
    """(graphed pipeline, the same executor kind without graphs) for each GPU executor that runs here."""
    from turbo_trt.runner.pipeline import TurboPipeline

    if request.param == "tensorrt":
        from turbo_trt.runner.executors.tensorrt import TensorRTExecutor

        trt_pipe = request.getfixturevalue("trt_pipe")
        return trt_pipe, TurboPipeline(trt_pipe.bundle, TensorRTExecutor(trt_pipe.executor.engines, use_graphs=False))
    return _cuda_pipe(gpu_bundle), _cuda_pipe(gpu_bundle, cuda_graphs=False)


IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
CASES = [(1, None), (2, None), (4, None), (2, 0.5), (4, 0.75)]


@pytest.mark.parametrize("steps,strength", CASES)
def test_matches_onnxruntime_cpu(gpu_bundle, gpu_pipes, steps, strength):
    from turbo_trt.runner import TurboPipeline

    ort_pipe = TurboPipeline.from_bundle(gpu_bundle, executor="onnxruntime")
    extra = {} if strength is None else {"image": IMAGE, "strength": strength}
    ours = gpu_pipes[0]("a photo of a cat", num_inference_steps=steps, seed=5, output_type="np", **extra)
    ref = ort_pipe("a photo of a cat", num_inference_steps=steps, seed=5, output_type="np", **extra)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # Both run the same FP16 graphs; GPU kernels round differently from ONNX Runtime's CPU ones.
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("steps,strength", CASES)
def test_graph_replay_equals_plain_run(gpu_pipes, steps, strength):
    graphed, plain = gpu_pipes
    extra = {} if strength is None else {"image": IMAGE, "strength": strength}
    for prompt in ("a red boat", "a red boat"):  # the second call replays the graph without encoders
        a = graphed(prompt, num_inference_steps=steps, seed=9, output_type="np", **extra)
        b = plain(prompt, num_inference_steps=steps, seed=9, output_type="np", **extra)
        np.testing.assert_array_equal(a, b)
    stats = graphed.executor.graph_stats()
    assert stats.get("graphs_captured", stats.get("sessions_with_graphs", 0)) > 0, stats


def test_tensorrt_captures_every_graph(trt_pipe):
    trt_pipe("capture", num_inference_steps=2, seed=0, output_type="np")
    stats = trt_pipe.executor.graph_stats()
    assert stats["graphs_captured"] > 0 and stats["capture_failures"] == 0 and stats["plain_enqueue_fallbacks"] == 0


def test_no_tensorrt_allocation_per_image(counted_pipe):
    from turbo_trt.runner import cuda

    for steps in (1, 2):  # capture both variants of both plans first
        counted_pipe("warm", num_inference_steps=steps, seed=0, output_type="np")
        counted_pipe("warm", num_inference_steps=steps, seed=0, output_type="np")
    allocator = counted_pipe.executor.engines.allocator
    count, free_before = allocator.allocations, cuda.memory_info()[0]
    for seed in range(20):
        counted_pipe(f"prompt {seed % 3}", num_inference_steps=1 + seed % 2, seed=seed, output_type="np")
    assert allocator.allocations == count
    assert cuda.memory_info()[0] == free_before


def test_no_device_allocation_per_image_onnxruntime_cuda(gpu_bundle):
    from turbo_trt.runner import cuda

    pipe = _cuda_pipe(gpu_bundle)
    for _ in range(3):
        pipe("warm", num_inference_steps=2, seed=0, output_type="np")
    free_before, _ = cuda.memory_info()
    for seed in range(20):
        pipe(f"prompt {seed % 3}", num_inference_steps=2, seed=seed, output_type="np")
    assert cuda.memory_info()[0] == free_before


class _FailingOnce:
    """An execution context whose next enqueue is refused (as TensorRT refuses a bad address or state)."""

    def __init__(self, context) -> None:
        self.context = context
        self.armed = True

    def execute_async_v3(self, stream) -> bool:
        if self.armed:
            self.armed = False
            return False
        return self.context.execute_async_v3(stream)

    def __getattr__(self, name):
        return getattr(self.context, name)


def test_injected_failure_leaves_executor_usable(gpu_bundle, trt_pipe):
    from turbo_trt.errors import ExecutionError
    from turbo_trt.runner.executors.tensorrt import TensorRTExecutor
    from turbo_trt.runner.pipeline import TurboPipeline

    pipe = TurboPipeline(trt_pipe.bundle, TensorRTExecutor(trt_pipe.executor.engines, use_graphs=False))
    want = pipe("a failing cat", num_inference_steps=2, seed=4, output_type="np")
    pipe.executor._lru.clear()
    key = "unet@1"
    pipe.executor.contexts[key] = _FailingOnce(pipe.executor.contexts[key])
    with pytest.raises(ExecutionError, match="unet@1") as info:
        pipe("a failing cat", num_inference_steps=2, seed=4, output_type="np")
    assert info.value.stage == "unet@1"
    assert pipe.executor.cache_stats()["entries"] == 0  # the failed run filled no prompt-cache slot
    np.testing.assert_array_equal(pipe("a failing cat", num_inference_steps=2, seed=4, output_type="np"), want)
    pipe.close()


def test_runtime_cache_written_beside_the_engines(gpu_bundle, trt_pipe):
    import os

    engines = trt_pipe.executor.engines
    if engines.cache is None:
        pytest.skip(f"{engines.flavor.name} has no runtime cache")
    trt_pipe("cache", num_inference_steps=1, seed=0, output_type="np")
    assert engines.save_runtime_cache() and engines.cache_file.stat().st_size > 0
    writes, inode = engines.cache_store.writes, os.stat(engines.cache_file).st_ino
    trt_pipe("cache", num_inference_steps=1, seed=0, output_type="np")  # nothing new to compile
    assert engines.save_runtime_cache() and engines.cache_store.writes == writes
    assert os.stat(engines.cache_file).st_ino == inode  # not rewritten


def test_auto_asked_tensorrt_rtx_for_engine_validity(gpu_bundle):
    """`auto` records TensorRT-RTX's get_engine_validity answer for this GPU, and chooses tensorrt only when
    every engine is VALID or SUBOPTIMAL (else it falls back and says why)."""
    from turbo_trt.manifest import read_manifest
    from turbo_trt.runner.executor_choice import choose_executor

    _need_tensorrt()
    if read_manifest(gpu_bundle)["engine"]["flavor"] != "tensorrt-rtx":
        pytest.skip("engine validity is TensorRT-RTX's")
    choice = choose_executor(gpu_bundle, strict_targets=False)
    note = choice.notes["tensorrt"]
    assert "get_engine_validity:" in note
    valid = all(word in ("VALID", "SUBOPTIMAL") for word in _validity_words(note))
    assert (choice.name == "tensorrt") == valid, choice.describe()
    if not valid:
        assert note in choice.passed_over["tensorrt"]


def _validity_words(note: str) -> list[str]:
    import re

    return re.findall(r"\b(VALID|SUBOPTIMAL|INVALID)\b", note.split(" (log:")[0])


def test_onnxruntime_cuda_sessions_use_heuristic_conv_search(gpu_bundle):
    """Read back from ONNX Runtime what each CUDA session runs with: cuDNN's heuristic algorithm choice."""
    pipe = _cuda_pipe(gpu_bundle)
    for name, session in pipe.executor.sessions.items():
        options = session.get_provider_options()["CUDAExecutionProvider"]
        assert options["cudnn_conv_algo_search"] == "HEURISTIC", (name, options)


def test_onnxruntime_cuda_upload_complete_before_run():
    """A 64 MiB pageable upload (`update_inplace`) read at once by a run on the session's own stream: the run
    always sees the whole new array (ONNX Runtime syncs after its cudaMemcpy; see the executor's docstring)."""
    import onnxruntime as ort

    from turbo_trt.runner.executors.onnxruntime_cuda import (
        cuda_unavailable_reason,
        probe_model,
        run_options,
        session_providers,
    )

    _executor_wanted("onnxruntime-cuda")
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(f"onnxruntime-cuda: {reason}")
    n = 16 << 20
    session = ort.InferenceSession(probe_model(n), providers=session_providers("cuda", graphs=False))
    x = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_ortvalue_output("y", y)
    for i in range(8):
        values = np.full(n, i + 1, np.float32)  # a fresh pageable array each time
        x.update_inplace(values)
        session.run_with_iobinding(binding, run_options(ort, None))
        np.testing.assert_array_equal(y.numpy(), 2 * values)


def test_prompt_cache_on_device(trt_pipe):
    first = trt_pipe("a lighthouse at dusk", num_inference_steps=1, seed=2, output_type="np")
    hits = trt_pipe.executor.cache_stats()["hits"]
    again = trt_pipe("a lighthouse at dusk", num_inference_steps=1, seed=2, output_type="np")
    assert trt_pipe.executor.cache_stats()["hits"] == hits + 1
    np.testing.assert_array_equal(first, again)


def test_forks_share_engines(trt_pipe):
    fork = trt_pipe.fork()
    assert fork.executor.engines is trt_pipe.executor.engines
    np.testing.assert_array_equal(fork("a cat", seed=3, output_type="np"), trt_pipe("a cat", seed=3, output_type="np"))


def test_forks_in_threads(gpu_pipes):
    import threading

    graphed, _ = gpu_pipes
    want = {i: graphed(f"thread {i}", num_inference_steps=2, seed=i, output_type="np") for i in range(4)}
    forks = [graphed.fork() for _ in range(3)]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(pipe, indices):
        try:
            for i in indices:
                got[i] = pipe(f"thread {i}", num_inference_steps=2, seed=i, output_type="np")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f, [n, (n + 1) % 4])) for n, f in enumerate([graphed, *forks])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a runner thread hung"
    assert not errors, errors
    assert sorted(got) == [0, 1, 2, 3]
    for i, image in got.items():
        np.testing.assert_array_equal(image, want[i])
    for f in forks:
        f.close()


def test_serving_warm_up_captures_every_graph(trt_pipe):
    """`turbo-trt serve` turns ready only after warm-up: with TensorRT, every plan's two graphs (with and
    without text encoders) are captured by then, so no request pays for a capture."""
    from turbo_trt.runner.schedule import all_plans
    from turbo_trt.runner.serving.batching import warm_up

    fork = trt_pipe.fork()
    try:
        warm_up(fork)
        stats = fork.executor.graph_stats()
        assert stats["graphs_captured"] == 2 * len(all_plans(fork.scheduler)) and stats["capture_failures"] == 0
    finally:
        fork.close()


def test_launch_then_wait_equals_run(trt_pipe):
    """The split launch / wait of frame streams: the same image as `run`, one launch in flight at a time, and
    the executor usable after each wait."""
    from turbo_trt.errors import ExecutionError
    from turbo_trt.runner.inputs import make_noise

    fork = trt_pipe.fork()
    try:
        executor = fork.executor
        image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
        for mode in ("txt2img", "img2img"):
            plan = fork.plan(2, 0.5 if mode == "img2img" else None)
            ids = fork.token_ids(["a launched cat"])
            noise = make_noise(7, (1, 4, 8, 8), mode == "img2img", 0)
            pixels = image if mode == "img2img" else None
            want, _ = executor.run(ids, plan, noise, pixels)
            launched = executor.launch(ids, plan, noise, pixels)
            with pytest.raises(ExecutionError, match="still in flight"):
                executor.launch(ids, plan, noise, pixels)
            with pytest.raises(ExecutionError, match="still in flight"):
                executor.run(ids, plan, noise, pixels)
            got, nonfinite = executor.wait(launched)
            assert nonfinite == 0
            np.testing.assert_array_equal(got, want)
            with pytest.raises(ExecutionError, match="not have in flight"):
                executor.wait(launched)
            np.testing.assert_array_equal(executor.run(ids, plan, noise, pixels)[0], want)
    finally:
        fork.close()


def test_close_with_a_launch_in_flight_returns(trt_pipe):
    """close() while a launch holds the engines' shared lock: it synchronizes, releases the launch's lock and
    only then saves the runtime cache (which takes the lock exclusively), so it returns instead of deadlocking;
    a second call before wait() raises at once instead of blocking behind the lock."""
    import threading

    from turbo_trt.errors import ExecutionError
    from turbo_trt.runner.inputs import make_noise

    fork = trt_pipe.fork()
    executor = fork.executor
    plan, ids = fork.plan(1, None), fork.token_ids(["an unfinished cat"])
    executor.launch(ids, plan, make_noise(1, (1, 4, 8, 8), False, 0), None)
    with pytest.raises(ExecutionError, match="still in flight"):
        executor.prepare(plan)
    closer = threading.Thread(target=fork.close, daemon=True)
    closer.start()
    closer.join(timeout=60)
    assert not closer.is_alive(), "close() deadlocked with a launch in flight"
    assert executor.stream is None


def test_stream_on_tensorrt_equals_direct_calls(trt_pipe):
    frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with trt_pipe.stream("a streamed cat", steps=2, strength=0.5, seed=3) as stream:
        stream.push(frame)
        result = stream.get(timeout=60)
        assert result is not None and not result.skipped
        np.testing.assert_array_equal(result.image, trt_pipe("a streamed cat", image=frame, strength=0.5,
                                                             num_inference_steps=2, seed=3, output_type="np")[0])
        stream.push(prompt="a streamed dog")
        result = stream.get(timeout=60)
        assert result is not None
        np.testing.assert_array_equal(result.image, trt_pipe("a streamed dog", num_inference_steps=2, seed=3,
                                                             output_type="np")[0])


def test_prompt_following_on_gpu_executors(gpu_pipes):
    """The trained tiny preset draws what it is told on every GPU executor, as on the CPU
    (tests/test_prompt_following.py): the image-only score on the held-back prompts at 1 step."""
    from turbo_trt.benchmarks.prompt_following import floor_for, score_pipeline
    from turbo_trt.builder import prompt_score, shape_prompts

    summary = prompt_score.summarize(score_pipeline(gpu_pipes[0], shape_prompts.heldback_scenes(None), steps=1))
    assert summary["all"] >= floor_for("tiny-sd-turbo"), summary
