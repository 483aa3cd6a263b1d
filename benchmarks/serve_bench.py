"""Serving overhead and throughput: `turbo-trt serve` (`--backend`: python, the default, or pytriton) against
the same images through `TurboPipeline` directly.

    python -m turbo_trt.benchmarks.serve_bench --engines engines/tiny-sd-turbo \\
        --json benchmarks/results/serve-tiny-sd-turbo-cpu.json --report benchmarks/results/serve-tiny-sd-turbo-cpu.md

For each instance count a real server is started (free loopback ports), warmed up, and driven by 1, 2, 4
and 8 concurrent gRPC clients; each client sends its requests one after another and times each one from
send to decoded image. The direct baseline runs the same prompts and seeds through pipelines in this
process: one thread for latency, then one fork per thread for throughput. Every loop is bounded in count.
The clients run on the same machine as the server, so on a small CPU they take cores from it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from turbo_trt.fsutil import atomic_write_bytes

from .environment import environment, write_results
from .stats import summarize

PROMPTS = ["a red cat on a sofa", "a lighthouse at dusk", "a bowl of fruit", "an astronaut riding a horse",
           "a city street in the rain", "a mountain lake", "a portrait of a dog", "a sailing boat"]


def free_ports(count: int) -> list[int]:
    """`count` loopback ports free right now (the server binds them a moment later)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _request(i: int) -> tuple[str, int]:
    return PROMPTS[i % len(PROMPTS)], 1000 + i


