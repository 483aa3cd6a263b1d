"""`turbo-trt` command line. Imports the build stage lazily so `turbo-trt --help` needs no torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import TurboTrtError

ALIASES_HELP = "sd-turbo, sdxl-turbo (hub aliases), tiny-sd-turbo, tiny-sdxl-turbo (built-in, offline)"


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" only where it informs: not for flags, None, or help that already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or isinstance(default, bool)
                or default is argparse.SUPPRESS or action.option_strings == []):
            return text
        return text + " (default: %(default)s)"


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
        formatter_class=_HelpFormatter,
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
                   help="tensorrt-rtx only: comma-separated compute capabilities to build for (7.5, 8.0, 8.6, 8.9, "
                        "12.0, 12.1, or 'current' for the local GPU); default: TensorRT-RTX's portable engine for "
                        "Ampere and later (8.0+)")
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


def _add_generate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "generate",
        help="generate an image from a built bundle",
        description="Run a bundle: text-to-image, or image-to-image with --image. Uses the TensorRT engines "
                    "on a GPU (CUDA graphs) or the ONNX graphs on the CPU with ONNX Runtime.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--engines", type=Path, required=True, help="bundle directory written by `turbo-trt build`")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt; repeat for several images, up to the bundle's batch")
    p.add_argument("--steps", type=int, default=1, help="inference steps (1..4)")
    p.add_argument("--seed", type=int, default=None, help="noise seed in [0, 2**63); default: random, printed")
    p.add_argument("--noise", type=Path, default=None,
                   help="standard-normal initial noise (.npy, shape (batch, 4, height/8, width/8)), used as "
                        "diffusers uses latents=")
    p.add_argument("--image", type=Path, default=None, help="init image for image-to-image")
    p.add_argument("--strength", type=float, default=0.5,
                   help="image-to-image strength in (0, 1]; int(steps * strength) must be >= 1")
    p.add_argument("--executor", choices=["auto", "tensorrt", "onnxruntime"], default="auto",
                   help="auto: TensorRT on a GPU with the bundle's flavor installed, else ONNX Runtime (CPU)")
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")
    p.add_argument("--out", type=Path, required=True,
                   help="output PNG; with several prompts, NAME-0.png, NAME-1.png, ...")


def _run_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import InputError
    from .runner.pipeline import TurboPipeline

    noise = None
    if args.noise is not None:
        try:
            noise = np.load(args.noise, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"--noise {args.noise}: not a readable .npy file ({exc})") from exc
    image = None
    if args.image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image)
            image.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"--image {args.image}: not a readable image ({exc})") from exc
    if args.out.suffix.lower() != ".png":
        raise InputError(f"--out must name a .png file, got {args.out}")
    import secrets

    seed = secrets.randbelow(2**63) if args.seed is None else args.seed
    pipe = TurboPipeline.from_bundle(args.engines, executor=args.executor, strict_targets=not args.ignore_targets)
    images = pipe(args.prompt, num_inference_steps=args.steps, seed=seed, noise=noise, image=image,
                  strength=args.strength)
    from .fsutil import atomic_path

    outs = [args.out] if len(images) == 1 else [args.out.with_name(f"{args.out.stem}-{i}.png") for i in range(len(images))]
    for picture, out in zip(images, outs):
        with atomic_path(out) as tmp:
            picture.save(tmp, format="PNG")
        print(f"{out} (seed {seed}, {pipe.executor.name})")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .benchmarks.bench import BenchOptions

    d = _defaults(BenchOptions)
    p = sub.add_parser(
        "bench",
        help="latency report for a bundle, with diffusers baselines in the same run",
        description="Warm up, then time end-to-end images (CUDA graphs on a GPU, ONNX Runtime on the CPU), "
                    "per-stage times, cold start, throughput, memory and FLOP efficiency; diffusers eager "
                    "(and torch.compile with --compile) on the same model and settings for the speedup.",
        formatter_class=_HelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", type=Path, help="bundle directory")
    source.add_argument("--model", help="build this model first (as `turbo-trt build --model`), then bench it")
    p.add_argument("--random-weights", action="store_true", help="with --model: full-size random weights")
    p.add_argument("--flavor", choices=["tensorrt", "tensorrt-rtx"], default=None, help="with --model: engine flavor")
    p.add_argument("--executor", choices=["auto", "tensorrt", "onnxruntime"], default=d["executor"])
    p.add_argument("--steps", type=int, default=d["steps"], help="inference steps (1..4)")
    p.add_argument("--iterations", type=int, default=d["iterations"], help="timed images per measurement")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="untimed images first")
    p.add_argument("--parallel", type=int, default=d["parallel"], help="throughput with 1..N runners in threads")
    p.add_argument("--prompt", default=d["prompt"])
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers eager baseline")
    p.add_argument("--compile", action="store_true", help="also time diffusers under torch.compile (max-autotune)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for the efficiency column (default: data-sheet FP16 peak of known GPUs)")
    p.add_argument("--ignore-targets", action="store_true", help="run engines outside their built targets")
    p.add_argument("--json", type=Path, default=None, help="write the full result as JSON (schema turbo-trt-bench/1)")
    p.add_argument("--report", type=Path, default=None, help="write a Markdown report")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG: per-stage bars and latency histogram")


def _run_bench(args: argparse.Namespace) -> int:
    import json

    from .benchmarks.bench import BenchOptions, run_bench
    from .benchmarks.report import markdown, plot, terminal
    from .fsutil import atomic_write_bytes

    engines = args.engines
    if args.model:
        from .builder.build import build
        from .builder.options import BuildOptions
        from .progress import Progress

        engines = build(BuildOptions(model=args.model, random_weights=args.random_weights, flavor=args.flavor),
                        Progress()).bundle
    baselines: tuple[str, ...] = () if args.no_baseline else ("diffusers",)
    if args.compile:
        baselines += ("compile",)
    result = run_bench(BenchOptions(
        engines=engines, executor=args.executor, steps=args.steps, iterations=args.iterations, warmup=args.warmup,
        parallel=args.parallel, prompt=args.prompt, baselines=baselines, peak_tflops=args.peak_tflops,
        strict_targets=not args.ignore_targets,
    ), log=lambda message: print(message, file=sys.stderr))
    print(terminal(result))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    if args.report:
        atomic_write_bytes(args.report, markdown(result).encode())
    if args.plot:
        plot(result, args.plot)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbo-trt",
        description="Compile SD-Turbo / SDXL-Turbo into static FP16 TensorRT engines and run them on CUDA graphs.",
    )
    parser.add_argument("--version", action="version", version=f"turbo-trt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_build(sub)
    _add_generate(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            return _run_build(args)
        if args.command == "generate":
            return _run_generate(args)
        if args.command == "bench":
            return _run_bench(args)
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
