"""Which NVIDIA GPU is here, without torch: cuda-python if installed, else nvidia-smi, else none."""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any


@functools.lru_cache(maxsize=1)
def current_gpu() -> dict[str, Any] | None:
    """{"name", "compute_capability": "9.0", "driver"} of device 0, or None when there is no usable GPU."""
    info = _from_cuda_python() or _from_nvidia_smi()
    return info


def _from_cuda_python() -> dict[str, Any] | None:
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found]
    except Exception:
        return None
    try:
        err, count = runtime.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, props = runtime.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
        err, driver = runtime.cudaDriverGetVersion()
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name, "compute_capability": f"{props.major}.{props.minor}",
                "driver": f"cuda {driver // 1000}.{driver % 1000 // 10}" if int(err) == 0 else None}
    except Exception:
        return None


def _from_nvidia_smi() -> dict[str, Any] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, cap, driver = (field.strip() for field in out[0].split(",")[:3])
    return {"name": name, "compute_capability": cap, "driver": driver}
