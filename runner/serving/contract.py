"""The served model's inputs and outputs: one table used for PyTriton's binding, for `config.pbtxt` and
for the README. Shapes are Triton `dims`, per request (without the batch dimension the dynamic batcher
adds).

`dims` is the contract a client must follow (README's table). The inputs are declared to Triton with every
dim variable (`config_dims`: -1) so that a wrong shape reaches the model, whose check answers it with an
error that starts with the field's name (`image: must be UINT8 [512, 512, 3] ...`), like every other bad
request; declared fixed, Triton would refuse it first, with its own text. Only the rank and the datatype
are left to Triton. Requests of equal shapes still batch together."""

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
    model_checks_dims: bool = False  # declared to Triton as all -1: the model checks `dims` itself

    @property
    def config_dims(self) -> tuple[int, ...]:
        """The dims declared in Triton's model config."""
        return (-1,) * len(self.dims) if self.model_checks_dims else self.dims

    @property
    def numpy_dtype(self) -> type:
        return {"STRING": np.bytes_, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
                "FP32": np.float32}[self.triton_type]

    @property
    def client_type(self) -> str:
        """The datatype name tritonclient's InferInput takes (BYTES for strings)."""
        return "BYTES" if self.triton_type == "STRING" else self.triton_type


def model_inputs(height: int, width: int, controlnets: int = 0) -> list[TensorSpec]:
    """The inputs; a bundle with n ControlNets also takes a control image per net and a scale per net
    (default 1.0 with a control image; without one the nets are off)."""
    control = [TensorSpec("control_image", "UINT8", (controlnets, height, width, 3), optional=True),
               TensorSpec("control_scale", "FP32", (controlnets,), optional=True)] if controlnets else []
    return [
        TensorSpec("prompt", "STRING", (1,), model_checks_dims=True),
        TensorSpec("seed", "INT64", (1,), optional=True, model_checks_dims=True),
        TensorSpec("steps", "INT32", (1,), optional=True, model_checks_dims=True),
        TensorSpec("image", "UINT8", (height, width, 3), optional=True, model_checks_dims=True),
        TensorSpec("strength", "FP32", (1,), optional=True, model_checks_dims=True),
        *control,
    ]


def model_outputs(height: int, width: int) -> list[TensorSpec]:
    return [TensorSpec("image", "UINT8", (height, width, 3))]
