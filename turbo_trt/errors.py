"""Error types. Every error a user can cause is a TurboTrtError with a message that says what to do."""

from __future__ import annotations


class TurboTrtError(Exception):
    """Base class: the CLI prints the message and exits non-zero, without a traceback."""

    exit_code = 2


class UsageError(TurboTrtError):
    """Bad arguments (shapes, options) caught before any work starts."""


class SourceError(TurboTrtError):
    """The model could not be resolved or is not an SD/SDXL-like pipeline."""


class ExportError(TurboTrtError):
    """ONNX export failed."""


class ValidationError(TurboTrtError):
    """An exported graph disagrees with its PyTorch reference (NaN/inf or low cosine similarity)."""


class EngineBuildError(TurboTrtError):
    """TensorRT could not parse a graph or build an engine."""


class FlavorError(TurboTrtError):
    """No TensorRT flavor is installed, or the installed one does not match a bundle."""


class BundleError(TurboTrtError):
    """A bundle on disk is missing files, corrupted, locked or of an unknown schema."""


class InputError(TurboTrtError):
    """Bad input to the runner (prompt, image, steps, strength, seed, noise)."""


class ExecutionError(TurboTrtError):
    """A GPU stage failed while generating (enqueue, graph launch, copy or sync); `stage` names it. The
    executor has synchronized and stays usable unless the message says otherwise."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


class ExecutorUnavailable(TurboTrtError):
    """The executor asked for cannot run on this machine (a package or the GPU is missing); says which."""
