"""Build a request for the served model with tritonclient (HTTP or gRPC), or as the KServe v2 JSON body
that curl can send: the contract in one place.

    import tritonclient.grpc as grpcclient
    from turbo_trt.runner.serving.client import request_inputs
    client = grpcclient.InferenceServerClient("localhost:8001")
    image = client.infer("turbo", request_inputs(grpcclient, "a red cat", seed=0)).as_numpy("image")[0]
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = tuple[str, str, np.ndarray]  # input name, KServe datatype, array with its batch dimension of 1


def request_arrays(prompt: str | bytes, seed: int | None = None, steps: int | None = None,
                   image: np.ndarray | None = None, strength: float | None = None,
                   control_image: np.ndarray | None = None, control_scale: list[float] | None = None) -> list[Array]:
    """The inputs of one request; each gets a leading batch dimension of 1 (the model uses Triton's dynamic
    batcher). Absent optional inputs are left out. ControlNet bundles: `control_image` uint8 (nets, H, W, 3),
    one image per net, and `control_scale` one scale per net."""
    text = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
    arrays: list[Array] = [("prompt", "BYTES", np.array([[text]], dtype=object))]
    if seed is not None:
        arrays.append(("seed", "INT64", np.array([[seed]], np.int64)))
    if steps is not None:
        arrays.append(("steps", "INT32", np.array([[steps]], np.int32)))
    if image is not None:
        arrays.append(("image", "UINT8", np.ascontiguousarray(image, np.uint8)[None]))
    if strength is not None:
        arrays.append(("strength", "FP32", np.array([[strength]], np.float32)))
    if control_image is not None:
        arrays.append(("control_image", "UINT8", np.ascontiguousarray(control_image, np.uint8)[None]))
    if control_scale is not None:
        arrays.append(("control_scale", "FP32", np.array([control_scale], np.float32)))
    return arrays


def request_inputs(protocol: Any, prompt: str | bytes, seed: int | None = None, steps: int | None = None,
                   image: np.ndarray | None = None, strength: float | None = None,
                   control_image: np.ndarray | None = None, control_scale: list[float] | None = None) -> list[Any]:
    """`protocol`: the tritonclient.http or tritonclient.grpc module."""
    return infer_inputs(protocol, request_arrays(prompt, seed, steps, image, strength, control_image, control_scale))


def infer_inputs(protocol: Any, arrays: list[Array]) -> list[Any]:
    inputs = []
    for name, datatype, array in arrays:
        tensor = protocol.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def json_request(arrays: list[Array]) -> dict[str, Any]:
    """The KServe v2 JSON body (POST /v2/models/<model>/infer) for `arrays`: data flattened in row-major
    order, BYTES as text (JSON carries UTF-8 text only)."""
    inputs = []
    for name, datatype, array in arrays:
        if datatype == "BYTES":
            data = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
        else:
            data = array.reshape(-1).tolist()
        inputs.append({"name": name, "shape": list(array.shape), "datatype": datatype, "data": data})
    return {"inputs": inputs}
