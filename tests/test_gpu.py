"""Tier 2: the TensorRT executor on a real NVIDIA GPU (skipped without one).

Builds the tiny SD bundle on this GPU with the installed flavor, then checks: TensorRT output against the
ONNX Runtime executor, CUDA-graph replay against plain enqueue (bit for bit), no device allocation per
image, the prompt cache, and forks sharing one set of engines.
"""

from __future__ import annotations

import numpy as np
import pytest

from turbo_trt.flavors import installed_flavors
from turbo_trt.gpu import current_gpu

from .conftest import quiet_build, tiny_options

pytestmark = pytest.mark.gpu

if current_gpu() is None or not installed_flavors():
    pytest.skip("needs an NVIDIA GPU and TensorRT or TensorRT-RTX", allow_module_level=True)


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "tiny-sd-turbo"
    quiet_build(tiny_options("tiny-sd-turbo", out, flavor=installed_flavors()[0]))
    return out


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

    return TurboPipeline.from_bundle(gpu_bundle, executor="tensorrt", strict_targets=_strict(gpu_bundle))


def test_tensorrt_matches_onnxruntime(gpu_bundle, trt_pipe):
    from turbo_trt.runner import TurboPipeline

    ort_pipe = TurboPipeline.from_bundle(gpu_bundle, executor="onnxruntime")
    for steps in (1, 4):
        ours = trt_pipe("a photo of a cat", num_inference_steps=steps, seed=5, output_type="np")
        ref = ort_pipe("a photo of a cat", num_inference_steps=steps, seed=5, output_type="np")
        diff = np.abs(ours.astype(int) - ref.astype(int))
        # Both run the same FP16 graphs; TensorRT's kernels round differently from ONNX Runtime's CPU ones.
        assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = trt_pipe("a cat", image=image, strength=0.5, num_inference_steps=2, seed=1, output_type="np")
    ref = ort_pipe("a cat", image=image, strength=0.5, num_inference_steps=2, seed=1, output_type="np")
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 3


def test_graph_replay_equals_plain_enqueue(gpu_bundle, trt_pipe):
    from turbo_trt.runner.executors.tensorrt import TensorRTExecutor
    from turbo_trt.runner.pipeline import TurboPipeline

    eager = TurboPipeline(trt_pipe.bundle, TensorRTExecutor(trt_pipe.executor.engines, use_graphs=False))
    for steps in (1, 2, 4):
        graphed = trt_pipe("a red boat", num_inference_steps=steps, seed=9, output_type="np")
        plain = eager("a red boat", num_inference_steps=steps, seed=9, output_type="np")
        np.testing.assert_array_equal(graphed, plain)
    captured, failed = trt_pipe.executor.graph_counts()
    assert captured > 0 and failed == 0


def test_no_device_allocation_per_image(trt_pipe):
    from turbo_trt.runner import cuda

    trt_pipe("warm", num_inference_steps=2, seed=0, output_type="np")  # capture happens here
    trt_pipe("warm", num_inference_steps=2, seed=0, output_type="np")  # and the cached-prompt variant
    free_before, _ = cuda.memory_info()
    for seed in range(20):
        trt_pipe(f"prompt {seed % 3}", num_inference_steps=2, seed=seed, output_type="np")
    free_after, _ = cuda.memory_info()
    assert free_after == free_before


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
