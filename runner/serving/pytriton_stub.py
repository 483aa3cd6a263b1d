"""Triton Python-backend model that wraps PyTriton's own, so that `turbo-trt serve --backend pytriton` answers
each request of a dynamic batch on its own, with a clean message.

`pytriton_server.install_stub` moves the `model.py` that PyTriton writes into its model store to
`pytriton_model.py`, puts this file in its place and leaves VERDICT_OUTPUT out of the model's config.
The turbo-trt callable (`pytriton_server.make_infer_func`) never raises: it returns, for every request, its
image and VERDICT_OUTPUT, a BYTES tensor that is empty for a success and holds one JSON object
`{"message": str, "bad_request": bool}` for a failure. Here each request asks PyTriton's model for that
output too (`_WithVerdict`), and each reply becomes either the request's outputs without it, or its own
error response with just its message (INVALID_ARG for a bad request). Nothing runs twice.

Anything that goes wrong here or in PyTriton (an exception of PyTriton's model, a reply missing, a verdict
that is not one) answers the requests concerned with a short message and an id that Triton's log repeats
next to the full text; `execute` never raises.

The stub's interpreter needs nothing from turbo-trt: this file uses the standard library and
`triton_python_backend_utils` only.
"""

from __future__ import annotations

import importlib
import json
import secrets
import traceback
from typing import Any

#: Same name as turbo_trt.runner.serving.pytriton_server.VERDICT_OUTPUT.
VERDICT_OUTPUT = "turbo_trt_verdict"
#: Same text as turbo_trt.runner.serving.errors.INTERNAL_MESSAGE.
INTERNAL_MESSAGE = "internal error (id {id}); the server log has the details"


def read_verdict(values: Any) -> tuple[str, bool] | None:
    """A request's VERDICT_OUTPUT values (an array or list of one bytes element) -> None for a success, or
    (message, bad_request). Raises ValueError for anything that is not exactly one verdict."""
    items = list(getattr(values, "flat", values))
    if len(items) != 1 or not isinstance(items[0], bytes):
        raise ValueError(f"a verdict must be one bytes element, got {items!r:.200}")
    if items[0] == b"":
        return None
    payload = json.loads(items[0].decode("utf-8"))
    if (not isinstance(payload, dict) or set(payload) != {"message", "bad_request"}
            or not isinstance(payload["message"], str) or not isinstance(payload["bad_request"], bool)):
        raise ValueError(f"not a verdict: {payload!r:.200}")
    return payload["message"], payload["bad_request"]


class _WithVerdict:
    """A Triton request whose requested outputs include VERDICT_OUTPUT (a client names only its own, and
    PyTriton's model passes on only the outputs requested); everything else is the request's own."""

    def __init__(self, request: Any) -> None:
        self._request = request

    def requested_output_names(self) -> list[str]:
        names = list(self._request.requested_output_names())
        return names if VERDICT_OUTPUT in names else [*names, VERDICT_OUTPUT]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

        self._pb = pb_utils
        self._name = args.get("model_instance_name", "model")
        base = importlib.import_module(f"{__package__}.pytriton_model" if __package__ else "pytriton_model")
        # PyTriton's model casts each output it passes on to its config's type: it needs VERDICT_OUTPUT there.
        config = json.loads(args["model_config"])
        config["output"] = [*config.get("output", []), {"name": VERDICT_OUTPUT, "data_type": "TYPE_STRING",
                                                         "dims": ["1"]}]
        self._inner = base.TritonPythonModel()
        self._inner.initialize({**args, "model_config": json.dumps(config)})

    def _error(self, message: str, bad_request: bool) -> Any:
        pb = self._pb
        invalid = getattr(pb.TritonError, "INVALID_ARG", None)
        error = pb.TritonError(message, invalid) if bad_request and invalid is not None else pb.TritonError(message)
        return pb.InferenceResponse(error=error)

    def _internal(self, detail: str, where: str) -> str:
        """Log `detail` under a new id; returns the client's message."""
        error_id = secrets.token_hex(6)
        self._pb.Logger.log_error(f"internal error (id {error_id}) in {self._name}, {where}:\n{detail}")
        return INTERNAL_MESSAGE.format(id=error_id)

    def _reply(self, response: Any) -> Any:
        """PyTriton's response for one request -> the client's: its outputs without VERDICT_OUTPUT, or its error."""
        if response is None or response.has_error():
            raise ValueError(f"PyTriton's model answered {response!r} "
                             f"({response.error().message() if response is not None else 'no response'})")
        tensors = list(response.output_tensors())
        verdicts = [t for t in tensors if t.name() == VERDICT_OUTPUT]
        if len(verdicts) != 1:
            raise ValueError(f"{len(verdicts)} {VERDICT_OUTPUT} outputs in a reply")
        outcome = read_verdict(verdicts[0].as_numpy())
        if outcome is not None:
            return self._error(*outcome)
        return self._pb.InferenceResponse(output_tensors=[t for t in tensors if t.name() != VERDICT_OUTPUT])

    def execute(self, requests: list[Any]) -> list[Any]:
        count = len(requests)
        responses: list[Any] = [None] * count
        try:
            try:
                answered = self._inner.execute([_WithVerdict(request) for request in requests])
            except Exception as exc:  # noqa: BLE001 - PyTriton's one error for the whole batch
                message = self._internal(str(exc), f"a batch of {count}")
                return [self._error(message, False) for _ in requests]
            if not isinstance(answered, list) or len(answered) != count:
                raise ValueError(f"PyTriton's model answered {count} requests with "
                                 f"{len(answered) if isinstance(answered, list) else type(answered).__name__}")
            for index, response in enumerate(answered):
                try:
                    responses[index] = self._reply(response)
                except Exception:  # noqa: BLE001 - a reply that is not one fails only its request
                    message = self._internal(traceback.format_exc(), f"request {index + 1} of {count}")
                    responses[index] = self._error(message, False)
        except Exception:  # noqa: BLE001 - the stub's own failure: every request not answered yet gets an id
            message = self._internal(traceback.format_exc(), f"a batch of {count}")
            for index in range(count):
                if responses[index] is None:
                    responses[index] = self._error(message, False)
        return responses

    def finalize(self) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None:
            inner.finalize()
