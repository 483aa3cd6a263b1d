"""The errors a frame stream raises (each names what went wrong)."""

from __future__ import annotations

from turbo_trt.errors import InputError, TurboTrtError


class StreamInputError(InputError):
    """A push or settings change broke a rule; `field` names what (prompt, seed, steps, strength, image, ...)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class StreamClosedError(TurboTrtError):
    """The stream (or its pool) was closed."""


class PoolBrokenError(TurboTrtError):
    """The stream pool can run nothing more: every pipeline's executor is broken, or a worker died of an
    unexpected error (logged)."""


class FrameFailedError(TurboTrtError):
    """The engines failed on one input; `seq` names it and `__cause__` is the executor's error. The stream
    stays usable."""

    def __init__(self, seq: int, cause: BaseException) -> None:
        super().__init__(f"frame {seq} failed ({type(cause).__name__}): {cause}")
        self.seq = seq
