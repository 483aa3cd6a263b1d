"""Measure a build: wall time per stage and peak memory, written as JSON + Markdown to results/.

    python -m turbo_trt.benchmarks.build_report --model sd-turbo --random-weights --flavor tensorrt-rtx

The build runs in this process (a fresh bundle directory unless --out is given), so the peak RSS is the
build's own. Per-component figures come from the manifest the build wrote.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from turbo_trt.fsutil import atomic_write_bytes, peak_rss_mib
from turbo_trt.progress import Progress

from .environment import environment


def measure(model: str, random_weights: bool, flavor: str | None, out: Path, height: int, width: int,
            vae: str | None = None) -> dict[str, Any]:
    from turbo_trt.builder.build import build
    from turbo_trt.builder.options import BuildOptions
    from turbo_trt.manifest import read_manifest

    start = time.perf_counter()
    report = build(BuildOptions(model=model, random_weights=random_weights, flavor=flavor, out=out,
                                height=height, width=width, force=True, vae=vae), Progress())
    total = time.perf_counter() - start
    manifest = read_manifest(out)
    components = {}
    for name, entry in manifest["components"].items():
        sizes = {rel: (out / rel).stat().st_size for rel in entry["onnx_files"] + entry.get("engine_files", [])}
        components[name] = {
            "precision": entry["precision"],
            "reference_seconds": entry.get("reference_seconds"),
            "export_and_validate_seconds": entry["export_seconds"],
            "engine_build_seconds": entry.get("build_seconds"),
            "peak_rss_mib_after_export": entry.get("peak_rss_mib_after_export"),
            "engine_build_peak_rss_mib": entry.get("engine_build_peak_rss_mib"),
            "cosine": {k: v["cosine"] for k, v in entry["validation"]["outputs"].items()},
            "rel_error": {k: v.get("rel_error") for k, v in entry["validation"]["outputs"].items()},
            "file_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()},
        }
    return {
        "what": "turbo-trt build",
        "model": model, "random_weights": random_weights, "vae": manifest["vae"].get("source"),
        "flavor": (manifest.get("engine") or {}).get("flavor"),
        "shapes": manifest["shapes"], "engine": manifest.get("engine"),
        "total_seconds": round(total, 1), "pipeline_load_seconds": report.load_seconds,
        "peak_rss_mib": peak_rss_mib(),
        "components": components, "exported": report.exported, "engines_built": report.engines_built,
        "environment": environment(),
    }


def to_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# Build: {result['model']}{' (random weights)' if result['random_weights'] else ''}, flavor {result['flavor']}",
        "",
        f"- machine: {env['machine']['cpu']}, {env['machine']['cores']} cores, {env['machine']['memory_gib']} GiB; "
        f"GPU: {env['gpu']['name'] if env['gpu'] else 'none'}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- commit: {env['commit']}",
        f"- shapes: {result['shapes']['batch']} x {result['shapes']['height']}x{result['shapes']['width']}",
        *([f"- VAE: {result['vae']['class']} ({result['vae']['kind']} {result['vae']['id']}, --vae "
           f"{result['vae']['argument']})"] if (result.get("vae") or {}).get("argument") else []),
        f"- total wall time: {result['total_seconds']} s (pipeline load/initialization "
        f"{result.get('pipeline_load_seconds', '?')} s); peak RSS of the build process: "
        f"{result['peak_rss_mib'] / 1024:.1f} GiB",
        "",
        "| component | precision | FP32 reference (s) | export + validate (s) | engine build (s) "
        "| peak RSS: exporter after export / engine builder (GiB) | cosine vs FP32 | files (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in result["components"].items():
        rss = [c["peak_rss_mib_after_export"], c["engine_build_peak_rss_mib"]]
        rss_text = " / ".join(f"{v / 1024:.1f}" if v else "-" for v in rss)
        cos = ", ".join(f"{v:.6f}" for v in c["cosine"].values())
        files = ", ".join(f"{Path(k).name} {v}" for k, v in c["file_mib"].items())
        lines.append(f"| {name} | {c['precision']} | {c.get('reference_seconds') or '-'} | {c['export_and_validate_seconds']} | "
                     f"{c['engine_build_seconds'] or '-'} | {rss_text} | {cos} | {files} |")
    lines += ["", "Peak RSS: the exporting process's running maximum (ru_maxrss) after each export, and the peak of "
              "the child process that built each engine."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--flavor", default=None)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vae", default=None, help="as `turbo-trt build --vae` (tiny, a hub id or a directory)")
    parser.add_argument("--out", type=Path, default=None, help="bundle directory (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="results file stem")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="turbo-trt-build-") as tmp:
        out = args.out or Path(tmp) / "bundle"
        result = measure(args.model, args.random_weights, args.flavor, out, args.height, args.width, args.vae)
    stem = args.name or f"build-{args.model.replace('/', '-')}{'-random' if args.random_weights else ''}-{result['flavor']}"
    atomic_write_bytes(args.results / f"{stem}.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.results / f"{stem}.md", to_markdown(result).encode())
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
