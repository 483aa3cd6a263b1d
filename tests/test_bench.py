"""`turbo-trt bench`: statistics and FLOP math on known inputs, and the report path on a tiny bundle
(CPU mode with the ONNX Runtime executor). No timed asserts: numbers are checked for shape, not speed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from turbo_trt.benchmarks.flops import graph_flops, node_flops
from turbo_trt.benchmarks.stats import summarize


def test_summary_statistics_on_known_samples():
    s = summarize([0.001, 0.002, 0.003, 0.004])  # seconds in, milliseconds out
    assert s["n"] == 4
    assert s["mean_ms"] == pytest.approx(2.5)
    assert s["p50_ms"] == pytest.approx(2.5)  # linear interpolation between 2 and 3
    assert s["p90_ms"] == pytest.approx(3.7)
    assert s["p99_ms"] == pytest.approx(3.97)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(4.0)
    assert s["stdev_ms"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert summarize([0.005])["stdev_ms"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_node_flops_formulas():
    # Conv: (1, 8, 16, 16) output, 3x3 kernel over 4 input channels -> 2 * 2048 * 4 * 9
    assert node_flops("Conv", [[1, 4, 16, 16], [8, 4, 3, 3]], [[1, 8, 16, 16]], {}) == 2 * 2048 * 36
    # Grouped conv: weight (8, 2, 3, 3) with group=2: 2 input channels per output
    assert node_flops("Conv", [[1, 4, 16, 16], [8, 2, 3, 3]], [[1, 8, 16, 16]], {"group": 2}) == 2 * 2048 * 18
    # Batched MatMul (2, 3, 5) @ (5, 7): 2 * 2*3*7 outputs * 5
    assert node_flops("MatMul", [[2, 3, 5], [5, 7]], [[2, 3, 7]], {}) == 2 * 42 * 5
    assert node_flops("Gemm", [[5, 3], [5, 4]], [[3, 4]], {"transA": 1}) == 2 * 12 * 5
    assert node_flops("Relu", [[1, 10]], [[1, 10]], {}) == 0


def test_graph_flops_counts_a_real_onnx_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w_conv = numpy_helper.from_array(np.zeros((8, 4, 3, 3), np.float32), "w_conv")
    w_mm = numpy_helper.from_array(np.zeros((16, 10), np.float32), "w_mm")
    shape = numpy_helper.from_array(np.array([1, 8, 256], np.int64), "shape")
    w_mm2 = numpy_helper.from_array(np.zeros((256, 16), np.float32), "w_mm2")
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_mm2"], ["m"]),
        helper.make_node("MatMul", ["m", "w_mm"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10])],
                              [w_conv, w_mm, shape, w_mm2])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    expected = 2 * (8 * 16 * 16) * (4 * 9) + 2 * (8 * 16) * 256 + 2 * (8 * 10) * 16
    assert graph_flops(path) == expected


def test_bench_report_on_tiny_bundle(sd_bundle, tmp_path):
    from PIL import Image

    json_path, report, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    done = subprocess.run(
        [sys.executable, "-m", "turbo_trt.cli", "bench", "--engines", str(sd_bundle[0]), "--iterations", "4",
         "--warmup", "1", "--parallel", "2", "--steps", "2", "--json", str(json_path), "--report", str(report),
         "--plot", str(png)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(json_path.read_text())
    assert result["schema"] == "turbo-trt-bench/1"
    assert result["executor"] == "onnxruntime" and result["device"] == "CPU"
    for key in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "stdev_ms"):
        assert result["latency"][key] > 0 and result["latency_cached_prompt"][key] >= 0
    assert len(result["samples_ms"]) == 4
    assert list(result["stages"]) == ["text_encoder", "unet[0]", "unet[1]", "vae_decoder"]
    assert set(result["cold_start"]) >= {"verify_s", "deserialize_s", "allocate_s", "capture_s", "first_run_s"}
    assert [t["runners"] for t in result["throughput"]] == [1, 2]
    assert result["flops"]["per_image_gflop"]["unet"] > 0
    assert result["flops"]["stages"]["unet[1]"]["achieved_tflops"] > 0
    assert result["flops"]["peak_tflops"] is None  # no CPU peak is claimed
    (baseline,) = result["baselines"]
    assert baseline["name"] == "diffusers eager" and baseline["precision"] == "fp32" and baseline["speedup_p50"] > 0
    for section in result["environment"]["versions"], result["environment"]["machine"]:
        assert section
    text = report.read_text()
    assert "| end-to-end (text encoder every call) |" in text and "diffusers eager" in text
    assert "## Stages" in text and "unet[1]" in text
    assert result["checks"] == {"kind": "CPU run: ONNX Runtime executor, no CUDA graphs to check"}
    assert result["executor_choice"]["name"] == "onnxruntime"
    assert set(result["executor_choice"]["passed_over"]) == {"tensorrt", "onnxruntime-cuda"}
    assert result["load_host_peak_rss_mib"] > 0
    assert result["device_memory"] is None and result["cold_start_runtime_cache"] is None  # TensorRT only
    assert "tensorrt passed over:" in text and "peak host RSS while loading" in text
    assert "## Checks" in text and "no CUDA graphs to check" in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400
    assert "speedup vs diffusers eager" in done.stdout


def test_quick_bench_uses_one_runner(sd_bundle):
    """--quick (the GPU kit's mode): throughput with the main runner only, and the setting recorded."""
    from turbo_trt.benchmarks.bench import BenchOptions, run_bench

    seen: list[tuple[str, bool, int]] = []
    result = run_bench(BenchOptions(engines=sd_bundle[0], iterations=8, warmup=0, parallel=3, baselines=(),
                                    quick=True), log=lambda message: None,
                       partial=lambda r: seen.append((r["stage"], r["complete"], len(json.dumps(r)))))
    # the partial results grow stage by stage (bench --json rewrites its file each time), complete only at the end
    assert [s[0] for s in seen] == ["load", "timing", "checks", "stages", "throughput"] and not any(s[1] for s in seen)
    assert all(a[2] < b[2] for a, b in zip(seen, seen[1:])) and result["complete"] is True
    assert all(stage["n"] == 3 for stage in result["stages"].values())  # quick: 3 per-stage passes, not 8 // 2
    assert [t["runners"] for t in result["throughput"]] == [1]
    assert result["settings"]["quick"] is True and result["settings"]["parallel"] == 1
    assert len(result["samples_ms"]) == 8


def test_check_lines_say_when_graph_replay_differs():
    from turbo_trt.benchmarks.report import check_lines

    lines = check_lines({"graphs_captured": 2, "graph_capture_failed": 0, "plain_enqueue_fallbacks": 1,
                         "device_bytes_allocated_during_timed_images": 0, "tensorrt_allocations_during_timed_images": 0,
                         "graph_vs_plain_enqueue": {"txt2img": {"bit_equal": True, "max_abs_diff": 0},
                                                    "img2img": {"bit_equal": False, "max_abs_diff": 3}}})
    assert lines == ["- CUDA graphs captured: 2 (capture failed: 0; images run with plain enqueues instead: 1)",
                     "- device bytes allocated during the timed images: 0",
                     "- allocations TensorRT asked its allocator for during the timed images: 0",
                     "- txt2img: graph replay equals plain enqueue (max abs diff 0)",
                     "- img2img: graph replay DIFFERS from plain enqueue (max abs diff 3)"]


def test_bench_rejects_bad_settings(sd_bundle):
    done = subprocess.run([sys.executable, "-m", "turbo_trt.cli", "bench", "--engines", str(sd_bundle[0]),
                           "--iterations", "1"], capture_output=True, text=True)
    assert done.returncode == 2 and "--iterations" in done.stderr
