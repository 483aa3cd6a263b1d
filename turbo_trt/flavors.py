"""The one place that knows the two TensorRT flavors apart.

`tensorrt` (TensorRT 10.x/11.x) and `tensorrt_rtx` (TensorRT for RTX) share the Builder / OnnxParser /
Runtime / IExecutionContext API. What differs: the module name, whether the STRONGLY_TYPED flag must be
passed (TensorRT 10.x; RTX and 11.x are always strongly typed), whether engines are built on the target
GPU (tensorrt) or ahead of time for a list of compute capabilities (RTX, which can build without a GPU),
and whether a timing cache applies (tensorrt only; RTX does not time kernels at build time).
This module imports neither flavor at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import FlavorError

FLAVORS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
#: Compute capabilities TensorRT-RTX 1.x can target (its ComputeCapability enum, without NONE/CURRENT).
RTX_TARGETS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
#: What an engine built with no capability set runs on (TensorRT-RTX docs: "8.0, 8.6, 8.9, 12.0, and
#: later"; Turing needs an explicit 7.5). Setting capabilities explicitly made TensorRT-RTX 1.7 fail on the
#: UNet (Myelin "empty runtime-fusion MVMF"), so the default build sets none.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0", "12.1")


@dataclass(frozen=True)
class Flavor:
    name: str
    trt: Any  # the imported module (typed as Any: the two modules' stubs differ)

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    @property
    def ahead_of_time(self) -> bool:
        """True when engines are compiled for a list of target capabilities rather than the local GPU."""
        return self.name == "tensorrt-rtx"

    @property
    def uses_timing_cache(self) -> bool:
        return self.name == "tensorrt"

    def network_flags(self) -> int:
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    def compute_capability_enum(self, target: str) -> Any:
        member = "CURRENT" if target == "current" else "SM" + target.replace(".", "")
        try:
            return getattr(self.trt.ComputeCapability, member)
        except AttributeError:
            raise FlavorError(
                f"{self.name} {self.version} cannot target compute capability {target}; "
                f"choose from {', '.join(RTX_TARGETS)}"
            ) from None


def _installed(name: str) -> bool:
    """A real install has an __init__.py; `tensorrt-stubs` leaves a bare `tensorrt/` folder of .pyi
    files that Python would import as an empty namespace package, so it does not count."""
    spec = importlib.util.find_spec(_MODULES[name])
    return spec is not None and spec.origin is not None


def installed_flavors() -> list[str]:
    return [name for name in FLAVORS if _installed(name)]


def _import(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def load_flavor(name: str | None = None) -> Flavor:
    """The named flavor, or the first installed one (`tensorrt` first). Raises FlavorError if absent."""
    if name is not None and name not in FLAVORS:
        raise FlavorError(f"unknown engine flavor {name!r}; choose from {', '.join(FLAVORS)}")
    candidates = [name] if name else installed_flavors()
    if not candidates or not _installed(candidates[0]):
        wanted = name or "TensorRT"
        raise FlavorError(
            f"{wanted} is not installed, so no engines can be built. Install one flavor with "
            "`pip install 'turbo-trt[tensorrt]'` (data-center GPUs) or `pip install 'turbo-trt[tensorrt-rtx]'` "
            "(RTX GPUs; builds without a GPU), or pass --onnx-only to stop after ONNX export and validation."
        )
    chosen = candidates[0]
    try:
        module = _import(chosen)
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        raise FlavorError(f"{chosen} is installed but failed to import: {exc}") from exc
    return Flavor(chosen, module)
