"""What fusing ControlNets into the UNet costs: bundles with 0, 1, 2, ... nets side by side.

    python -m turbo_trt.benchmarks.controlnet_report --bundle PLAIN --bundle ONE_NET [--bundle TWO_NETS]
        --out benchmarks/results/controlnet-NAME [--latency-iterations 10]

Per bundle: the UNet's FLOPs per image per step counted from its ONNX graph (benchmarks/flops.py), its
export, validation and engine-build figures and engine size from the manifest, and, with
--latency-iterations, wall time per stage on the ONNX Runtime CPU executor (run_profiled: the full path,
text encoders included; a ControlNet bundle is run with control images at scale 1 for every net).
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from .environment import environment
from .flops import graph_flops


def bundle_figures(bundle: Path, iterations: int) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    batch = int(manifest["shapes"]["batch"])
    engine = bundle / unet["engine"] if unet.get("engine") else None
    out: dict[str, Any] = {
        "bundle": str(bundle), "model": manifest["model"]["argument"],
        "controlnets": [net["argument"] for net in manifest.get("controlnets", [])],
        "unet_flops_per_image_step": graph_flops(bundle / unet["onnx"]) // batch,
        "unet_onnx_bytes": sum((bundle / f).stat().st_size for f in unet["onnx_files"]),
        "unet_export_seconds": unet.get("export_seconds"), "unet_reference_seconds": unet.get("reference_seconds"),
        "unet_rel_error": unet["validation"]["outputs"]["next_latents"]["rel_error"],
        "unet_engine_bytes": engine.stat().st_size if engine is not None and engine.is_file() else None,
        "unet_engine_build_seconds": unet.get("build_seconds"),
        "unet_engine_build_peak_rss_mib": unet.get("engine_build_peak_rss_mib"),
        "unet_export_peak_rss_mib": unet.get("peak_rss_mib_after_export"),
    }
    if iterations:
        out["cpu_stage_seconds"] = _latency(bundle, iterations)
    return out


def _latency(bundle: Path, iterations: int) -> dict[str, dict[str, float]]:
    import numpy as np

    from turbo_trt.runner.inputs import latent_shape, make_noise
    from turbo_trt.runner.pipeline import TurboPipeline

    pipe = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    shapes = pipe.shapes
    plan = pipe.plan(1, None)
    control = None
    if pipe.controlnets:
        images = [np.random.default_rng(i).integers(0, 256, (shapes["height"], shapes["width"], 3), dtype=np.uint8)
                  for i in range(pipe.controlnets)]
        control = pipe.control(plan, images, 1.0)
    ids = pipe.token_ids(["a photo of an astronaut riding a horse on mars"])
    samples: dict[str, list[float]] = {}
    for i in range(iterations + 1):
        noise = make_noise(i, latent_shape(shapes), False, plan.runs if pipe.scheduler["ancestral"] else 0)
        timings = pipe.executor.run_profiled(ids, plan, noise, None, control)
        if i == 0:
            continue  # the first call pays ONNX Runtime's first-run costs
        for label, seconds in timings:
            samples.setdefault(label, []).append(seconds)
    pipe.close()
    return {label: {"p50_ms": round(1e3 * statistics.median(v), 3), "min_ms": round(1e3 * min(v), 3)}
            for label, v in samples.items()}


def report_markdown(figures: list[dict[str, Any]], env: dict[str, Any]) -> str:
    base = figures[0]
    lines = [
        "# ControlNet fused into the UNet: cost per net",
        "",
        f"- machine: {env['machine']['cpu']}, {env['machine']['cores']} cores, {env['machine']['memory_gib']} GiB; "
        f"GPU: {env['gpu'] or 'none'}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- commit: {env['commit']}",
        "",
        "| bundle | nets | UNet GFLOP / image / step | vs plain | UNet ONNX MiB | engine MiB | export s | "
        "engine build s | rel. error vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mib = lambda n: "-" if n is None else f"{n / 2**20:.1f}"  # noqa: E731
    for f in figures:
        ratio = f["unet_flops_per_image_step"] / base["unet_flops_per_image_step"]
        lines.append(f"| {Path(f['bundle']).name} | {len(f['controlnets'])} | {f['unet_flops_per_image_step'] / 1e9:.3f} "
                     f"| {ratio:.3f}x | {mib(f['unet_onnx_bytes'])} | {mib(f['unet_engine_bytes'])} | "
                     f"{f['unet_export_seconds']} | {f['unet_engine_build_seconds'] or '-'} | {f['unet_rel_error']:.2e} |")
    if all("cpu_stage_seconds" in f for f in figures):
        labels = [label for label in figures[0]["cpu_stage_seconds"]]
        lines += ["", "CPU wall time per stage, 1 step, ONNX Runtime executor (p50 ms; ControlNet bundles with "
                  "control images at scale 1):", "", "| stage | " + " | ".join(Path(f["bundle"]).name for f in figures)
                  + " |", "|---|" + "---|" * len(figures)]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(str(f["cpu_stage_seconds"].get(label, {}).get("p50_ms", "-"))
                                                    for f in figures) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", required=True,
                        help="a bundle; the first is the baseline (plain), the others ControlNet bundles")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument("--latency-iterations", type=int, default=0, help="CPU latency samples per bundle (0: none)")
    args = parser.parse_args(argv)
    figures = [bundle_figures(b, args.latency_iterations) for b in args.bundle]
    env = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "bundles": figures}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report_markdown(figures, env))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
