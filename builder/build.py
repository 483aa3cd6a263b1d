"""The build stage: resolve the model -> export + validate each stale component -> build each stale
engine -> manifest. Rebuilds only what changed, using per-component fingerprints.

Crash safety: every file is written as temp + rename; the manifest is rewritten (atomically) after each
finished step and names each file's sha256, so after a kill the next build finds the finished components
up to date and redoes the rest. A lock keeps two builds off one bundle.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turbo_trt import __version__
from turbo_trt.errors import UsageError
from turbo_trt.flavors import RTX_DEFAULT_TARGETS, RTX_TARGETS, Flavor, load_flavor
from turbo_trt.fsutil import (
    BundleLock,
    remove_stale_temporaries,
    sha256_file,
    sha256_json,
)
from turbo_trt.io_contract import check_io, manifest_io
from turbo_trt.manifest import read_manifest_or_none, write_manifest
from turbo_trt.progress import Progress

from . import sources
from .engine import ENGINE_RECIPE, capture_flag
from .options import DEFAULT_ENGINES_ROOT, BuildOptions, default_size
from .schedules import scheduler_tables_from_config
from .specs import SPEC_VERSION, ComponentSpec, Dims, dims_from_configs, specs_for

TOKENIZER_PARTS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass
class BuildReport:
    bundle: Path
    exported: list[str] = field(default_factory=list)
    engines_built: list[str] = field(default_factory=list)
    up_to_date: bool = False
    seconds: float = 0.0
    load_seconds: float = 0.0  # loading (or, with --random-weights, initializing) the pipeline


def default_slug(opts: BuildOptions, src: sources.ResolvedSource) -> str:
    base = src.model_id if src.kind != "local" else Path(src.model_id).name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base.split("/")[-1]).strip("-") or "model"
    if src.kind == "random":
        slug += "-random"
    size = default_size(opts.model)
    if (opts.height, opts.width) != (size, size):
        slug += f"-{opts.height}x{opts.width}"
    if opts.batch != 1:
        slug += f"-b{opts.batch}"
    return slug


def check_shape_options(opts: BuildOptions) -> None:
    """Basic checks that need no model (run before anything is loaded)."""
    if opts.batch < 1 or opts.batch > 64:
        raise UsageError(f"--batch must be between 1 and 64, got {opts.batch}")
    for name, value in (("--height", opts.height), ("--width", opts.width)):
        if value < 64 or value > 2048 or value % 8:
            raise UsageError(f"{name} must be a multiple of 8 between 64 and 2048, got {value}")
    if not 0.0 < opts.min_cosine <= 1.0:
        raise UsageError(f"--min-cosine must be in (0, 1], got {opts.min_cosine}")
    if not 0 <= opts.engine.optimization_level <= 5:
        raise UsageError(f"--opt-level must be 0..5, got {opts.engine.optimization_level}")
    if opts.engine.workspace_gib is not None and opts.engine.workspace_gib <= 0:
        raise UsageError(f"--workspace must be positive, got {opts.engine.workspace_gib}")
    bad = [t for t in opts.engine.targets if t not in (*RTX_TARGETS, "current")]
    if bad:
        raise UsageError(f"--targets: unknown compute capability {', '.join(bad)}; "
                         f"choose from {', '.join(RTX_TARGETS)} or 'current' (the local GPU)")


def vae_scale_factor(configs: dict[str, dict[str, Any]]) -> int:
    return 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def check_model_shapes(opts: BuildOptions, configs: dict[str, dict[str, Any]]) -> None:
    """Height/width must survive the VAE's and the UNet's down-sampling without remainder."""
    vae = vae_scale_factor(configs)
    unet = 2 ** (len(configs["unet"]["block_out_channels"]) - 1)
    step = vae * unet
    for name, value in (("--height", opts.height), ("--width", opts.width)):
        if value % step:
            raise UsageError(
                f"{name} {value} is not a multiple of {step}: the VAE down-samples by {vae} and the UNet by "
                f"{unet} more; try {max(step, value // step * step)} or {(value // step + 1) * step}"
            )


def onnx_fingerprint(spec: ComponentSpec, opts: BuildOptions, parts: dict[str, str]) -> str:
    from importlib.metadata import version

    return sha256_json({
        "spec": spec.name, "spec_version": SPEC_VERSION, "parts": {p: parts[p] for p in spec.parts},
        "batch": opts.batch, "height": opts.height, "width": opts.width, "torch": version("torch"),
    })


def engine_fingerprint(entry: dict[str, Any], flavor: Flavor, opts: BuildOptions) -> str:
    return sha256_json({
        "onnx_sha256": entry["onnx_sha256"], "flavor": flavor.name, "version": flavor.version,
        "options": opts.engine.as_dict(), "recipe": ENGINE_RECIPE,
    })


def files_intact(bundle: Path, entry: dict[str, Any], key_files: str, key_hashes: str) -> bool:
    """Every file the entry names exists with the recorded sha256 (content, not just presence)."""
    files, hashes = entry.get(key_files), entry.get(key_hashes)
    if not files or not hashes or len(files) != len(hashes):
        return False
    return all((bundle / f).is_file() and sha256_file(bundle / f) == h for f, h in zip(files, hashes))


def build(opts: BuildOptions, progress: Progress | None = None) -> BuildReport:
    progress = progress or Progress()
    start = time.perf_counter()
    check_shape_options(opts)
    src = sources.resolve_source(opts.model, opts.revision, opts.random_weights, vae=opts.vae,
                                 vae_fp32=opts.vae_fp32, controlnets=opts.controlnets)
    configs = sources.part_configs(src)
    check_model_shapes(opts, configs)
    flavor = None if opts.onnx_only else load_flavor(opts.flavor)
    if flavor is not None and not flavor.ahead_of_time and opts.engine.targets:
        raise UsageError("--targets applies to --flavor tensorrt-rtx only (tensorrt builds for the local GPU)")

    bundle = opts.out or DEFAULT_ENGINES_ROOT / default_slug(opts, src)
    report = BuildReport(bundle=bundle)
    with BundleLock(bundle):
        for leftover in remove_stale_temporaries(bundle):
            progress.info(f"removed a temporary left by an interrupted build: {leftover.name}")
        _build_locked(opts, src, configs, flavor, bundle, progress, report)
    report.seconds = time.perf_counter() - start
    report.up_to_date = not report.exported and not report.engines_built
    return report


def _build_locked(
    opts: BuildOptions, src: sources.ResolvedSource, configs: dict[str, dict[str, Any]],
    flavor: Flavor | None, bundle: Path, progress: Progress, report: BuildReport,
) -> None:
    specs = specs_for(src.family, img2img=opts.img2img, controlnets=len(src.controlnets))
    dims = dims_from_configs(configs, opts.batch, opts.height, opts.width, vae_scale_factor(configs),
                             len(src.controlnets))
    parts = src.part_fingerprints()
    from .lora_bake import lora_part_fingerprints, resolve_baked_loras

    baked = resolve_baked_loras(opts.loras)
    onnx_parts = lora_part_fingerprints(parts, baked)  # baked LoRAs change only the parts they touch
    old = read_manifest_or_none(bundle) or {}
    if opts.force:
        old = {}
    components: dict[str, dict[str, Any]] = {
        name: entry for name, entry in old.get("components", {}).items() if name in {s.name for s in specs}
    }
    manifest = _manifest_head(opts, src, configs, dims, parts, old, flavor)
    manifest["components"] = components
    manifest["lora"] = {"baked": baked, "refittable": opts.engine.refittable}

    stale = []
    for spec in specs:
        entry = components.get(spec.name, {})
        fingerprint = onnx_fingerprint(spec, opts, onnx_parts)
        if entry.get("onnx_fingerprint") == fingerprint and files_intact(bundle, entry, "onnx_files", "onnx_file_sha256") \
                and not _needs_weight_map(spec, entry, opts):
            continue
        stale.append((spec, fingerprint))
    tokenizers_stale = any(
        old.get("tokenizers", {}).get(name, {}).get("fingerprint") != parts[part]
        or not (bundle / old["tokenizers"][name]["file"]).is_file()
        for name, part in TOKENIZER_PARTS.items() if part in parts
    )
    if stale or tokenizers_stale:
        from .isolate import run_isolated

        result = run_isolated("exporting ONNX graphs", export_stage, src, configs, dims, parts,
                              [(spec.name, fp) for spec, fp in stale], bundle, opts, manifest, progress.enabled)
        manifest, report.load_seconds = result["manifest"], result["load_seconds"]
        components = manifest["components"]
        report.exported.extend(result["exported"])
    else:
        progress.info("ONNX graphs up to date")
    if manifest != old:  # an up-to-date bundle is left untouched, manifest included
        write_manifest(bundle, manifest)

    # The graphs must fit the runner's buffers (turbo_trt.io_contract) before anything is compiled.
    check_io(manifest_io(components), src.family, manifest["shapes"], opts.img2img, f"{bundle}/manifest.json")
    if flavor is None:
        return
    timing_cache = bundle / "timing.cache" if flavor.uses_timing_cache else None
    for spec in specs:
        entry = components[spec.name]
        fingerprint = engine_fingerprint(entry, flavor, opts)
        if entry.get("engine_fingerprint") == fingerprint and files_intact(bundle, entry, "engine_files", "engine_file_sha256"):
            continue
        from .engine import build_engine_isolated

        progress.info(f"building {flavor.name} engine for {spec.name} ...")
        engine_path = bundle / f"{spec.name}.plan"
        built = build_engine_isolated(flavor, bundle / entry["onnx"], opts.engine, engine_path, progress,
                                      timing_cache=timing_cache, label=spec.name,
                                      expected_io=manifest_io({spec.name: entry})[spec.name])
        progress.info(f"  {spec.name}: {built['bytes'] / 2**20:.1f} MiB engine in {built['seconds']:.1f} s")
        entry.update({
            "engine": engine_path.name, "engine_sha256": sha256_file(engine_path),
            "engine_files": [engine_path.name], "engine_fingerprint": fingerprint,
            "build_seconds": round(built["seconds"], 2), "engine_build_peak_rss_mib": built["peak_rss_mib"],
        })
        entry["engine_file_sha256"] = [entry["engine_sha256"]]
        report.engines_built.append(spec.name)
        write_manifest(bundle, manifest)


def export_stage(
    src: sources.ResolvedSource, configs: dict[str, dict[str, Any]], dims: Dims, parts: dict[str, str],
    stale: list[tuple[str, str]], bundle: Path, opts: BuildOptions, manifest: dict[str, Any], show_progress: bool,
) -> dict[str, Any]:
    """Child-process entry (see isolate.py): load the pipeline, write the tokenizers, export and validate
    each stale component, recording each in the manifest as it completes. Returns the manifest."""
    progress = Progress(enabled=show_progress)
    progress.info(f"loading {src.argument} ({src.kind}) ...")
    start = time.perf_counter()
    pipe = sources.load_pipeline(src)
    from .lora_bake import bake_loras

    bake_loras(pipe, manifest.get("lora", {}).get("baked", []), src.family, progress)
    load_seconds = round(time.perf_counter() - start, 2)
    manifest["tokenizers"] = _write_tokenizers(pipe, bundle, parts)
    write_manifest(bundle, manifest)
    exported = []
    if stale:
        from .components import export_and_validate
        from .specs import spec_by_name

        fingerprints = dict(stale)
        specs = [spec_by_name(name, len(src.controlnets)) for name, _ in stale]
        # A stale entry no longer describes what the bundle is built from (say --vae changed): the manifest
        # stops claiming it until its new graph has passed validation, and its files (graph, external data,
        # engine) go, so a failed rebuild leaves no old component under a final name.
        dropped = [manifest["components"].pop(name, None) for name in fingerprints]
        write_manifest(bundle, manifest)
        for old_entry in filter(None, dropped):
            for rel in [*old_entry.get("onnx_files", []), *old_entry.get("engine_files", [])]:
                path = bundle / rel
                if path.resolve().is_relative_to(bundle.resolve()):
                    path.unlink(missing_ok=True)
        for spec, entry in export_and_validate(pipe, src.family, dims, specs, bundle, opts, vocab_sizes(configs),
                                               progress):
            entry["onnx_fingerprint"] = fingerprints[spec.name]
            manifest["components"][spec.name] = entry
            exported.append(spec.name)
            write_manifest(bundle, manifest)
    return {"manifest": manifest, "load_seconds": load_seconds, "exported": exported}


def _needs_weight_map(spec: ComponentSpec, entry: dict[str, Any], opts: BuildOptions) -> bool:
    """A refittable build re-exports a LoRA-touchable graph that was exported without its weight map."""
    from turbo_trt.runner.lora import PART_COMPONENT, weight_map_name

    return (opts.engine.refittable and spec.name in PART_COMPONENT.values()
            and f"onnx/{weight_map_name(spec.name)}" not in entry.get("onnx_files", []))


def vocab_sizes(configs: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {name: int(configs[name]["vocab_size"]) for name in TOKENIZER_PARTS if name in configs}


def _manifest_head(
    opts: BuildOptions, src: sources.ResolvedSource, configs: dict[str, dict[str, Any]], dims: Dims,
    parts: dict[str, str], old: dict[str, Any], flavor: Flavor | None,
) -> dict[str, Any]:
    vae = configs["vae"]
    engine_info: dict[str, Any] | None = None
    if flavor is not None:
        engine_info = {"flavor": flavor.name, "version": flavor.version, "recipe": ENGINE_RECIPE,
                       "capture_ready_flag": capture_flag(flavor) is not None, **_target_info(flavor, opts)}
    return {
        "schema_version": 1,
        "turbo_trt_version": __version__,
        "model": {
            "argument": src.argument, "kind": src.kind, "id": src.model_id, "revision": src.revision,
            "family": src.family, "config_hash": sha256_json(configs), "parts": parts,
        },
        "shapes": {
            "batch": opts.batch, "height": opts.height, "width": opts.width, "tokens": dims.values["L"],
            "latent_channels": dims.values["C"], "latent_height": dims.values["h"],
            "latent_width": dims.values["w"], "vae_scale_factor": opts.height // dims.values["h"],
            **({"controlnets": len(src.controlnets)} if src.controlnets else {}),
        },
        # the nets fused into the UNet graph, in the order of control_image / control_scale
        **({"controlnets": src.controlnet_records()} if src.controlnets else {}),
        "scheduler": _scheduler(configs, parts, old),
        "vae": {
            "scaling_factor": vae.get("scaling_factor"), "shift_factor": vae.get("shift_factor"),
            # As honoured (components.precision_of): SD pipelines never upcast, whatever the config says.
            "force_upcast": src.family == "sdxl" and bool(vae.get("force_upcast", False)),
            "precision": "fp32" if opts.vae_fp32 or (src.family == "sdxl" and bool(vae.get("force_upcast", False)))
            else "fp16",
            "source": src.vae_record(parts["vae"], vae),
        },
        "tokenizers": old.get("tokenizers", {}),
        "engine": engine_info if engine_info is not None else old.get("engine"),
        "build_config": {
            "onnx_only": opts.onnx_only, "img2img": opts.img2img, "min_cosine": opts.min_cosine,
            "validation_seed": opts.validation_seed, **opts.engine.as_dict(),
        },
    }


def _scheduler(configs: dict[str, dict[str, Any]], parts: dict[str, str], old: dict[str, Any]) -> dict[str, Any]:
    """The scheduler tables, recomputed only when the scheduler's config changed."""
    previous = old.get("scheduler", {})
    if previous.get("fingerprint") == parts["scheduler"] and previous.get("tables"):
        return previous
    return {**scheduler_tables_from_config(configs["scheduler"]), "fingerprint": parts["scheduler"]}


