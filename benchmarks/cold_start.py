"""Cold start in a fresh process (verify, deserialize, allocate, capture, first image), with or without
TensorRT-RTX's runtime cache: `python -m turbo_trt.benchmarks.cold_start --engines DIR [--no-runtime-cache]`
prints one JSON line. `turbo-trt bench` runs it twice in child processes, so neither figure inherits the
bench process's warm CUDA context or JIT state."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def measure_in_child(engines: Path, executor: str, steps: int, runtime_cache: bool, strict_targets: bool,
                     timeout: float = 900) -> dict[str, Any]:
    command = [sys.executable, "-m", "turbo_trt.benchmarks.cold_start", "--engines", str(engines),
               "--executor", executor, "--steps", str(steps)]
    command += [] if runtime_cache else ["--no-runtime-cache"]
    command += [] if strict_targets else ["--ignore-targets"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    from .bench import BenchOptions, _load, _Memory

    parser = argparse.ArgumentParser(prog="python -m turbo_trt.benchmarks.cold_start")
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--executor", default="tensorrt")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--no-runtime-cache", dest="runtime_cache", action="store_false")
    parser.add_argument("--ignore-targets", action="store_true")
    args = parser.parse_args(argv)
    opts = BenchOptions(engines=args.engines, executor=args.executor, steps=args.steps,
                        strict_targets=not args.ignore_targets)
    pipe, timings, _ = _load(opts, args.executor, _Memory(False), runtime_cache=args.runtime_cache)
    cold: dict[str, Any] = dict(timings)
    engines = getattr(pipe.executor, "engines", None)
    cold["runtime_cache_loaded"] = bool(getattr(engines, "cache_loaded", False))
    pipe.close()
    print(json.dumps(cold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
