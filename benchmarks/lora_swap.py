"""Measure a run-time LoRA swap on a refittable bundle with the ONNX Runtime (CPU) executor.

    turbo-trt build --model sd-turbo --random-weights --onnx-only --refittable --no-img2img --out /tmp/sdt
    python -m turbo_trt.benchmarks.lora_swap --engines /tmp/sdt --out benchmarks/results/lora-swap-sd-turbo-random-cpu

Two LoRAs (rank --rank) on every attention projection of the UNet (attn1/attn2 to_q, to_k, to_v, to_out.0)
and of the text encoder (q/k/v/out_proj) are written in diffusers' key format from the bundle's own weight
maps, then: apply A (first use: base values read from the graphs' data files), swap to B, back to A, and
restore the base. Each swap is split into reading + checking the LoRA files, merging (numpy), and the
executor's part (ONNX Runtime: re-creating the touched sessions with the new external initializers).
Writes <out>.json and <out>.md with the environment (machine, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

ATTENTION = {"unet": re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
             "text_encoder": re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")}


def write_attention_lora(maps: dict[str, Any], path: Path, rank: int, seed: int) -> int:
    """A diffusers-format LoRA on every attention projection; returns the number of modules."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for part, pattern in ATTENTION.items():
        for module, info in maps[part]["modules"].items():
            if pattern.search(module) and info["targets"]:
                out_features, in_features = info["shape"][:2]
                tensors[f"{part}.{module}.lora_A.weight"] = (rng.standard_normal((rank, in_features)) * 0.01).astype(np.float16)
                tensors[f"{part}.{module}.lora_B.weight"] = (rng.standard_normal((out_features, rank)) * 0.01).astype(np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 2


def timed_swap(pipe: Any, loras: dict[str | Path, float]) -> dict[str, Any]:
    """set_loras step by step (the same calls, each timed)."""
    state = pipe._lora_state[0]
    t0 = time.perf_counter()
    wanted = state.load(loras)
    t1 = time.perf_counter()
    updates = state.plan(wanted)
    t2 = time.perf_counter()
    state.begin(wanted)
    pipe.executor.set_weights(updates, state.current_weight)
    t3 = time.perf_counter()
    state.commit(loras, wanted)
    arrays = [v for changes in updates.values() for v in changes.values() if v is not None]
    restored = sum(1 for changes in updates.values() for v in changes.values() if v is None)
    return {
        "weights_changed": sum(len(c) for c in updates.values()), "weights_restored_to_base": restored,
        "bytes_sent": int(sum(a.nbytes for a in arrays)),
        "by_component": {c: len(v) for c, v in updates.items()},
        "seconds": {"read_and_check": round(t1 - t0, 3), "merge": round(t2 - t1, 3),
                    "executor": round(t3 - t2, 3), "total": round(t3 - t0, 3)},
    }


def main(argv: list[str] | None = None) -> int:
    from turbo_trt.benchmarks.environment import environment
    from turbo_trt.fsutil import atomic_write_bytes
    from turbo_trt.runner import TurboPipeline
    from turbo_trt.runner.lora import BundleLoras

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", type=Path, required=True, help="a bundle built with --refittable")
    parser.add_argument("--out", type=Path, required=True, help="results path without extension")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-image", action="store_true", help="skip the one-step images before and after")
    args = parser.parse_args(argv)

    import os

    load_before = os.getloadavg()
    start = time.perf_counter()
    pipe = TurboPipeline.from_bundle(args.engines, executor="onnxruntime")
    load_seconds = time.perf_counter() - start
    pipe._lora_state.append(BundleLoras(pipe.bundle.path, pipe.bundle.manifest))
    maps = pipe._lora_state[0].maps
    workdir = args.out.parent
    lora_a, lora_b = workdir / "lora-swap-a.tmp.safetensors", workdir / "lora-swap-b.tmp.safetensors"
    modules = write_attention_lora(maps, lora_a, args.rank, 1)
    write_attention_lora(maps, lora_b, args.rank, 2)
    file_bytes = lora_a.stat().st_size
    try:
        base_image = None if args.no_image else pipe("a cat", seed=0, output_type="np")
        steps = {
            "apply A (first use: base values read)": timed_swap(pipe, {lora_a: 1.0}),
            "swap A -> B": timed_swap(pipe, {lora_b: 1.0}),
            "swap B -> A at 0.5": timed_swap(pipe, {lora_a: 0.5}),
            "restore base": timed_swap(pipe, {}),
        }
        after = None if args.no_image else pipe("a cat", seed=0, output_type="np")
        restored_exact = None if base_image is None or after is None else bool(np.array_equal(base_image, after))
    finally:
        lora_a.unlink(missing_ok=True)
        lora_b.unlink(missing_ok=True)
    total_weights = {part: len(data["modules"]) for part, data in maps.items()}
    result = {
        "schema": "turbo-trt-lora-swap/1",
        "environment": environment(),
        "bundle": {"path": str(args.engines), "model": pipe.bundle.manifest["model"]["id"],
                   "kind": pipe.bundle.manifest["model"]["kind"], "shapes": pipe.bundle.shapes},
        "executor": pipe.executor.name,
        "lora": {"rank": args.rank, "modules": modules, "file_bytes": file_bytes,
                 "targets": "every attention projection: UNet attn1/attn2 to_q, to_k, to_v, to_out.0; "
                            "text encoder q/k/v/out_proj"},
        "mapped_weights": total_weights,
        "pipeline_load_seconds": round(load_seconds, 2),
        "steps": steps,
        "restore_bit_exact_image": restored_exact,
        # Other work on the machine during the run (1-minute load average; the machine has os.cpu_count() cores)
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    atomic_write_bytes(args.out.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# LoRA swap: {result['bundle']['model']} ({result['bundle']['kind']}), {result['executor']} executor",
        "",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cores']} cores; GPU: {env['gpu'] or 'none'}; "
        f"commit {env.get('commit')}; onnxruntime {env['versions'].get('onnxruntime')}.",
        "",
        f"LoRA: rank {result['lora']['rank']} on {result['lora']['modules']} modules "
        f"({result['lora']['targets']}), {result['lora']['file_bytes'] / 2**20:.1f} MiB file. "
        f"Weights in the bundle's maps: {result['mapped_weights']}.",
        "",
        "| step | weights changed | to base | MiB sent | read+check s | merge s | executor s | total s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, step in result["steps"].items():
        s = step["seconds"]
        lines.append(f"| {name} | {step['weights_changed']} | {step['weights_restored_to_base']} | "
                     f"{step['bytes_sent'] / 2**20:.1f} | {s['read_and_check']} | {s['merge']} | {s['executor']} | "
                     f"{s['total']} |")
    load = result["load_average_1min"]
    lines += ["", f"Pipeline load: {result['pipeline_load_seconds']} s. Image after restoring the base equals the "
              f"image before any LoRA bit for bit: {result['restore_bit_exact_image']}. Load average (1 min) "
              f"before / after: {load['before']} / {load['after']} on {env['machine']['cores']} cores (other jobs "
              "shared the machine; times scale with it).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
