"""The onnxruntime-cuda executor's bindings, and executor choice, on a machine without a GPU.

With device="cpu" the executor makes the same once-only IO bindings (one per UNet step position, one VAE
encoder binding per number of UNet runs) on the CPU provider, so its dataflow is checked against the plain
ONNX Runtime executor bit for bit: both run the same sessions on the same inputs. On the GPU the same code
runs with CUDA OrtValues and graphs (tests/test_gpu.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from turbo_trt.errors import ExecutorUnavailable
from turbo_trt.runner.executors.onnxruntime import OnnxRuntimeExecutor
from turbo_trt.runner.executors.onnxruntime_cuda import OnnxRuntimeCudaExecutor, cuda_unavailable_reason
from turbo_trt.runner.pipeline import TurboPipeline

from .conftest import VARIANTS, bundle_variant
from .test_tensorrt_layout import CASES

pytestmark = pytest.mark.skipif(cuda_unavailable_reason() is None, reason="a GPU is here: tests/test_gpu.py covers it")


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, sd_bundle, sdxl_bundle):
    bundle = bundle_variant(request.param, sd_bundle, sdxl_bundle)
    reference = OnnxRuntimeExecutor(bundle, cache_size=0)
    ours = OnnxRuntimeCudaExecutor(bundle, cache_size=2, device="cpu", sessions=reference.sessions)
    return TurboPipeline(bundle, reference), TurboPipeline(bundle, ours)


@pytest.mark.parametrize("steps,strength", CASES)
def test_bindings_match_onnxruntime_executor(pair, steps, strength):
    reference, ours = pair
    image = None
    if strength is not None:
        shape = (ours.shapes["height"], ours.shapes["width"], 3)
        image = np.random.default_rng(steps).integers(0, 256, shape, dtype=np.uint8)
    kwargs = dict(num_inference_steps=steps, seed=steps * 11, output_type="np")
    if image is not None:
        kwargs.update(image=image, strength=strength)
    want = reference("a lighthouse at dusk", **kwargs)
    ours.executor.invalidate_prompt_cache()
    np.testing.assert_array_equal(ours("a lighthouse at dusk", **kwargs), want)
    other = ours("a red cat on a green sofa", **kwargs)  # overwrites the live embeddings
    np.testing.assert_array_equal(other, reference("a red cat on a green sofa", **kwargs))
    # the first prompt again: embeddings come back from the cache, and give the first image
    hits = ours.executor.cache_stats()["hits"]
    np.testing.assert_array_equal(ours("a lighthouse at dusk", **kwargs), want)
    assert ours.executor.cache_stats()["hits"] == hits + 1


def test_fork_has_its_own_buffers(pair):
    reference, ours = pair
    fork = ours.fork()
    assert fork.executor.latents[0] is not ours.executor.latents[0]
    a = fork("a red boat", num_inference_steps=2, seed=3, output_type="np")
    np.testing.assert_array_equal(a, reference("a red boat", num_inference_steps=2, seed=3, output_type="np"))


def test_asking_for_cuda_without_it_names_what_is_missing(sd_bundle):
    reason = cuda_unavailable_reason()
    assert reason and ("CUDAExecutionProvider" in reason or "GPU" in reason)
    with pytest.raises(ExecutorUnavailable, match="onnxruntime-cuda executor cannot run") as info:
        TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime-cuda")
    assert reason in str(info.value)


def test_auto_says_why_each_gpu_executor_was_passed_over(sd_bundle, capsys):
    from turbo_trt.cli import main

    pipe = TurboPipeline.from_bundle(sd_bundle[0])
    choice = pipe.executor_choice
    assert choice.name == "onnxruntime" and pipe.executor.name == "onnxruntime"
    assert set(choice.passed_over) == {"tensorrt", "onnxruntime-cuda"}
    assert "GPU" in choice.passed_over["tensorrt"]  # the engines exist and TensorRT-RTX is installed
    assert choice.passed_over["onnxruntime-cuda"] == cuda_unavailable_reason()
    out = sd_bundle[0].parent / "auto.png"
    assert main(["generate", "--engines", str(sd_bundle[0]), "--prompt", "a cat", "--seed", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "executor: onnxruntime; passed over: tensorrt (" in err and "onnxruntime-cuda (" in err
