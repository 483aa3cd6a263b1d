"""Where a measurement came from: machine, GPU, package versions and commit (for every results file)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("turbo-trt", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime",
            "tensorrt", "tensorrt-rtx-cu13", "tensorrt-rtx", "numpy", "cuda-bindings")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_commit(root: Path | None = None) -> str | None:
    """HEAD (with -dirty for uncommitted changes); where the tree has no .git (the GPU lease machine),
    TURBO_TRT_COMMIT, which the GPU kit sets from the commit it was packed from."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=root or Path(__file__).resolve().parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=root or Path(__file__).resolve().parent).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TURBO_TRT_COMMIT") or None


def environment() -> dict[str, Any]:
    from turbo_trt.gpu import current_gpu

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return {
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
                    "python": platform.python_version(), "os": platform.platform()},
        "gpu": current_gpu(),
        "versions": versions,
        "commit": git_commit(),
    }


def write_results(result: dict[str, Any], json_path: Path | None, report_path: Path | None,
                  markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write a run's JSON (when `json_path`) and markdown report (when `report_path`), each atomically, and
    print the report."""
    from turbo_trt.fsutil import atomic_write_bytes

    if json_path is not None:
        atomic_write_bytes(json_path, (json.dumps(result, indent=2) + "\n").encode())
    text = markdown(result)
    if report_path is not None:
        atomic_write_bytes(report_path, text.encode())
    print(text)
