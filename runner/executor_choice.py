"""Which executor runs a bundle here, and why the others were passed over.

`auto` takes the first that can run: TensorRT (the bundle's engines, its flavor installed, a GPU among the
engines' targets, and for TensorRT-RTX bundles every engine VALID or SUBOPTIMAL by TensorRT-RTX's own header
check, `IRuntime.get_engine_validity`, whose answer is kept in the choice either way), then ONNX Runtime
CUDA (the GPU build of onnxruntime and a GPU: a real Conv + MatMul session on its provider, run once), then
ONNX Runtime on the CPU, which always can. Each one passed over gets a reason in plain words, which `generate` and `bench`
print, so a user sees at once why, say, a TensorRT-RTX bundle on an H100 ran on ONNX Runtime CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turbo_trt.errors import TurboTrtError

EXECUTORS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime")


@dataclass(frozen=True)
class ExecutorChoice:
    name: str
    passed_over: dict[str, str] = field(default_factory=dict)  # executor -> why it was not chosen
    notes: dict[str, str] = field(default_factory=dict)  # executor -> what was asked on the way (engine validity)

    def describe(self) -> str:
        text = f"executor: {self.name}"
        if self.notes.get(self.name):
            text += f" ({self.notes[self.name]})"
        if self.passed_over:
            text += "; passed over: " + "; ".join(f"{name} ({why})" for name, why in self.passed_over.items())
        return text


def _recording_logger(trt: Any) -> Any:
    """An ILogger that keeps every message (TensorRT-RTX says why a validity check failed only in its log)."""

    class _Recorder(trt.ILogger):  # type: ignore[misc, name-defined]
        """Keeps WARNING, ERROR and INTERNAL_ERROR messages (INFO and VERBOSE would bury the answer), at most
        MAX_MESSAGES of them, each cut to MAX_MESSAGE characters."""

        MAX_MESSAGES, MAX_MESSAGE = 20, 500

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) > int(trt.ILogger.Severity.WARNING) or len(self.messages) >= self.MAX_MESSAGES:
                return
            text = str(msg).strip()
            self.messages.append(text if len(text) <= self.MAX_MESSAGE else text[: self.MAX_MESSAGE] + " [...]")

    return _Recorder()


def engine_validity(path: Path, manifest: dict[str, Any], flavor: Any) -> tuple[bool, str]:
    """TensorRT-RTX's answer for the bundle's engines on this machine: (all VALID or SUBOPTIMAL, the answer
    in words). `IRuntime.get_engine_validity` reads only each plan's header (`engine_header_size` bytes) and
    answers VALID / SUBOPTIMAL / INVALID with diagnostic flags (unsupported compute capability, old driver,
    version mismatch, ...); what TensorRT-RTX logged meanwhile is quoted too."""
    trt = flavor.trt
    logger = _recording_logger(trt)
    runtime = trt.Runtime(logger)
    size = int(runtime.engine_header_size)
    flags = {int(v): name for name, v in trt.EngineInvalidityDiagnostics.__members__.items()}
    answers: dict[str, list[str]] = {}
    runs = True
    for name, entry in manifest["components"].items():
        with open(path / entry["engine"], "rb") as handle:
            validity, diagnostics = runtime.get_engine_validity(handle.read(size))
        word = getattr(validity, "name", str(validity))
        runs = runs and word in ("VALID", "SUBOPTIMAL")
        named = [flag for bit, flag in flags.items() if int(diagnostics) & bit]
        answers.setdefault(f"{word}" + (f" ({', '.join(named)})" if named else ""), []).append(name)
    text = f"{flavor.name} {flavor.version} get_engine_validity: " + "; ".join(
        f"{answer} for {', '.join(names)}" for answer, names in answers.items())
    if logger.messages:
        text += " (log: " + " | ".join(dict.fromkeys(logger.messages)) + ")"
    return runs, text


def tensorrt_check(path: Path, strict_targets: bool = True) -> tuple[str | None, str | None]:
    """(why the bundle's TensorRT engines cannot run here or None, TensorRT-RTX's validity answer or None)."""
    from turbo_trt.flavors import installed_flavors
    from turbo_trt.gpu import current_gpu
    from turbo_trt.manifest import read_manifest

    from .bundle import Bundle, check_engine_compatibility

    manifest = read_manifest(path)
    engine = manifest.get("engine") or {}
    if not all("engine" in entry for entry in manifest["components"].values()):
        return "the bundle has no engines (built with --onnx-only)", None
    flavor = engine.get("flavor")
    if flavor not in installed_flavors():
        return f"{flavor} is not installed", None
    from turbo_trt.flavors import load_flavor

    loaded = load_flavor(flavor)
    note = None
    gpu = current_gpu()
    if hasattr(getattr(loaded.trt, "Runtime", None), "get_engine_validity"):  # TensorRT-RTX
        try:
            runs, note = engine_validity(path, manifest, loaded)
        except Exception as exc:  # an unreadable plan, or a runtime that cannot even start
            runs, note = False, f"{loaded.name} {loaded.version} get_engine_validity failed: {type(exc).__name__}: {exc}"
        if not runs:
            return (note if gpu is not None else f"no NVIDIA GPU is visible; {note}"), note
    if gpu is None:
        return "no NVIDIA GPU is visible", note
    try:
        check_engine_compatibility(Bundle(path, manifest), loaded.name, loaded.version, gpu, strict_targets)
    except TurboTrtError as exc:
        return str(exc), note
    return None, note


def tensorrt_unavailable_reason(path: Path, strict_targets: bool = True) -> str | None:
    """Why the bundle's TensorRT engines cannot run here, or None when they can."""
    return tensorrt_check(path, strict_targets)[0]


def choose_executor(path: Path | str, strict_targets: bool = True) -> ExecutorChoice:
    from .bundle import require_bundle_dir
    from .executors.onnxruntime_cuda import cuda_unavailable_reason

    root = require_bundle_dir(path)
    passed: dict[str, str] = {}
    reason, validity = tensorrt_check(root, strict_targets)
    notes = {"tensorrt": validity} if validity else {}
    if reason is None:
        return ExecutorChoice("tensorrt", notes=notes)
    passed["tensorrt"] = reason
    reason = cuda_unavailable_reason()
    if reason is None:
        return ExecutorChoice("onnxruntime-cuda", passed, notes)
    passed["onnxruntime-cuda"] = reason
    return ExecutorChoice("onnxruntime", passed, notes)
