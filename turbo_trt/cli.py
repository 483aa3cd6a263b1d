"""`turbo-trt` command line. Imports the build stage lazily so `turbo-trt --help` needs no torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import TurboTrtError

EXECUTOR_HELP = ("tensorrt (the bundle's engines on a GPU), onnxruntime-cuda (its ONNX graphs on a GPU with "
                 "onnxruntime-gpu), onnxruntime (CPU), or auto: the first of those that can run here; the "
                 "choice and why the others were passed over are printed")


def _executors() -> tuple[str, ...]:
    from .runner.executor_choice import EXECUTORS

    return EXECUTORS


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
    p.add_argument("--vae", default=None, metavar="tiny|ID|DIR",
                   help="VAE in place of the pipeline's: 'tiny' (TAESD: madebyollin/taesd or taesdxl; offline with "
                        "the tiny presets and --random-weights), or any AutoencoderKL / AutoencoderTiny as a hub id "
                        "(e.g. madebyollin/sdxl-vae-fp16-fix) or a local save_pretrained directory. Changing it "
                        "rebuilds only the VAE components")
    p.add_argument("--vae-fp32", action="store_true",
                   help="export the VAE in FP32 whatever its config says (the fix when its FP16 graph fails "
                        "validation)")
    p.add_argument("--min-cosine", type=float, default=d["min_cosine"],
                   help="fail validation when an output's cosine similarity to PyTorch FP32 (values centred "
                        "on the reference's mean) is lower; per-component relative-error limits apply too")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID[:SCALE]",
                   help="fuse a LoRA (.safetensors, diffusers/PEFT or kohya keys; a local file or hub id "
                        "owner/name[/file.safetensors]) into the weights before export, scale default 1.0; "
                        "repeatable. A changed LoRA or scale rebuilds only the parts it touches")
    p.add_argument("--refittable", action="store_true",
                   help="build engines whose weights can be refitted, and record the graph weight map, so "
                        "LoRAs can be swapped at run time (`generate --lora`, `pipe.set_loras`)")
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
        force=args.force, img2img=args.img2img, min_cosine=args.min_cosine, vae=args.vae, vae_fp32=args.vae_fp32,
        engine=EngineOptions(optimization_level=args.opt_level, workspace_gib=args.workspace, targets=targets,
                             refittable=args.refittable),
        loras=tuple(_lora_arguments(args.lora)),
    )
    report = build(opts, Progress(enabled=not args.quiet))
    if report.up_to_date:
        print(f"{report.bundle}: up to date")
    else:
        done = ", ".join(report.exported) or "none"
        engines = ", ".join(report.engines_built) or ("none (--onnx-only)" if opts.onnx_only else "none")
        print(f"{report.bundle}: exported {done}; engines built: {engines} ({report.seconds:.1f} s)")
    return 0


def _lora_arguments(values: list[str]) -> list[tuple[str, float]]:
    from .runner.lora import parse_lora_argument

    return [parse_lora_argument(value) for value in values]


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
    p.add_argument("--executor", choices=_executors(), default="auto", help=EXECUTOR_HELP)
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")
    p.add_argument("--out", type=Path, required=True,
                   help="output PNG; with several prompts, NAME-0.png, NAME-1.png, ...")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA (.safetensors) at run time, scale default 1.0; repeatable; needs a bundle "
                        "built with --refittable")


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
    print(pipe.executor_choice.describe(), file=sys.stderr)
    if hasattr(pipe.executor, "describe_memory"):
        print(pipe.executor.describe_memory(), file=sys.stderr)
    if args.lora:
        pipe.set_loras(dict(_lora_arguments(args.lora)))
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
    p.add_argument("--vae", default=None, metavar="tiny|ID|DIR", help="with --model: as `turbo-trt build --vae`")
    p.add_argument("--executor", choices=_executors(), default=d["executor"], help=EXECUTOR_HELP)
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

        engines = build(BuildOptions(model=args.model, random_weights=args.random_weights, flavor=args.flavor,
                                     vae=args.vae),
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


def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .runner.serving.pytriton_server import ServeOptions

    d = _defaults(ServeOptions)
    p = sub.add_parser(
        "serve",
        help="serve a bundle on NVIDIA Triton Inference Server (in this process, via PyTriton)",
        description="Check and load a bundle, warm up one pipeline per instance (forks sharing the engines' "
                    "weights), then start Triton with the bundle bound as one model: HTTP and gRPC "
                    "(KServe v2 protocol), dynamic batching up to the bundle's batch, health and metrics. "
                    "SIGINT/SIGTERM stop it after the requests in flight. Model inputs: prompt BYTES [1]; "
                    "optional seed INT64 [1], steps INT32 [1], image UINT8 [H, W, 3], strength FP32 [1]; "
                    "output: image UINT8 [H, W, 3] (see README, Serve). Needs the `serve` extra.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--engines", type=Path, required=True, help="bundle directory written by `turbo-trt build`")
    p.add_argument("--model-name", default=d["model_name"], help="name of the model in Triton")
    p.add_argument("--address", default=d["address"],
                   help="address the HTTP, gRPC and metrics endpoints bind: loopback by default; use 0.0.0.0 "
                        "to serve other machines (behind a load balancer)")
    p.add_argument("--http-port", type=int, default=d["http_port"], help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=d["grpc_port"], help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=d["metrics_port"], help="Prometheus metrics port")
    p.add_argument("--instances", type=int, default=d["instances"],
                   help="model instances: pipelines made with fork(), each with its own execution state")
    p.add_argument("--executor", choices=_executors(), default=d["executor"], help=EXECUTOR_HELP)
    p.add_argument("--max-queue-delay-us", type=int, default=d["max_queue_delay_us"],
                   help="how long Triton's dynamic batcher waits to fill a batch (microseconds)")
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")
    p.add_argument("--backend", choices=["pytriton", "python"], default=d["backend"],
                   help="pytriton: Triton bound to this process, instances share the engines' weights, a bad "
                        "request fails the requests Triton batched with it; python: the `export-triton` repository "
                        "on PyTriton's tritonserver binary, one process per instance, a bad request fails alone")


def _run_serve(args: argparse.Namespace) -> int:
    from .runner.serving.pytriton_server import ServeOptions, serve

    options = ServeOptions(
        engines=args.engines, model_name=args.model_name, address=args.address, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, instances=args.instances, executor=args.executor,
        max_queue_delay_us=args.max_queue_delay_us, strict_targets=not args.ignore_targets, backend=args.backend,
    )
    log = lambda message: print(f"turbo-trt serve: {message}", file=sys.stderr, flush=True)  # noqa: E731
    if options.backend == "python":
        from .runner.serving.python_backend_server import serve_python_backend

        serve_python_backend(options, log)
    else:
        serve(options, log)
    return 0


def _add_export_triton(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .runner.serving.repository import ExportOptions

    d = _defaults(ExportOptions)
    p = sub.add_parser(
        "export-triton",
        help="write a Triton model repository (Python backend) for a bundle",
        description="Write REPO/<model>/config.pbtxt (the same inputs and outputs as `turbo-trt serve`, dynamic "
                    "batching, one instance group per GPU) and REPO/<model>/1/model.py (Triton's Python "
                    "backend calling the turbo-trt runner), for `tritonserver --model-repository REPO` where "
                    "turbo-trt is installed. Prints how to start PyTriton's tritonserver binary on it here.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--engines", type=Path, required=True, help="bundle directory written by `turbo-trt build`")
    p.add_argument("--out", type=Path, required=True, help="model repository directory (created if missing)")
    p.add_argument("--model-name", default=d["model_name"], help="name of the model (its directory in REPO)")
    p.add_argument("--gpus", default=None,
                   help="GPU indices, one instance group each, e.g. 0,1,2,3; 'none' for CPU instances "
                        "(default: the GPUs nvidia-smi lists now, CPU instances when there are none)")
    p.add_argument("--instances", type=int, default=d["instances"], help="instances per GPU (or on the CPU)")
    p.add_argument("--executor", choices=_executors(), default=d["executor"],
                   help="executor the model uses: " + EXECUTOR_HELP)
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")
    p.add_argument("--max-queue-delay-us", type=int, default=d["max_queue_delay_us"],
                   help="how long Triton's dynamic batcher waits to fill a batch (microseconds)")
    p.add_argument("--include-bundle", action="store_true",
                   help="copy the bundle into the repository (REPO/<model>/1/bundle) instead of referencing its path")
    p.add_argument("--force", action="store_true", help="replace an existing REPO/<model>")


def _run_export_triton(args: argparse.Namespace) -> int:
    import shlex

    from .errors import UsageError
    from .runner.serving.repository import ExportOptions, export_repository

    gpus: list[int] | None = None
    if args.gpus is not None:
        try:
            gpus = [] if args.gpus == "none" else [int(g) for g in args.gpus.split(",") if g.strip()]
        except ValueError:
            raise UsageError(f"--gpus must be 'none' or indices like 0,1, got {args.gpus!r}") from None
    model_dir = export_repository(ExportOptions(
        engines=args.engines, out=args.out, model_name=args.model_name, gpus=gpus, instances=args.instances,
        executor=args.executor, max_queue_delay_us=args.max_queue_delay_us, include_bundle=args.include_bundle,
        force=args.force, strict_targets=not args.ignore_targets,
    ))
    print(f"{model_dir}: Triton model '{args.model_name}' (Python backend)")
    print(f"serve it with a Triton install whose Python has turbo-trt: tritonserver --model-repository {args.out}")
    try:
        from .runner.serving.tritonserver import server_command

        argv, env = server_command(args.out)
    except TurboTrtError:
        return 0
    keep = ("LD_LIBRARY_PATH", "TURBO_TRT_SITE_DIRS")
    print("or with PyTriton's tritonserver binary, here:")
    print(" ".join(f"{k}={shlex.quote(env[k])}" for k in keep) + " " + shlex.join(argv))
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
    _add_serve(sub)
    _add_export_triton(sub)
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
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "export-triton":
            return _run_export_triton(args)
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
