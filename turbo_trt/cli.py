"""`turbo-trt` command line. Each command lives in `turbo_trt.commands.<name>` (add + run); they import the
build stage lazily so `turbo-trt --help` needs no torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .commands import COMMANDS
from .errors import TurboTrtError


def _module(command: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"turbo_trt.commands.{command.replace('-', '_')}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbo-trt",
        description="Compile SD-Turbo / SDXL-Turbo into static FP16 TensorRT engines and run them on CUDA graphs.",
    )
    parser.add_argument("--version", action="version", version=f"turbo-trt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        _module(command).add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(_module(args.command).run(args))
    except TurboTrtError as exc:
        print(f"turbo-trt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("turbo-trt: interrupted; finished steps are kept, the next build resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
