"""Which executor runs a bundle here, and why the others were passed over.

`auto` takes the first that can run: TensorRT (the bundle's engines, its flavor installed, a GPU among the
engines' targets), then ONNX Runtime CUDA (the GPU build of onnxruntime and a GPU), then ONNX Runtime on
the CPU, which always can. Each one passed over gets a reason in plain words, which `generate` and `bench`
print, so a user sees at once why, say, a TensorRT-RTX bundle on an H100 ran on ONNX Runtime CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from turbo_trt.errors import TurboTrtError

EXECUTORS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime")


@dataclass(frozen=True)
class ExecutorChoice:
    name: str
    passed_over: dict[str, str] = field(default_factory=dict)  # executor -> why it was not chosen

    def describe(self) -> str:
        text = f"executor: {self.name}"
        if self.passed_over:
            text += "; passed over: " + "; ".join(f"{name} ({why})" for name, why in self.passed_over.items())
        return text


def tensorrt_unavailable_reason(path: Path, strict_targets: bool = True) -> str | None:
    """Why the bundle's TensorRT engines cannot run here, or None when they can."""
    from turbo_trt.flavors import installed_flavors
    from turbo_trt.gpu import current_gpu
    from turbo_trt.manifest import read_manifest

    from .bundle import Bundle, check_engine_compatibility

    manifest = read_manifest(path)
    engine = manifest.get("engine") or {}
    if not all("engine" in entry for entry in manifest["components"].values()):
        return "the bundle has no engines (built with --onnx-only)"
    flavor = engine.get("flavor")
    if flavor not in installed_flavors():
        return f"{flavor} is not installed"
    gpu = current_gpu()
    if gpu is None:
        return "no NVIDIA GPU is visible"
    from turbo_trt.flavors import load_flavor

    try:
        loaded = load_flavor(flavor)
        check_engine_compatibility(Bundle(path, manifest), loaded.name, loaded.version, gpu, strict_targets)
    except TurboTrtError as exc:
        return str(exc)
    return None


def choose_executor(path: Path | str, strict_targets: bool = True) -> ExecutorChoice:
    from .bundle import require_bundle_dir
    from .executors.onnxruntime_cuda import cuda_unavailable_reason

    root = require_bundle_dir(path)
    passed: dict[str, str] = {}
    reason = tensorrt_unavailable_reason(root, strict_targets)
    if reason is None:
        return ExecutorChoice("tensorrt")
    passed["tensorrt"] = reason
    reason = cuda_unavailable_reason()
    if reason is None:
        return ExecutorChoice("onnxruntime-cuda", passed)
    passed["onnxruntime-cuda"] = reason
    return ExecutorChoice("onnxruntime", passed)
