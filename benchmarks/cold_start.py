"""Cold start in a fresh process (verify, deserialize, allocate, capture, first image), with or without
TensorRT-RTX's runtime cache: `python -m turbo_trt.benchmarks.cold_start --engines DIR --json OUT [--no-runtime-cache]`
writes one JSON object. `turbo-trt bench` runs it twice in child processes, so neither figure inherits the
bench process's warm CUDA context or JIT state."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def measure_in_child(engines: Path, executor: str, steps: int, runtime_cache: bool, strict_targets: bool,
                     timeout: float = 900) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="turbo-trt-cold-") as tmp:
        result = Path(tmp) / "cold.json"
        command = [sys.executable, "-m", "turbo_trt.benchmarks.cold_start", "--engines", str(engines),
                   "--executor", executor, "--steps", str(steps), "--json", str(result)]
        command += [] if runtime_cache else ["--no-runtime-cache"]
        command += [] if strict_targets else ["--ignore-targets"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s"}
        if done.returncode != 0 or not result.is_file():
            lines = (done.stderr + done.stdout).strip().splitlines()
            return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
        return dict(json.loads(result.read_text()))


def main(argv: list[str] | None = None) -> int:
    from .bench import BenchOptions, _load, _Memory

    parser = argparse.ArgumentParser(prog="python -m turbo_trt.benchmarks.cold_start")
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--executor", default="tensorrt")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--no-runtime-cache", dest="runtime_cache", action="store_false")
    parser.add_argument("--ignore-targets", action="store_true")
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    args = parser.parse_args(argv)
    opts = BenchOptions(engines=args.engines, executor=args.executor, steps=args.steps,
                        strict_targets=not args.ignore_targets)
    pipe, timings, _ = _load(opts, args.executor, _Memory(False), runtime_cache=args.runtime_cache)
    cold: dict[str, Any] = dict(timings)
    engines = getattr(pipe.executor, "engines", None)
    cold["runtime_cache_loaded"] = bool(getattr(engines, "cache_loaded", False))
    pipe.close()
    args.json.write_text(json.dumps(cold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
