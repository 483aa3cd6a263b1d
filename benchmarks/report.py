"""Bench output: a terminal table, a Markdown report and a PNG plot from one result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _header(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    engine = result["bundle"].get("engine") or {}
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    shapes = result["bundle"]["shapes"]
    return [
        f"model {result['bundle']['model']} ({result['bundle']['kind']}), batch {shapes['batch']}, "
        f"{shapes['width']}x{shapes['height']}, {result['settings']['steps']} step(s), guidance 0",
        f"executor {result['executor']} on {result['device']}"
        + (f"; engines {engine.get('flavor')} {engine.get('version')}" if engine else ""),
        f"machine {env['machine']['cpu']} ({env['machine']['cores']} cores)"
        + (f"; GPU {env['gpu']['name']}, driver {env['gpu'].get('driver')}" if env.get("gpu") else "; no GPU"),
        f"versions: {versions}", f"commit {env['commit']}",
    ]


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for label, s in [("end-to-end (text encoder every call)", result["latency"]),
                     ("end-to-end (repeated prompt, cached)", result["latency_cached_prompt"])]:
        rows.append((label, _ms(s["mean_ms"]), _ms(s["p50_ms"]), _ms(s["p90_ms"]), _ms(s["p99_ms"]),
                     _ms(s["max_ms"]), _ms(s["stdev_ms"])))
    for base in result["baselines"]:
        if "latency" in base:
            s = base["latency"]
            rows.append((f"{base['name']} ({base['precision']})", _ms(s["mean_ms"]), _ms(s["p50_ms"]),
                         _ms(s["p90_ms"]), _ms(s["p99_ms"]), _ms(s["max_ms"]), _ms(s["stdev_ms"])))
    return rows


def check_lines(checks: dict[str, Any]) -> list[str]:
    if "kind" in checks:
        return [f"- {checks['kind']}"]
    lines = [f"- CUDA graphs captured: {checks['graphs_captured']} (capture failed: {checks['graph_capture_failed']}; "
             f"images run with plain enqueues instead: {checks.get('plain_enqueue_fallbacks', 0)})",
             f"- device bytes allocated during the timed images: {checks['device_bytes_allocated_during_timed_images']}"]
    if checks.get("tensorrt_allocations_during_timed_images") is not None:
        lines.append("- allocations TensorRT asked its allocator for during the timed images: "
                     f"{checks['tensorrt_allocations_during_timed_images']}")
    for mode, c in checks["graph_vs_plain_enqueue"].items():
        lines.append(f"- {mode}: graph replay {'equals' if c['bit_equal'] else 'DIFFERS from'} plain enqueue "
                     f"(max abs diff {c['max_abs_diff']})")
    return lines


def load_lines(result: dict[str, Any]) -> list[str]:
    """Executor choice, runtime-cache cold starts, host memory while loading, device memory breakdown."""
    lines = []
    choice = result.get("executor_choice") or {}
    for name, why in (choice.get("passed_over") or {}).items():
        lines.append(f"- {name} passed over: {why}")
    if result.get("load_host_peak_rss_mib") is not None:
        lines.append(f"- peak host RSS while loading: {result['load_host_peak_rss_mib']} MiB")
    cache = result.get("cold_start_runtime_cache")
    if cache:
        for label in ("without", "with"):
            run = cache[label]
            lines.append(f"- cold start {label} the runtime cache (fresh process): "
                         + (f"{run['total_s']:.3f} s (first image {run['first_run_s']:.3f} s)" if "total_s" in run
                            else f"failed: {run.get('error')}"))
    if result.get("device_memory_line"):
        lines.append(f"- {result['device_memory_line']}")
    return lines


def terminal(result: dict[str, Any]) -> str:
    lines = _header(result) + [""]
    head = ("latency (ms)", "mean", "p50", "p90", "p99", "max", "stdev")
    rows = [head, *_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
    lines.append("")
    lines.append("stage            p50 ms   GFLOP   TFLOP/s   of peak")
    eff = result["flops"]["stages"]
    for label, s in result["stages"].items():
        e = eff.get(label, {})
        share = f"{e['share_of_peak'] * 100:.1f}%" if e.get("share_of_peak") is not None else "-"
        lines.append(f"{label:<15} {_ms(s['p50_ms']):>7} {e.get('gflop_per_image', 0):>7} "
                     f"{e.get('achieved_tflops', 0):>9} {share:>9}")
    for base in result["baselines"]:
        if "speedup_p50" in base:
            lines.append(f"speedup vs {base['name']}: {base['speedup_p50']}x (p50)")
        elif "error" in base:
            lines.append(f"baseline {base['name']}: not run ({base['error']})")
    cold = result["cold_start"]
    lines.append("cold start: " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in cold.items()))
    lines.append("throughput: " + ", ".join(f"{t['runners']} runner(s) {t['images_per_s']} img/s"
                                            for t in result["throughput"]))
    lines += [line[2:] for line in load_lines(result) + check_lines(result.get("checks", {}))]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    out = ["# turbo-trt bench", ""] + [f"- {line}" for line in _header(result)] + [""]
    out += ["## End-to-end latency (ms)", "", "| what | mean | p50 | p90 | p99 | max | stdev |", "|---|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    for base in result["baselines"]:
        if "speedup_p50" in base:
            out.append(f"\n**{base['speedup_p50']}x** faster than {base['name']} (p50).")
        elif "error" in base:
            out.append(f"\nBaseline {base['name']} not run: {base['error']}.")
    peak = result["flops"]["peak_tflops"]
    out += ["", "## Stages", "", f"Device peak: {peak if peak else 'unknown'} TFLOP/s ({result['flops']['peak_source']}); "
            "FLOPs counted from the ONNX graphs (Conv/MatMul/Gemm, 2 per multiply-add).", "",
            "| stage | p50 ms | mean ms | GFLOP/image | TFLOP/s | share of peak |", "|---|---|---|---|---|---|"]
    for label, s in result["stages"].items():
        e = result["flops"]["stages"].get(label, {})
        share = f"{e['share_of_peak'] * 100:.1f}%" if e.get("share_of_peak") is not None else "-"
        out.append(f"| {label} | {_ms(s['p50_ms'])} | {_ms(s['mean_ms'])} | {e.get('gflop_per_image', '-')} | "
                   f"{e.get('achieved_tflops', '-')} | {share} |")
    out += ["", "## Cold start (s)", "", "| " + " | ".join(result["cold_start"]) + " |",
            "|" + "---|" * len(result["cold_start"]),
            "| " + " | ".join(f"{v:.3f}" for v in result["cold_start"].values()) + " |"]
    out += [""] + load_lines(result)
    out += ["", "## Throughput", "", "| runners | images | seconds | images/s |", "|---|---|---|---|"]
    out += [f"| {t['runners']} | {t['images']} | {t['seconds']} | {t['images_per_s']} |" for t in result["throughput"]]
    mem = result["memory_mib"]
    out += ["", f"## Memory (MiB, {mem['kind']})", ""]
    out += [f"- {k}: {v}" for k, v in mem.items() if k != "kind"]
    out += ["", "## Checks", ""] + check_lines(result.get("checks", {}))
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-stage p50 bars and the end-to-end latency histogram, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from turbo_trt.fsutil import atomic_path

    fig, (bars, hist) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(result["stages"])
    bars.barh(labels, [result["stages"][k]["p50_ms"] for k in labels], color="#4c72b0")
    bars.invert_yaxis()
    bars.set_xlabel("p50 ms")
    bars.set_title(f"stages ({result['executor']}, {result['device']})")
    hist.hist(result["samples_ms"], bins=min(30, max(5, len(result["samples_ms"]) // 2)), color="#55a868")
    hist.axvline(result["latency"]["p50_ms"], color="k", linestyle="--", label="p50")
    hist.axvline(result["latency"]["p99_ms"], color="r", linestyle=":", label="p99")
    hist.set_xlabel("end-to-end ms")
    hist.set_ylabel("images")
    hist.legend()
    hist.set_title("latency")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
