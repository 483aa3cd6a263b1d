"""turbo-trt: SD-Turbo / SDXL-Turbo as static FP16 TensorRT engines run on CUDA graphs.

`import turbo_trt` is cheap: it needs neither torch, TensorRT nor a GPU. The build stage lives in
`turbo_trt.builder` (needs the `build` extra), the run stage in `turbo_trt.runner`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TurboTrtError

__all__ = ["TurboTrtError", "__version__"]
