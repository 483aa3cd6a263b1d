"""Baselines timed in the same run: the diffusers pipeline itself, eager and under torch.compile.

Same model (rebuilt from the bundle's manifest: preset, random-weight config, hub id or local directory),
same resolution and steps, guidance_scale 0, output_type "np" (includes the postprocessing the engines do).
On a GPU the pipeline runs in FP16 (diffusers keeps the SDXL VAE in FP32 when it asks for it); on the
CPU in FP32. torch.compile uses mode "max-autotune" (which also enables CUDA graphs) on the UNet and the VAE
decoder; its compilation happens in the warm-up and is reported separately.
"""

from __future__ import annotations

import time
from typing import Any

from .stats import summarize

BASELINES = ("diffusers", "compile")


def _pipeline(manifest: dict[str, Any], on_gpu: bool) -> Any:
    import torch

    from turbo_trt.builder import sources

    model = manifest["model"]
    # The same VAE as the bundle (--vae): a local one by its absolute folder, others by their argument.
    vae = (manifest.get("vae") or {}).get("source") or {}
    vae_argument = vae.get("id") if vae.get("kind") == "local" else vae.get("argument")
    src = sources.resolve_source(model["argument"], model.get("revision") if model["kind"] == "hub" else None,
                                 random_weights=model["kind"] == "random", vae=vae_argument)
    pipe = sources.load_pipeline(src)
    if on_gpu:
        pipe = pipe.to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_baseline(name: str, manifest: dict[str, Any], opts: Any, on_gpu: bool) -> dict[str, Any]:
    """Time one baseline; returns {"name", "latency" (summary) | "error", "warmup_s", ...}."""
    try:
        import torch
    except ImportError:
        return {"name": name, "error": "torch is not installed (pip install 'turbo-trt[build]')"}
    if name not in BASELINES:
        return {"name": name, "error": f"unknown baseline; choose from {', '.join(BASELINES)}"}
    shapes = manifest["shapes"]
    pipe = _pipeline(manifest, on_gpu)
    if name == "compile":
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode="max-autotune", fullgraph=True)

    def once(seed: int) -> float:
        generator = torch.Generator("cuda" if on_gpu else "cpu").manual_seed(seed)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe([opts.prompt] * shapes["batch"], num_inference_steps=opts.steps, guidance_scale=0.0,
             height=shapes["height"], width=shapes["width"], output_type="np", generator=generator)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm_start = time.perf_counter()
    for i in range(max(opts.warmup, 3 if name == "compile" else 1)):
        once(i)
    warmup = time.perf_counter() - warm_start
    samples = [once(i) for i in range(opts.iterations)]
    out: dict[str, Any] = {
        "name": "diffusers eager" if name == "diffusers" else "diffusers + torch.compile (max-autotune)",
        "precision": "fp16" if on_gpu else "fp32", "device": "cuda" if on_gpu else "cpu",
        "warmup_s": round(warmup, 3), "latency": summarize(samples),
    }
    if on_gpu:
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
