"""`turbo-trt` command line. Imports the build stage lazily so `turbo-trt --help` needs no torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import TurboTrtError

ALIASES_HELP = "sd-turbo, sdxl-turbo (hub aliases), tiny-sd-turbo, tiny-sdxl-turbo (built-in, offline)"


def _defaults(cls: type) -> dict[str, object]:
    """Field defaults of an options dataclass: the one source of the CLI's defaults."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _add_build(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .builder.engine import EngineOptions
    from .builder.options import BuildOptions

    d = {**_defaults(BuildOptions), **_defaults(EngineOptions)}

    p = sub.add_parser(
        "build",
        help="export, validate and compile a model into an engine bundle",
        description=(
            "Export each subnetwork of an SD-Turbo / SDXL-Turbo pipeline to static-shape FP16 ONNX, validate "
            "it against PyTorch FP32 with ONNX Runtime, compile a TensorRT engine per subnetwork and write "
            "engines/<slug>/manifest.json. A second run with nothing changed rebuilds nothing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help=f"{ALIASES_HELP}, a hub id (owner/name) or a local diffusers pipeline directory")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a hub model")
    p.add_argument("--random-weights", action="store_true",
                   help="full-size architecture of sd-turbo/sdxl-turbo from configs shipped with turbo-trt, "
                        "random weights, no download (for speed work offline)")
    p.add_argument("--out", type=Path, default=None, help="bundle directory (default: engines/<slug>)")
    p.add_argument("--batch", type=int, default=d["batch"], help="static batch size")
    p.add_argument("--height", type=int, default=d["height"], help="image height in pixels")
    p.add_argument("--width", type=int, default=d["width"], help="image width in pixels")
    p.add_argument("--flavor", choices=["tensorrt", "tensorrt-rtx"], default=None,
                   help="engine flavor (default: the first installed of tensorrt, tensorrt-rtx)")
    p.add_argument("--onnx-only", action="store_true", help="stop after ONNX export and validation")
    p.add_argument("--force", action="store_true", help="rebuild everything, even what is up to date")
    p.add_argument("--no-img2img", dest="img2img", action="store_false",
                   help="skip the VAE encoder (the bundle then does txt2img only)")
    p.add_argument("--opt-level", type=int, default=d["optimization_level"],
                   help="TensorRT builder optimization level 0..5")
    p.add_argument("--workspace", type=float, default=d["workspace_gib"],
                   help="TensorRT workspace limit in GiB (default: TensorRT's own)")
    p.add_argument("--targets", default=None,
                   help="tensorrt-rtx only: comma-separated compute capabilities to build for, e.g. 8.6,8.9 "
                        "(default: the local GPU, or every supported one when there is no GPU)")
    p.add_argument("--min-cosine", type=float, default=d["min_cosine"],
                   help="fail validation when an output's cosine similarity to PyTorch FP32 is lower")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")


def _run_build(args: argparse.Namespace) -> int:
    from .progress import Progress

    try:
        from .builder.build import build
        from .builder.engine import EngineOptions
        from .builder.options import BuildOptions
    except ImportError as exc:
        raise TurboTrtError(
            f"the build stage needs the 'build' extra ({exc.name} is missing): pip install 'turbo-trt[build]'"
        ) from exc
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else ()
    opts = BuildOptions(
        model=args.model, revision=args.revision, random_weights=args.random_weights, out=args.out,
        batch=args.batch, height=args.height, width=args.width, flavor=args.flavor, onnx_only=args.onnx_only,
        force=args.force, img2img=args.img2img, min_cosine=args.min_cosine,
        engine=EngineOptions(optimization_level=args.opt_level, workspace_gib=args.workspace, targets=targets),
    )
    report = build(opts, Progress(enabled=not args.quiet))
    if report.up_to_date:
        print(f"{report.bundle}: up to date")
    else:
        done = ", ".join(report.exported) or "none"
        engines = ", ".join(report.engines_built) or ("none (--onnx-only)" if opts.onnx_only else "none")
        print(f"{report.bundle}: exported {done}; engines built: {engines} ({report.seconds:.1f} s)")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbo-trt",
        description="Compile SD-Turbo / SDXL-Turbo into static FP16 TensorRT engines and run them on CUDA graphs.",
    )
    parser.add_argument("--version", action="version", version=f"turbo-trt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            return _run_build(args)
        parser.error(f"unknown command {args.command}")
    except TurboTrtError as exc:
        print(f"turbo-trt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("turbo-trt: interrupted; finished steps are kept, the next build resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
