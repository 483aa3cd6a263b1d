"""The served model's inputs and outputs: one table used for PyTriton's binding, for `config.pbtxt` and
for the README. Shapes are Triton `dims`, per request (without the batch dimension the dynamic batcher
adds)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MODEL_NAME = "turbo"
DEFAULT_STEPS = 1
DEFAULT_STRENGTH = 0.5


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # as in config.pbtxt, without the TYPE_ prefix
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def numpy_dtype(self) -> type:
        return {"STRING": np.bytes_, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
                "FP32": np.float32}[self.triton_type]

    @property
    def client_type(self) -> str:
        """The datatype name tritonclient's InferInput takes (BYTES for strings)."""
        return "BYTES" if self.triton_type == "STRING" else self.triton_type


def model_inputs(height: int, width: int) -> list[TensorSpec]:
    return [
        TensorSpec("prompt", "STRING", (1,)),
        TensorSpec("seed", "INT64", (1,), optional=True),
        TensorSpec("steps", "INT32", (1,), optional=True),
        TensorSpec("image", "UINT8", (height, width, 3), optional=True),
        TensorSpec("strength", "FP32", (1,), optional=True),
    ]


def model_outputs(height: int, width: int) -> list[TensorSpec]:
    return [TensorSpec("image", "UINT8", (height, width, 3))]
