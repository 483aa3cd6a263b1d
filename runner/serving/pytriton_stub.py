"""Triton Python-backend model that wraps PyTriton's own, so that `turbo-trt serve --backend pytriton` answers
each request of a dynamic batch on its own, with a clean message.

`pytriton_server.install_stub` moves the `model.py` that PyTriton writes into its model store to
`pytriton_model.py` and puts this file in its place. PyTriton (0.7) answers a batch as a whole: when the
callable raises, every request of the batch gets one `TritonModelException` whose text is a traceback of
two processes. The turbo-trt callable (`pytriton_server.make_infer_func`) therefore raises, when any request
of a batch fails, a `BatchVerdict` whose text holds one reply per request as JSON after VERDICT_MARKER:
`[message, bad_request]` for a request that failed, null for a request that is fine. Here that verdict is
read back out of PyTriton's error: each failed request gets its own error response with just its message,
and the fine requests are sent again without the others (no engine call ran for a batch with a bad request,
so a bad request costs its batch-mates one more round trip, not their images). An error without a verdict
(PyTriton's own) answers every request with a short message and an id that Triton's log repeats next to
the full text.

The stub's interpreter needs nothing from turbo-trt: this file uses the standard library and
`triton_python_backend_utils` only.
"""

from __future__ import annotations

import importlib
import json
import secrets
from typing import Any

#: Same text as turbo_trt.runner.serving.pytriton_server.VERDICT_MARKER.
VERDICT_MARKER = "turbo-trt-verdict:"
#: Same text as turbo_trt.runner.serving.errors.INTERNAL_MESSAGE.
INTERNAL_MESSAGE = "internal error (id {id}); the server log has the details"


def read_verdict(text: str, count: int) -> list[Any] | None:
    """The replies of the last verdict in `text` (an error's text), or None if it holds no verdict for
    `count` requests."""
    at = text.rfind(VERDICT_MARKER)
    if at < 0:
        return None
    try:
        replies, _ = json.JSONDecoder().raw_decode(text, at + len(VERDICT_MARKER))
    except ValueError:
        return None
    if not isinstance(replies, list) or len(replies) != count:
        return None
    return replies


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

        self._pb = pb_utils
        self._name = args.get("model_instance_name", "model")
        base = importlib.import_module(f"{__package__}.pytriton_model" if __package__ else "pytriton_model")
        self._inner = base.TritonPythonModel()
        self._inner.initialize(args)

    def _error(self, message: str, bad_request: bool) -> Any:
        pb = self._pb
        invalid = getattr(pb.TritonError, "INVALID_ARG", None)
        error = pb.TritonError(message, invalid) if bad_request and invalid is not None else pb.TritonError(message)
        return pb.InferenceResponse(error=error)

    def _internal(self, detail: str, count: int) -> str:
        """Log `detail` under a new id; returns the client's message."""
        error_id = secrets.token_hex(6)
        self._pb.Logger.log_error(f"internal error (id {error_id}) in {self._name}, a batch of {count}:\n{detail}")
        return INTERNAL_MESSAGE.format(id=error_id)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:
            try:
                answered = self._inner.execute([requests[i] for i in pending])
            except Exception as exc:  # noqa: BLE001 - PyTriton's one error for the whole batch
                replies = read_verdict(str(exc), len(pending))
                again = [] if replies is None else [i for i, reply in zip(pending, replies) if reply is None]
                if replies is None or len(again) == len(pending):  # no verdict, or one that refuses nobody
                    message = self._internal(str(exc), len(pending))
                    for i in pending:
                        responses[i] = self._error(message, False)
                    break
                for i, reply in zip(pending, replies):
                    if reply is not None:
                        responses[i] = self._error(str(reply[0]), bool(reply[1]))
                pending = again
                continue
            for i, response in zip(pending, answered):
                responses[i] = response
            break
        return responses

    def finalize(self) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None:
            inner.finalize()
