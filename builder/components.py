"""Export and validate a list of components of one loaded pipeline, one pipeline part at a time.

For each part (text encoder(s), UNet, VAE) the FP32 references of all components built from it are
computed first; then the part is cast to its export precision in place (FP16, or FP32 where the config
asks for it: the FP32 island), each component is exported and its ONNX graph validated. The pipeline is
held once in memory: no FP32 copy beside the FP16 one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from turbo_trt.fsutil import peak_rss_mib, sha256_file
from turbo_trt.progress import Progress

from .export import staged_export
from .options import BuildOptions
from .specs import ComponentSpec, Dims
from .validate import (
    DECODED,
    PeakActivation,
    ValidationError,
    fix_hint,
    float_outputs,
    nonfinite_count_check,
    run_onnx,
    torch_reference,
    validate_outputs,
)
from .validation_inputs import ValidationInputs
from .wrappers import VaeDecodeGraph, build_wrapper

#: Largest difference, in levels of 255, allowed between the decoder's uint8 image and the FP32 PyTorch one.
#: The float image is gated by relative error (below 1e-2, ~1e-3 measured in FP16); rounding to levels turns an
#: FP16-vs-FP32 difference of a fraction of a level into 1 level at a few pixels near a .5 boundary, and the
#: largest FP16 errors reach 1-2 levels. A wrong clamp, round, cast or channel order moves pixels by tens of
#: levels, far above 4.
MAX_IMAGE_LEVEL_DIFF = 4


def precision_of(spec: ComponentSpec, pipe: Any, family: str, vae_fp32: bool = False) -> str:
    """FP16, except the FP32 island diffusers itself keeps: the SDXL pipelines run the VAE in FP32 when its
    config says `force_upcast` (it overflows in FP16). The SD pipelines never upcast (and AutoencoderKL's
    default config says force_upcast=True for every VAE), so the flag counts for SDXL only; AutoencoderTiny
    always says False. `vae_fp32` (--vae-fp32) makes the VAE FP32 whatever its config says. Whatever runs
    in FP16 must pass the validation gate (validate.py)."""
    if spec.fp32_if_force_upcast and (vae_fp32 or (
            family == "sdxl" and bool(getattr(pipe.vae.config, "force_upcast", False)))):
        return "fp32"
    return "fp16"


def io_records(spec: ComponentSpec, family: str, dims: Dims) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs, outputs = spec.io(family)
    record = lambda t: {"name": t.name, "shape": list(dims.shape(t)), "dtype": t.dtype}  # noqa: E731
    return [record(t) for t in inputs], [record(t) for t in outputs]


def export_and_validate(
    pipe: Any, family: str, dims: Dims, specs: list[ComponentSpec], bundle: Path, opts: BuildOptions,
    vocab_sizes: dict[str, int], progress: Progress,
) -> Iterator[tuple[ComponentSpec, dict[str, Any]]]:
    import torch

    _quiet_libraries()
    inputs = ValidationInputs(pipe, family, dims, bundle, opts.validation_seed)
    parts: list[str] = []
    for spec in specs:
        if spec.parts[0] not in parts:
            parts.append(spec.parts[0])
    for part in parts:
        group = [s for s in specs if s.parts[0] == part]
        module = getattr(pipe, part)
        # the UNet's graph also holds the fused ControlNets: they are cast, and watched, with it
        held = torch.nn.ModuleList([module, *(getattr(pipe, "turbo_controlnets", None) or [])]) \
            if part == "unet" else module
        held.to(torch.float32)
        prepared = []
        for spec in group:
            _, outputs = spec.io(family)
            progress.info(f"{spec.name}: PyTorch FP32 reference on the validation inputs ...")
            start = time.perf_counter()
            feeds = inputs.feeds(spec)
            wrapper = build_wrapper(spec.name, pipe, family, opts.height, opts.width)
            decoder = wrapper if isinstance(wrapper, VaeDecodeGraph) else None
            if decoder is not None:
                decoder.keep_float = True
            with PeakActivation(held) as peak:
                reference = torch_reference(wrapper, feeds, [t.name for t in outputs])
            if decoder is not None and decoder.last_float is not None:
                reference[DECODED] = decoder.last_float.numpy()
                inputs.record_image(reference["image"])
            prepared.append((spec, feeds, reference, peak.peak, round(time.perf_counter() - start, 2)))
        for spec, feeds, reference, peak_activation, reference_seconds in prepared:
            precision = precision_of(spec, pipe, family, opts.vae_fp32)
            held.to(torch.float16 if precision == "fp16" else torch.float32)
            wrapper = build_wrapper(spec.name, pipe, family, opts.height, opts.width)
            progress.info(f"{spec.name}: exporting {precision.upper()} ONNX ...")
            with staged_export(wrapper, spec, family, feeds, bundle / "onnx" / f"{spec.name}.onnx",
                               weight_map=opts.engine.refittable) as facts:
                progress.info(f"{spec.name}: validating with ONNX Runtime ...")
                validation = _validate(spec, facts["staged"], feeds, reference, precision, peak_activation, opts)
                candidate = validation.pop("candidate", None)
                if spec.name == "unet" and candidate is not None:
                    inputs.record_prediction(candidate["next_latents"])
            errors = ", ".join(f"{k} {v['rel_error']:.2e}" for k, v in validation["outputs"].items()
                               if v.get("rel_error") is not None)
            progress.info(f"{spec.name}: exported in {facts['export_seconds']:.1f} s; relative error vs FP32: "
                          f"{errors}; FP32 peak activation {peak_activation:.4g}")
            input_records, output_records = io_records(spec, family, dims)
            onnx_files = facts["onnx_files"]
            hashes = [sha256_file(bundle / f) for f in onnx_files]
            yield spec, {
                "onnx": onnx_files[0], "onnx_sha256": hashes[0], "onnx_files": onnx_files,
                "onnx_file_sha256": hashes, "external_data": facts["external_data"],
                "inputs": input_records, "outputs": output_records, "precision": precision, "validation": validation,
                "export_seconds": facts["export_seconds"], "reference_seconds": reference_seconds,
                "peak_rss_mib_after_export": peak_rss_mib(),
            }
        setattr(pipe, part, None)
        if part == "unet":
            pipe.turbo_controlnets = []
        del module, held


def _validate(
    spec: ComponentSpec, staged: Path, feeds: dict[str, Any], reference: dict[str, Any], precision: str,
    peak_activation: float, opts: BuildOptions,
) -> dict[str, Any]:
    """Run the staged graph on the validation inputs and gate it (validate.py). The decoder is judged on
    its float image before the uint8 cast (a validation-only copy of the graph exposes it) and on its own
    NaN/inf counter; its uint8 image's level differences are recorded beside."""
    import numpy as np

    if spec.name != "vae_decoder":
        candidate = run_onnx(staged, feeds)
        validation = validate_outputs(spec.name, reference, candidate, opts.min_cosine, precision=precision,
                                      peak_activation=peak_activation)
        return {**validation, "candidate": candidate}
    candidate = run_onnx(float_outputs(staged), feeds)
    gated = {DECODED: reference[DECODED], "nonfinite": reference["nonfinite"]}
    validation = validate_outputs(spec.name, gated, candidate, opts.min_cosine, precision=precision,
                                  peak_activation=peak_activation)
    nonfinite_count_check(spec.name, candidate["nonfinite"], precision)
    levels = np.abs(candidate["image"].astype(np.int32) - reference["image"].astype(np.int32))
    worst = int(levels.max())
    validation["uint8_image"] = {"max_level_diff": worst, "mean_level_diff": float(levels.mean()),
                                 "max_level_diff_limit": MAX_IMAGE_LEVEL_DIFF}
    if worst > MAX_IMAGE_LEVEL_DIFF:
        raise ValidationError(
            f"{spec.name}.image: the uint8 image differs from the FP32 PyTorch one by up to {worst} of 255 levels "
            f"(limit {MAX_IMAGE_LEVEL_DIFF}) although its float image passed: the clamp / round / uint8 cast / "
            f"layout after the decoder is wrong, or the error gathers at a few pixels. {fix_hint(spec.name, precision)}")
    return validation


def _quiet_libraries() -> None:
    """The exporter and diffusers print notes meant for their developers; keep the build's output readable."""
    import logging
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