def _metrics(port: int) -> dict[str, float]:
    """Triton's cumulative counters for model "turbo" (Prometheus text)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_duration_us",
             "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us")
    out = {}
    for name in names:
        match = re.search(rf'^{name}{{model="turbo",version="1"}} (\S+)$', text, re.MULTILINE)
        out[name] = float(match.group(1)) if match else float("nan")
    return out


def _start_server(engines: Path, instances: int, executor: str, log: Path,
                  backend: str = "python") -> tuple[subprocess.Popen[bytes], int, int]:
    http, grpc, metrics = free_ports(3)
    argv = [sys.executable, "-m", "turbo_trt.cli", "serve", "--engines", str(engines), "--executor", executor,
            "--backend", backend,
            "--instances", str(instances), "--address", "127.0.0.1", "--http-port", str(http),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
            if client.is_server_ready():
                client.close()
                return proc, grpc, metrics
            client.close()
        except Exception:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready after 180 s; see {log}")


def _served_run(grpc_port: int, clients: int, per_client: int, steps: int) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    from turbo_trt.runner.serving.client import request_inputs

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client_loop(c: int) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            for k in range(per_client):
                prompt, seed = _request(c * per_client + k)
                start = time.perf_counter()
                result = client.infer("turbo", request_inputs(grpcclient, prompt, seed=seed, steps=steps),
                                      client_timeout=120)
                image = result.as_numpy("image")
                latencies[c].append(time.perf_counter() - start)
                if image is None or image.ndim != 4:
                    errors.append(f"client {c} request {k}: no image")
        except Exception as exc:  # noqa: BLE001 - recorded in the result
            errors.append(f"client {c}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - start
    samples = [x for per in latencies for x in per]
    return {"clients": clients, "images": len(samples), "seconds": wall, "images_per_s": len(samples) / wall,
            "latency": summarize(samples) if samples else None, "errors": errors, "samples": samples}


def _direct_run(pipes: list[Any], threads_count: int, per_thread: int, steps: int) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(threads_count)]

    def loop(t: int) -> None:
        pipe = pipes[t % len(pipes)]
        for k in range(per_thread):
            prompt, seed = _request(t * per_thread + k)
            start = time.perf_counter()
            pipe(prompt, num_inference_steps=steps, seed=seed, output_type="np")
            latencies[t].append(time.perf_counter() - start)

    threads = [threading.Thread(target=loop, args=(t,), daemon=True) for t in range(threads_count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - start
    samples = [x for per in latencies for x in per]
    return {"threads": threads_count, "pipelines": len(pipes), "images": len(samples), "seconds": wall,
            "images_per_s": len(samples) / wall, "latency": summarize(samples), "samples": samples}


def run(engines: Path, instances: list[int], clients: list[int], per_client: int, steps: int, executor: str,
        log_dir: Path, note: str | None, rounds: int = 5, backend: str = "python") -> dict[str, Any]:
    from turbo_trt.runner.pipeline import TurboPipeline

    load_before = os.getloadavg()
    pipe = TurboPipeline.from_bundle(engines, executor=executor)
    for i in range(10):  # warm-up
        pipe(*_request(i)[:1], seed=i, num_inference_steps=steps, output_type="np")
    direct = [_direct_run([pipe], 1, per_client * 2, steps)]
    forks = [pipe] + [pipe.fork() for _ in range(max(instances) - 1)]
    for n in instances:
        if n > 1:
            direct.append(_direct_run(forks[:n], n, per_client, steps))
    served = []
    paired: dict[str, list[float]] = {"direct": [], "served": []}
    server_side: dict[str, float] = {}
    for n in instances:
        log = log_dir / f"serve-{n}.log"
        proc, grpc_port, metrics_port = _start_server(engines, n, executor, log, backend)
        try:
            _served_run(grpc_port, 1, 10, steps)  # warm the connection path
            if n == 1:
                # The overhead at one client: direct and served blocks alternate, so the other load on a
                # shared machine falls on both alike.
                before = _metrics(metrics_port)
                for _ in range(rounds):
                    paired["direct"] += _direct_run([pipe], 1, per_client, steps)["samples"]
                    paired["served"] += _served_run(grpc_port, 1, per_client, steps)["samples"]
                    after = _metrics(metrics_port)
                    for key, value in after.items():
                        server_side[key] = server_side.get(key, 0.0) + value - before[key]
                    before = _metrics(metrics_port)  # the direct block adds nothing; re-read to be exact
            for c in clients:
                row = _served_run(grpc_port, c, per_client, steps)
                row["instances"] = n
                served.append(row)
                print(f"instances {n} clients {c}: {row['images_per_s']:.1f} images/s, "
                      f"p50 {row['latency']['p50_ms']:.2f} ms", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(120)
    paired_summary = {name: summarize(samples) for name, samples in paired.items() if samples}
    overhead = (paired_summary["served"]["p50_ms"] / paired_summary["direct"]["p50_ms"] - 1.0
                if len(paired_summary) == 2 else None)
    for row in [*direct, *served]:
        row.pop("samples", None)
    return {
        "schema": "turbo-trt-serve-bench/1",
        "environment": environment(),
        "bundle": {"path": str(engines), "model": pipe.bundle.manifest["model"].get("id"), "shapes": pipe.shapes},
        "executor": pipe.executor.name,
        "settings": {"backend": backend, "steps": steps, "requests_per_client": per_client, "protocol": "grpc",
                     "instances": instances, "clients": clients},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": note,
        "direct": direct,
        "served": served,
        "one_client_alternating": paired_summary,
        "overhead_p50_one_client": overhead,
        "one_client_server_side": _server_side(server_side, paired["served"]),
    }


def _server_side(counters: dict[str, float], client_samples: list[float]) -> dict[str, float] | None:
    """Where a one-client request's time goes, from Triton's counters over the same requests: the model
    call itself (compute_infer) against the client's whole round trip."""
    executions = counters.get("nv_inference_exec_count", 0.0)
    if not executions or not client_samples:
        return None
    compute = counters["nv_inference_compute_infer_duration_us"] / executions / 1e3
    request = counters["nv_inference_request_duration_us"] / counters["nv_inference_count"] / 1e3
    client = 1e3 * sum(client_samples) / len(client_samples)
    return {"requests": counters["nv_inference_count"], "client_mean_ms": client, "triton_request_mean_ms": request,
            "model_compute_mean_ms": compute, "outside_model_mean_ms": client - compute,
            "outside_model_share": (client - compute) / client}


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# Serving: {result['bundle']['model']} on Triton (`turbo-trt serve`), {result['executor']}",
        "",
        f"- machine: {env['machine']['cpu']}, {env['machine']['cores']} cores; GPU: {env['gpu'] or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- commit: {env['commit']}",
        f"- settings: {result['settings']}; shapes {result['bundle']['shapes']}",
        f"- load average before/after: {result['load_average_before']} / {result['load_average_after']}",
    ]
    if result.get("note"):
        lines.append(f"- note: {result['note']}")
    lines += ["", "## Direct `TurboPipeline` (same prompts and seeds)", "",
              "| threads | pipelines | images | images/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for r in result["direct"]:
        lat = r["latency"]
        lines.append(f"| {r['threads']} | {r['pipelines']} | {r['images']} | {r['images_per_s']:.1f} | "
                     f"{lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} |")
    lines += ["", "## Served (gRPC clients on the same machine)", "",
              "| instances | clients | images | images/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in result["served"]:
        lat = r["latency"] or {"p50_ms": float("nan"), "p99_ms": float("nan")}
        lines.append(f"| {r['instances']} | {r['clients']} | {r['images']} | {r['images_per_s']:.1f} | "
                     f"{lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | {len(r['errors'])} |")
    paired = result["one_client_alternating"]
    if result["overhead_p50_one_client"] is not None:
        lines += ["", "## One client, direct and served blocks alternating", "",
                  "| path | images | p50 ms | p99 ms |", "|---|---|---|---|"]
        for name in ("direct", "served"):
            lines.append(f"| {name} | {paired[name]['n']:.0f} | {paired[name]['p50_ms']:.2f} | {paired[name]['p99_ms']:.2f} |")
        lines += ["", f"Serving overhead at one client (p50 served / p50 direct - 1): "
                      f"{100 * result['overhead_p50_one_client']:.1f} %"]
    side = result.get("one_client_server_side")
    if side:
        lines += ["", f"Same served requests by Triton's counters: client round trip {side['client_mean_ms']:.2f} ms "
                      f"mean, Triton request {side['triton_request_mean_ms']:.2f} ms, model call (compute_infer) "
                      f"{side['model_compute_mean_ms']:.2f} ms: {side['outside_model_mean_ms']:.2f} ms "
                      f"({100 * side['outside_model_share']:.1f} %) outside the model call."]
    if result.get("reading"):
        lines += ["", "## Reading", "", result["reading"]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, help="bundle directory (not needed with --render)")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="alternating direct/served blocks at one client")
    parser.add_argument("--executor", default="auto")
    parser.add_argument("--backend", choices=["python", "pytriton"], default="python",
                        help="`turbo-trt serve --backend` (the recorded results before it existed used pytriton)")
    parser.add_argument("--note", default=None, help="free text recorded with the result (e.g. machine load)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite --report from an existing --json (e.g. after adding a 'reading' to it)")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.json.read_text())
        atomic_write_bytes(args.report, markdown(result).encode())
        return 0
    if args.engines is None:
        parser.error("--engines is required")
    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="turbo-trt-serve-bench-"))
    print(f"server logs: {log_dir}", file=sys.stderr)
    result = run(args.engines, args.instances, args.clients, args.requests_per_client, args.steps, args.executor,
                 log_dir, args.note, args.rounds, args.backend)
    write_results(result, args.json, args.report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
