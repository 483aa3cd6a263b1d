"""`turbo-trt export-triton`: a Triton model repository for a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TurboTrtError
from .common import EXECUTOR_HELP, HelpFormatter, defaults, executors


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..runner.serving.repository import ExportOptions

    d = defaults(ExportOptions)
    p = sub.add_parser(
        "export-triton",
        help="write a Triton model repository (Python backend) for a bundle",
        description="Write REPO/<model>/config.pbtxt (the same inputs and outputs as `turbo-trt serve`, dynamic "
                    "batching, one instance group per GPU) and REPO/<model>/1/model.py (Triton's Python "
                    "backend calling the turbo-trt runner), for `tritonserver --model-repository REPO` where "
                    "turbo-trt is installed. Prints how to start PyTriton's tritonserver binary on it here.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--engines", type=Path, required=True, help="bundle directory written by `turbo-trt build`")
    p.add_argument("--out", type=Path, required=True, help="model repository directory (created if missing)")
    p.add_argument("--model-name", default=d["model_name"], help="name of the model (its directory in REPO)")
    p.add_argument("--gpus", default=None,
                   help="GPU indices, one instance group each, e.g. 0,1,2,3; 'none' for CPU instances "
                        "(default: the GPUs nvidia-smi lists now, CPU instances when there are none)")
    p.add_argument("--instances", type=int, default=d["instances"], help="instances per GPU (or on the CPU)")
    p.add_argument("--executor", choices=executors(), default=d["executor"],
                   help="executor the model uses: " + EXECUTOR_HELP)
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")
    p.add_argument("--max-queue-delay-us", type=int, default=d["max_queue_delay_us"],
                   help="how long Triton's dynamic batcher waits to fill a batch (microseconds)")
    p.add_argument("--include-bundle", action="store_true",
                   help="copy the bundle into the repository (REPO/<model>/1/bundle) instead of referencing its path")
    p.add_argument("--force", action="store_true", help="replace an existing REPO/<model>")


def run(args: argparse.Namespace) -> int:
    import shlex

    from ..errors import UsageError
    from ..runner.serving.repository import ExportOptions, export_repository

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
        from ..runner.serving.tritonserver import server_command

        argv, env = server_command(args.out)
    except TurboTrtError:
        return 0
    keep = ("LD_LIBRARY_PATH", "TURBO_TRT_SITE_DIRS")
    print("or with PyTriton's tritonserver binary, here:")
    print(" ".join(f"{k}={shlex.quote(env[k])}" for k in keep) + " " + shlex.join(argv))
    return 0
