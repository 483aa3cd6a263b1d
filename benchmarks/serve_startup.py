"""What each `turbo-trt serve` backend costs to start and to hold: seconds from launch to ready, and the
memory of the whole process tree once ready, for 1 and 2 instances.

    python -m turbo_trt.benchmarks.serve_startup --engines engines/tiny-sd-turbo --executor onnxruntime \\
        --json benchmarks/results/serve-startup-tiny-sd-turbo-cpu.json \\
        --report benchmarks/results/serve-startup-tiny-sd-turbo-cpu.md

Each run starts a real server (free loopback ports), polls `/v2/health/ready` every 50 ms, then sums the
proportional set size (PSS, `/proc/PID/smaps_rollup`: shared pages split between the processes that map
them) over the serving process and all its descendants (tritonserver, one Python-backend stub per instance),
then stops it with SIGTERM and times the exit. On a CPU the figure is host memory (the ONNX Runtime
executor); on a GPU the same structure holds for device memory: `--backend python` loads the engines once
per instance, `--backend pytriton` once per process (forks share the weights). Every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from turbo_trt.runner.serving.tritonserver import http_ready, kill_tree, process_tree

from .environment import environment, write_results
from .serve_bench import free_ports

START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60


def _memory_kib(pids: list[int]) -> dict[str, int]:
    totals = {"pss_kib": 0, "rss_kib": 0}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                totals[f"{key.lower()}_kib"] += int(rest.split()[0])
    return totals


def one_start(engines: Path, backend: str, instances: int, executor: str, log: Path) -> dict[str, Any]:
    http, grpc, metrics = free_ports(3)
    argv = [sys.executable, "-m", "turbo_trt.cli", "serve", "--engines", str(engines), "--backend", backend,
            "--executor", executor, "--instances", str(instances), "--address", "127.0.0.1",
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    with open(log, "wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            while not http_ready("127.0.0.1", http):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
                if time.monotonic() - start > START_TIMEOUT_S:
                    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s; see {log}")
                time.sleep(0.05)
            ready_s = time.monotonic() - start
            time.sleep(1.0)  # let the last allocations of the warm-up settle
            pids = process_tree(proc.pid)
            memory = _memory_kib(pids)
            stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(STOP_TIMEOUT_S)
            return {"ready_s": ready_s, "stop_s": time.monotonic() - stop, "processes": len(pids), **memory}
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


def run(engines: Path, backends: list[str], instances: list[int], repeats: int, executor: str,
        note: str | None) -> dict[str, Any]:
    manifest = json.loads((engines / "manifest.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-startup-") as tmp:
        load_before = list(os.getloadavg())
        for backend in backends:
            for count in instances:
                runs = [one_start(engines, backend, count, executor, Path(tmp) / f"{backend}-{count}-{r}.log")
                        for r in range(repeats)]
                rows.append({
                    "backend": backend, "instances": count, "runs": runs,
                    "ready_s_median": statistics.median(r["ready_s"] for r in runs),
                    "pss_mib_median": statistics.median(r["pss_kib"] for r in runs) / 1024,
                    "rss_mib_median": statistics.median(r["rss_kib"] for r in runs) / 1024,
                    "processes": runs[0]["processes"],
                })
        load_after = list(os.getloadavg())
    return {
        "environment": environment(), "bundle": {"model": manifest["model"].get("id"), "shapes": manifest["shapes"]},
        "executor": executor, "settings": {"repeats": repeats, "backends": backends, "instances": instances},
        "load_average_before": load_before, "load_average_after": load_after, "note": note, "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# `turbo-trt serve` startup and memory per backend: {result['bundle']['model']}, {result['executor']}",
        "",
        f"- machine: {env['machine']['cpu']}, {env['machine']['cores']} cores; GPU: {env['gpu'] or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- commit: {env['commit']}",
        f"- settings: {result['settings']}; shapes {result['bundle']['shapes']}",
        f"- load average before/after: {result['load_average_before']} / {result['load_average_after']}",
    ]
    if result.get("note"):
        lines.append(f"- note: {result['note']}")
    lines += ["", "Launch to `/v2/health/ready` (bundle check, load, warm-up, Triton start) and the process tree's "
              "memory once ready (PSS: shared pages split between processes; RSS: counted in each). Medians.", "",
              "| backend | instances | processes | ready s | PSS MiB | RSS MiB | runs (ready s) |",
              "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        runs = ", ".join(f"{r['ready_s']:.1f}" for r in row["runs"])
        lines.append(f"| {row['backend']} | {row['instances']} | {row['processes']} | {row['ready_s_median']:.1f} | "
                     f"{row['pss_mib_median']:.0f} | {row['rss_mib_median']:.0f} | {runs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, required=True, help="bundle directory")
    parser.add_argument("--backends", nargs="+", default=["python", "pytriton"])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--executor", default="auto")
    parser.add_argument("--note", default=None, help="free text recorded with the result (e.g. machine load)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.engines, args.backends, args.instances, args.repeats, args.executor, args.note)
    write_results(result, args.json, args.report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
