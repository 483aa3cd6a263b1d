"""Triton Python-backend model serving a turbo-trt bundle. `turbo-trt export-triton` copies this file as
`<repository>/<model>/1/model.py`; Triton's Python backend loads it in a stub process per model instance.

Model parameters (config.pbtxt): `bundle` (the bundle directory; a relative path is taken from the model's
version directory), `executor` (auto, tensorrt, onnxruntime-cuda, onnxruntime), `strict_targets` (false: run TensorRT engines
on a GPU outside their build targets, with a warning). An instance of kind GPU runs on its own GPU
(`_use_device`). `initialize` opens and checks the bundle and warms the pipeline up before Triton marks the
model ready; a bundle that fails its checks raises, so the model never becomes ready and Triton's log says
why. Each request is checked on its own and a bad one
gets its own error response (the runner's message, starting with the field's name, as INVALID_ARG); the
others in the batch run. `execute` never raises: an unexpected failure answers each request it touched with
a short message and an id that Triton's log repeats next to the traceback (`runner/serving/errors.py`).
"""

from __future__ import annotations

import json
import os
import site
from pathlib import Path
from typing import Any

# control_image / control_scale: ControlNet bundles only (absent from other bundles' requests: read as None)
INPUT_NAMES = ("prompt", "seed", "steps", "image", "strength", "control_image", "control_scale")


def _add_site_dirs() -> None:
    """Directories named by TURBO_TRT_SITE_DIRS (set by `turbo_trt.runner.serving.tritonserver` when it
    starts PyTriton's tritonserver) hold turbo_trt and its dependencies for the stub's interpreter."""
    for directory in os.environ.get("TURBO_TRT_SITE_DIRS", "").split(os.pathsep):
        if directory:
            site.addsitedir(directory)


def visible_device(device: int, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES value that leaves only Triton's device `device` visible. Triton's device id
    is an index into the GPUs this process sees: with CUDA_VISIBLE_DEVICES already set (e.g. "2,3", or
    GPU UUIDs) it is that list's entry, not the raw id."""
    entries = [entry.strip() for entry in (visible or "").split(",") if entry.strip()]
    if not entries:
        return str(device)
    if not 0 <= device < len(entries):
        raise RuntimeError(f"Triton device id {device} is outside CUDA_VISIBLE_DEVICES={visible!r}")
    return entries[device]


def _use_device(device: int) -> None:
    """Run this instance on GPU `device` (an index into the visible GPUs): hide the others when CUDA is not
    initialized in this process yet, else (the stub initialized it, seeing the same visible GPUs) make
    `device` current for this thread, which runs initialize and execute."""
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(device, os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found]
    except ImportError:
        return
    err, count = runtime.cudaGetDeviceCount()
    if int(err) == 0 and count > 1:  # CUDA started before the variable was set: it sees every GPU
        (err,) = runtime.cudaSetDevice(device)
        if int(err) != 0:
            raise RuntimeError(f"cudaSetDevice({device}) failed: {err}")


def _log_failure(exc: BaseException, where: str, log: Any) -> str:
    """Log `exc` under a new id; the client's message. Uses turbo_trt's errors module when it imports, else
    (the failure may be that very import) the same text from the standard library."""
    try:
        from turbo_trt.runner.serving.errors import log_internal, new_error_id
    except Exception:  # noqa: BLE001 - the last resort must not fail
        import secrets
        import traceback

        error_id = secrets.token_hex(6)
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        log(f"internal error (id {error_id}) {where}:\n{detail}")
        return f"internal error (id {error_id}); the server log has the details"
    return log_internal(exc, new_error_id(), where, log)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        _add_site_dirs()
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":
            _use_device(int(args["model_instance_device_id"]))
        bundle = Path(params["bundle"])
        if not bundle.is_absolute():
            bundle = Path(args["model_repository"]) / args["model_version"] / bundle

        import triton_python_backend_utils as pb_utils

        from turbo_trt.runner.pipeline import TurboPipeline
        from turbo_trt.runner.serving.batching import warm_up
        from turbo_trt.runner.serving.requests import ModelFacts

        self._pb = pb_utils
        self.name = name = args.get("model_instance_name", "turbo")
        pb_utils.Logger.log_info(f"{name}: opening {bundle} (checking every file's sha256)")
        self.pipe = TurboPipeline.from_bundle(bundle, executor=params.get("executor", "auto"),
                                              strict_targets=params.get("strict_targets", "true") != "false")
        self.facts = ModelFacts.of(self.pipe)
        calls = warm_up(self.pipe)
        pb_utils.Logger.log_info(f"{name}: {self.pipe.executor.name} pipeline warmed up ({calls} calls); ready")

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self._pb
        try:
            from turbo_trt.runner.serving.errors import answers

            outcomes = self._outcomes(requests)
            replies = answers(outcomes, pb.Logger.log_error, self.name, pb.Logger.log_info)
            invalid = getattr(pb.TritonError, "INVALID_ARG", None)  # Python backends before 23.06 have no codes
            responses = []
            for outcome, reply in zip(outcomes, replies):
                if reply is None:
                    responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("image", outcome[None])]))
                elif reply.bad_request and invalid is not None:
                    responses.append(pb.InferenceResponse(error=pb.TritonError(reply.message, invalid)))
                else:
                    responses.append(pb.InferenceResponse(error=pb.TritonError(reply.message)))
            return responses
        except Exception as exc:  # noqa: BLE001 - a failure outside the engine calls: every request gets its id
            message = _log_failure(exc, f"in {self.name}, a batch of {len(requests)}", pb.Logger.log_error)
            return [pb.InferenceResponse(error=pb.TritonError(message)) for _ in requests]

    def _outcomes(self, requests: list[Any]) -> list[Any]:
        """Each request's image (uint8 (H, W, 3)) or the exception that failed it."""
        from turbo_trt.runner.serving.batching import run_requests
        from turbo_trt.runner.serving.requests import decode_requests

        def arrays(request: Any) -> dict[str, Any]:
            tensors = {name: self._pb.get_input_tensor_by_name(request, name) for name in INPUT_NAMES}
            return {name: None if tensor is None else tensor.as_numpy() for name, tensor in tensors.items()}

        return list(run_requests(self.pipe, decode_requests(requests, self.facts, arrays)))

    def finalize(self) -> None:
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()
