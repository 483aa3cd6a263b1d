"""`turbo-trt bench`: latency report with diffusers baselines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import EXECUTOR_HELP, HelpFormatter, defaults, executors


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..benchmarks.bench import BenchOptions

    d = defaults(BenchOptions)
    p = sub.add_parser(
        "bench",
        help="latency report for a bundle, with diffusers baselines in the same run",
        description="Warm up, then time end-to-end images (CUDA graphs on a GPU, ONNX Runtime on the CPU), "
                    "per-stage times, cold start, throughput, memory and FLOP efficiency; diffusers eager "
                    "(and torch.compile with --compile) on the same model and settings for the speedup.",
        formatter_class=HelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", type=Path, help="bundle directory")
    source.add_argument("--model", help="build this model first (as `turbo-trt build --model`), then bench it")
    p.add_argument("--random-weights", action="store_true", help="with --model: full-size random weights")
    p.add_argument("--flavor", choices=["tensorrt", "tensorrt-rtx"], default=None, help="with --model: engine flavor")
    p.add_argument("--vae", default=None, metavar="tiny|ID|DIR", help="with --model: as `turbo-trt build --vae`")
    p.add_argument("--executor", choices=executors(), default=d["executor"], help=EXECUTOR_HELP)
    p.add_argument("--steps", type=int, default=d["steps"], help="inference steps (1..4)")
    p.add_argument("--iterations", type=int, default=d["iterations"], help="timed images per measurement")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="untimed images first")
    p.add_argument("--parallel", type=int, default=d["parallel"], help="throughput with 1..N runners in threads")
    p.add_argument("--prompt", default=d["prompt"])
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers eager baseline")
    p.add_argument("--compile", action="store_true", help="also time diffusers under torch.compile (max-autotune)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for the efficiency column (default: data-sheet FP16 peak of known GPUs)")
    p.add_argument("--quick", action="store_true",
                   help="short GPU sessions: throughput with one runner only and no cold starts in child processes")
    p.add_argument("--ignore-targets", action="store_true", help="run engines outside their built targets")
    p.add_argument("--json", type=Path, default=None, help="write the full result as JSON (schema turbo-trt-bench/1)")
    p.add_argument("--report", type=Path, default=None, help="write a Markdown report")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG: per-stage bars and latency histogram")


def _partial_writer(path: Path | None) -> Callable[[dict[str, Any]], None] | None:
    """With --json: the results so far rewritten (atomically) after each stage, "complete": false until the end."""
    if not path:
        return None
    import json

    from ..fsutil import atomic_write_bytes

    return lambda result: atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())


def run(args: argparse.Namespace) -> int:
    import json

    from ..benchmarks.bench import BenchOptions, run_bench
    from ..benchmarks.report import markdown, plot, terminal
    from ..fsutil import atomic_write_bytes

    engines = args.engines
    if args.model:
        from ..builder.build import build
        from ..builder.options import BuildOptions
        from ..progress import Progress

        engines = build(BuildOptions(model=args.model, random_weights=args.random_weights, flavor=args.flavor,
                                     vae=args.vae),
                        Progress()).bundle
    baselines: tuple[str, ...] = () if args.no_baseline else ("diffusers",)
    if args.compile:
        baselines += ("compile",)
    result = run_bench(BenchOptions(
        engines=engines, executor=args.executor, steps=args.steps, iterations=args.iterations, warmup=args.warmup,
        parallel=args.parallel, prompt=args.prompt, baselines=baselines, peak_tflops=args.peak_tflops,
        strict_targets=not args.ignore_targets, quick=args.quick,
    ), log=lambda message: print(message, file=sys.stderr), partial=_partial_writer(args.json))
    print(terminal(result))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    if args.report:
        atomic_write_bytes(args.report, markdown(result).encode())
    if args.plot:
        plot(result, args.plot)
    return 0
