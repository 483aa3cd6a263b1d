"""What every command module shares: help formatting, defaults from the options dataclasses, executor help."""

from __future__ import annotations

import argparse

EXECUTOR_HELP = ("tensorrt (the bundle's engines on a GPU), onnxruntime-cuda (its ONNX graphs on a GPU with "
                 "onnxruntime-gpu), onnxruntime (CPU), or auto: the first of those that can run here; the "
                 "choice and why the others were passed over are printed")


def executors() -> tuple[str, ...]:
    from ..runner.executor_choice import EXECUTORS

    return EXECUTORS


ALIASES_HELP = "sd-turbo, sdxl-turbo (hub aliases), tiny-sd-turbo, tiny-sdxl-turbo (built-in, offline)"


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" only where it informs: not for flags, None, or help that already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or isinstance(default, bool)
                or default is argparse.SUPPRESS or action.option_strings == []):
            return text
        return text + " (default: %(default)s)"


def defaults(cls: type) -> dict[str, object]:
    """Field defaults of an options dataclass: the one source of the CLI's defaults."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def lora_arguments(values: list[str]) -> list[tuple[str, float]]:
    from ..runner.lora import parse_lora_argument

    return [parse_lora_argument(value) for value in values]
