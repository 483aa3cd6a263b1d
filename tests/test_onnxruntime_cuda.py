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
from turbo_trt.runner.executors.onnxruntime_cuda import (
    CUDA_PROVIDER,
    OnnxRuntimeCudaExecutor,
    check_inputs,
    check_model,
    cuda_unavailable_reason,
    probe_model,
    run_options,
    session_providers,
)
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


def test_cuda_reason_is_what_a_real_session_said():
    """The reason comes from a Conv + MatMul session that asked for the CUDA provider and ran once (cuDNN and
    cuBLAS load at the first run): ONNX Runtime's own words (here, the CPU build's "not in available provider
    names") and the providers the session ran on."""
    import onnx
    import onnxruntime as ort

    reason = cuda_unavailable_reason()
    assert reason is not None and "Conv + MatMul session asking for CUDAExecutionProvider, run once" in reason
    assert "ran on CPUExecutionProvider" in reason or "failed (" in reason, reason
    if CUDA_PROVIDER not in ort.get_available_providers():
        assert "is not in available provider names" in reason, reason  # ONNX Runtime's warning, word for word
    else:  # a GPU build without usable CUDA libraries or GPU: the loader's or the driver's words
        assert "loading libonnxruntime_providers_cuda.so fails" in reason or "no NVIDIA GPU" in reason, reason
    session = ort.InferenceSession(probe_model(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], 2 * x)  # the hand-written models are valid
    check = ort.InferenceSession(check_model(), providers=["CPUExecutionProvider"])
    assert {n.op_type for n in onnx.load_from_string(check_model()).graph.node} == {"Conv", "MatMul"}
    inputs = check_inputs()
    np.testing.assert_array_equal(check.run(None, inputs)[0], 2 * inputs["x"])


def test_cuda_sessions_search_convolutions_deterministically(pair):
    """Every CUDA session asks cuDNN for its heuristic algorithm (not the timed EXHAUSTIVE default), with
    and without graphs; the CPU twin's real sessions were created from the same function."""
    for graphs in (True, False):
        (name, options), = session_providers("cuda", graphs)
        assert name == CUDA_PROVIDER and options["cudnn_conv_algo_search"] == "HEURISTIC"
        assert options["enable_cuda_graph"] == ("1" if graphs else "0")
    _, ours = pair
    assert [s.get_providers() for s in ours.executor.sessions.values()] == \
        [session_providers("cpu", False)] * len(ours.executor.sessions)


def test_every_run_waits_for_its_stream():
    """Runs keep ONNX Runtime's end-of-run stream sync (the next in-place upload must not overwrite an input a
    kernel still reads); the graph id is set only with graphs."""
    import onnxruntime as ort

    for graph_id in (None, 3):
        options = run_options(ort, graph_id)
        assert options.get_run_config_entry("disable_synchronize_execution_providers") == "0"
        if graph_id is None:
            with pytest.raises(RuntimeError, match="gpu_graph_id"):
                options.get_run_config_entry("gpu_graph_id")
        else:
            assert options.get_run_config_entry("gpu_graph_id") == "3"


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
    # TensorRT-RTX was asked (a real get_engine_validity on each plan header): without a GPU it answers INVALID
    assert "get_engine_validity: INVALID for text_encoder, unet" in choice.passed_over["tensorrt"]
    assert choice.notes["tensorrt"] in choice.passed_over["tensorrt"]
    assert choice.passed_over["onnxruntime-cuda"] == cuda_unavailable_reason()
    out = sd_bundle[0].parent / "auto.png"
    assert main(["generate", "--engines", str(sd_bundle[0]), "--prompt", "a cat", "--seed", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "executor: onnxruntime; passed over: tensorrt (" in err and "onnxruntime-cuda (" in err


def test_engine_validity_names_each_engine_and_flag(sd_bundle, tmp_path):
    """TensorRT-RTX's header check per engine: a plan whose header is damaged is MALFORMED_ENGINE, the
    others keep their own answer; what TensorRT-RTX logged is quoted."""
    import shutil

    from turbo_trt.flavors import load_flavor
    from turbo_trt.manifest import read_manifest
    from turbo_trt.runner.executor_choice import engine_validity

    bundle = tmp_path / "damaged"
    shutil.copytree(sd_bundle[0], bundle, ignore=shutil.ignore_patterns("*.lock", "onnx"))
    manifest = read_manifest(bundle)
    plan = bundle / manifest["components"]["unet"]["engine"]
    plan.write_bytes(b"\0" * 4096 + plan.read_bytes()[4096:])
    runs, text = engine_validity(bundle, manifest, load_flavor("tensorrt-rtx"))
    assert not runs
    assert "INVALID (MALFORMED_ENGINE) for unet" in text and "for text_encoder, vae_decoder" in text, text


def test_gpu_build_without_cuda_libraries_names_the_missing_library(tmp_path):
    """The defect's own case: onnxruntime-gpu in a site folder of its own, no CUDA libraries beside it or on
    LD_LIBRARY_PATH. The reason quotes the loader's error for the CUDA provider library (a missing cuBLAS),
    not a generic line. Needs the onnxruntime-gpu wheel for this Python in the GPU kit's wheel cache
    (benchmarks/gpu/prepare.sh fetches the GPU machine's; `pip download --no-deps onnxruntime-gpu==1.31.1
    -d ~/.cache/turbo-trt/gpu-kit/wheels` fetches this one)."""
    import os
    import subprocess
    import sys
    import zipfile

    from turbo_trt.benchmarks.gpu_kit import CACHE

    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted((CACHE / "wheels").glob(f"onnxruntime_gpu-*-{tag}-{tag}-*.whl"))
    if not wheels:
        pytest.skip(f"no onnxruntime-gpu wheel for {tag} in {CACHE / 'wheels'} (fetch one to run this test)")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(site, [n for n in wheel.namelist() if n.startswith("onnxruntime/")])
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = str(site)
    code = (f"import onnxruntime as o; assert o.__file__.startswith({str(site)!r}), o.__file__\n"
            "from turbo_trt.runner.executors.onnxruntime_cuda import cuda_unavailable_reason as r; print(r())")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reason = done.stdout
    assert "ran on CPUExecutionProvider" in reason
    assert "loading libonnxruntime_providers_cuda.so fails: libcublas" in reason, reason  # the loader's words
    assert "Failed to load library" in reason and "cannot open shared object file" in reason  # ONNX Runtime's log
