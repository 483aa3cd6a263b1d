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

from .export import example_inputs, staged_export
from .options import BuildOptions
from .specs import ComponentSpec, Dims
from .validate import run_onnx, torch_reference, validate_outputs
from .wrappers import build_wrapper


def precision_of(spec: ComponentSpec, pipe: Any, family: str) -> str:
    """FP16, except the FP32 island diffusers itself keeps: the SDXL pipelines run the VAE in FP32 when its
    config says `force_upcast` (it overflows in FP16). The SD pipelines never upcast (and AutoencoderKL's
    default config says force_upcast=True for every VAE), so the flag counts for SDXL only."""
    if spec.fp32_if_force_upcast and family == "sdxl" and bool(getattr(pipe.vae.config, "force_upcast", False)):
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
    parts: list[str] = []
    for spec in specs:
        if spec.parts[0] not in parts:
            parts.append(spec.parts[0])
    for part in parts:
        group = [s for s in specs if s.parts[0] == part]
        module = getattr(pipe, part)
        module.to(torch.float32)
        prepared = []
        for spec in group:
            _, outputs = spec.io(family)
            vocab = vocab_sizes.get(part, vocab_sizes.get("text_encoder", 2))
            feeds = example_inputs(spec, family, dims, vocab, opts.validation_seed)
            progress.info(f"{spec.name}: PyTorch FP32 reference ...")
            wrapper = build_wrapper(spec.name, pipe, family, opts.height, opts.width)
            start = time.perf_counter()
            reference = torch_reference(wrapper, feeds, [t.name for t in outputs])
            prepared.append((spec, feeds, reference, round(time.perf_counter() - start, 2)))
        for spec, feeds, reference, reference_seconds in prepared:
            precision = precision_of(spec, pipe, family)
            module.to(torch.float16 if precision == "fp16" else torch.float32)
            wrapper = build_wrapper(spec.name, pipe, family, opts.height, opts.width)
            progress.info(f"{spec.name}: exporting {precision.upper()} ONNX ...")
            with staged_export(wrapper, spec, family, feeds, bundle / "onnx" / f"{spec.name}.onnx") as facts:
                progress.info(f"{spec.name}: validating with ONNX Runtime ...")
                candidate = run_onnx(facts["staged"], feeds)
                validation = validate_outputs(spec.name, reference, candidate, opts.min_cosine)
            cosines = ", ".join(f"{k} {v['cosine']:.7f}" for k, v in validation["outputs"].items())
            progress.info(f"{spec.name}: exported in {facts['export_seconds']:.1f} s; cosine vs FP32: {cosines}")
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
        del module


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
