"""What a client reads when its request fails, and what the server log keeps.

- A bad request (a `RequestError`: the request checks of `requests.py`, run before any engine call) is
  answered with the runner's message, which starts with the field's name
  (`steps: num_inference_steps must be an integer in 1..4, got 7`), as a
  client error (HTTP 400, gRPC INVALID_ARGUMENT). The log gets one line.
- Anything else is a failure of the server, not of the request, including an `InputError` raised inside
  an engine call (the request passed its checks; the message may name server files): the client reads a
  short, stable message with an id (`internal error (id 3f2a9c1e0b7d); the server log has the details`) and the log repeats the id
  next to the full traceback. No traceback, file path or internal class name ever reaches a client.

Every backend answers through `answers`; the Python-backend model (`triton_model.py`) and the PyTriton
wrapper (`pytriton_stub.py`) turn each answer into Triton's per-request error.
"""

from __future__ import annotations

import re
import secrets
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .requests import RequestError

INTERNAL_MESSAGE = "internal error (id {id}); the server log has the details"
#: Matches the client's message (and the log line) of an internal error; group 1 is the id.
INTERNAL_PATTERN = re.compile(r"internal error \(id ([0-9a-f]{12})\)")


@dataclass(frozen=True)
class Answer:
    """A failed request's reply: `message` for the client; `bad_request` True for a client error."""

    message: str
    bad_request: bool


def new_error_id() -> str:
    return secrets.token_hex(6)


def internal_message(error_id: str) -> str:
    return INTERNAL_MESSAGE.format(id=error_id)


def log_internal(exc: BaseException, error_id: str, where: str, log: Callable[[str], None]) -> str:
    """Log `exc` with its traceback under `error_id`; returns the client's message."""
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    log(f"internal error (id {error_id}) {where}:\n{detail}")
    return internal_message(error_id)


def answers(outcomes: Sequence[object], log: Callable[[str], None], model: str = "turbo",
            log_refused: Callable[[str], None] | None = None) -> list[Answer | None]:
    """One reply per outcome of a batch (None for a success: anything that is not an exception). A bad
    request (RequestError) gets its message and one line in `log_refused` (default `log`); an internal failure gets an
    id, shared by the requests that the same exception failed (one engine call) and logged once in `log`
    with the traceback."""
    ids: dict[int, str] = {}
    replies: list[Answer | None] = []
    total = len(outcomes)
    for index, outcome in enumerate(outcomes):
        if not isinstance(outcome, BaseException):
            replies.append(None)
        elif isinstance(outcome, RequestError):
            (log_refused or log)(f"{model}: request {index + 1} of {total} refused: {outcome}")
            replies.append(Answer(str(outcome), True))
        else:
            key = id(outcome)
            if key not in ids:
                ids[key] = new_error_id()
                log_internal(outcome, ids[key], f"in {model}, request {index + 1} of {total}", log)
            replies.append(Answer(internal_message(ids[key]), False))
    return replies
