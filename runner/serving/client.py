"""Build a request for the served model with tritonclient (HTTP or gRPC): the contract in one place.

    import tritonclient.grpc as grpcclient
    from turbo_trt.runner.serving.client import request_inputs
    client = grpcclient.InferenceServerClient("localhost:8001")
    image = client.infer("turbo", request_inputs(grpcclient, "a red cat", seed=0)).as_numpy("image")[0]
"""

from __future__ import annotations

from typing import Any

import numpy as np


def request_inputs(protocol: Any, prompt: str | bytes, seed: int | None = None, steps: int | None = None,
                   image: np.ndarray | None = None, strength: float | None = None) -> list[Any]:
    """`protocol`: the tritonclient.http or tritonclient.grpc module. Each input gets a leading batch
    dimension of 1 (the model uses Triton's dynamic batcher)."""
    text = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
    arrays: list[tuple[str, str, np.ndarray]] = [("prompt", "BYTES", np.array([[text]], dtype=object))]
    if seed is not None:
        arrays.append(("seed", "INT64", np.array([[seed]], np.int64)))
    if steps is not None:
        arrays.append(("steps", "INT32", np.array([[steps]], np.int32)))
    if image is not None:
        arrays.append(("image", "UINT8", np.ascontiguousarray(image, np.uint8)[None]))
    if strength is not None:
        arrays.append(("strength", "FP32", np.array([[strength]], np.float32)))
    inputs = []
    for name, datatype, array in arrays:
        tensor = protocol.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
