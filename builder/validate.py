"""Check an exported graph against its PyTorch FP32 reference with ONNX Runtime (CPU).

Tolerance: the build fails on any NaN/inf, or when the cosine similarity between the ONNX output and the
FP32 reference falls below DEFAULT_MIN_COSINE (0.99) for any output. Why 0.99: FP16 stores 11 significant
bits (relative rounding error 2**-11 ~ 4.9e-4 per value). Over the ~100 roundings between a UNet's input
and output, independent errors add up to a relative error of order 1e-2, i.e. a cosine of about
1 - (1e-2)**2 / 2 = 0.99995; measured FP16 exports of the tiny presets sit above 0.9999. A graph that
overflows (the failure mode of the SDXL VAE in FP16), drops an op or misreads a weight lands far below 0.9
(or at NaN). 0.99 separates the two with a wide margin on both sides. Max-abs error is recorded, not gated:
its scale depends on the output (uint8 pixels vs. latents).

ONNX Runtime's CPU provider lacks FP16 kernels for many ops and inserts casts to FP32 around them, so FP16
weights and FP16 tensors between nodes are exercised, while arithmetic inside such nodes is FP32; the
engine's own FP16 arithmetic is checked by the runner's parity tests on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from turbo_trt.errors import ValidationError

DEFAULT_MIN_COSINE = 0.99


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    finite = bool(np.isfinite(got).all())
    if not finite:
        return {"finite": False, "max_abs": None, "cosine": None}
    denom = float(np.linalg.norm(ref) * np.linalg.norm(got))
    # Two all-zero tensors agree perfectly; one zero and one not do not agree at all.
    cosine = 1.0 if denom == 0.0 and not ref.any() and not got.any() else (float(ref @ got) / denom if denom else 0.0)
    return {"finite": True, "max_abs": float(np.abs(ref - got).max()), "cosine": cosine}


def validate_outputs(
    component: str, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], min_cosine: float
) -> dict[str, Any]:
    """Compare each output; raise ValidationError on NaN/inf or a low cosine. Returns the figures."""
    figures: dict[str, Any] = {}
    for name, ref in reference.items():
        got = candidate[name]
        if got.shape != ref.shape:
            raise ValidationError(f"{component}.{name}: ONNX shape {got.shape} != PyTorch shape {ref.shape}")
        stats = compare(ref, got)
        figures[name] = stats
        if not stats["finite"]:
            raise ValidationError(
                f"{component}.{name}: the ONNX graph produced NaN/inf on seeded inputs (FP16 overflow?). "
                "The SDXL VAE needs FP32; check the component's precision."
            )
        if stats["cosine"] < min_cosine:
            raise ValidationError(
                f"{component}.{name}: cosine similarity {stats['cosine']:.6f} against the FP32 PyTorch "
                f"reference is below {min_cosine} (max abs error {stats['max_abs']:.4g})"
            )
    return {"reference": "pytorch-fp32", "runtime": "onnxruntime-cpu", "min_cosine": min_cosine,
            "outputs": figures}


def torch_reference(module: Any, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    """Run the FP32 wrapper on the same inputs; returns numpy outputs keyed by the spec's names."""
    import torch

    from .export import to_torch

    with torch.no_grad():
        result = module.eval()(*to_torch(feeds))
    if not isinstance(result, tuple):
        result = (result,)
    return {name: value.detach().cpu().numpy() for name, value in zip(output_names, result)}