def _target_info(flavor: Flavor, opts: BuildOptions) -> dict[str, Any]:
    """What the engines can run on: RTX records its target capabilities, tensorrt the build GPU."""
    from turbo_trt.gpu import current_gpu

    gpu = current_gpu()
    if flavor.ahead_of_time:
        if opts.engine.targets:
            return {"targets": list(opts.engine.targets), "targets_source": "--targets", "build_gpu": gpu}
        # No capabilities set: TensorRT-RTX's own default, a portable engine for Ampere and later.
        return {"targets": list(RTX_DEFAULT_TARGETS), "targets_source": "tensorrt-rtx default", "build_gpu": gpu}
    return {"targets": [gpu["compute_capability"]] if gpu else [], "build_gpu": gpu}


def _write_tokenizers(pipe: Any, bundle: Path, parts: dict[str, str]) -> dict[str, Any]:
    """Save each tokenizer as a `tokenizers` JSON file (what the torch-free runner loads) + its specials."""
    from .tokenizer_export import export_tokenizer

    out: dict[str, Any] = {}
    for encoder, part in TOKENIZER_PARTS.items():
        tokenizer = getattr(pipe, part, None)
        if tokenizer is None:
            continue
        info = export_tokenizer(tokenizer, bundle / part)
        out[encoder] = {**info, "file": f"{part}/tokenizer.json", "fingerprint": parts[part]}
    return out
