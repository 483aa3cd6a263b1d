"""The build's numeric gate: an exported graph (ONNX Runtime, CPU) against its PyTorch FP32 reference.

What is compared. Every output, in the value space before any quantization: the VAE decoder's float image
(the tensor its graph checks for NaN/inf, just before the uint8 cast; see `float_outputs`) rather than
its uint8 pixels, whose cosine stays high for a wrong picture because every pixel is positive. Values are
centred on the reference's mean, so an output with a large common offset cannot look right because of it.
Inputs are realistic (see validation_inputs.py): token ids of fixed prompts, embeddings from the exported
text encoders, latents from the model's own UNet step.

The figures, per output:
- `rel_error` = ||got - ref|| / ||ref - mean(ref)||: the error relative to the reference's own spread
  (a relative RMS error); gated per component by MAX_REL_ERROR below.
- `cosine`: cosine similarity of the centred values; gated by `min_cosine` (--min-cosine, default 0.99).
  For a centred comparison 1 - cosine ~ rel_error**2 / 2, so this is the looser of the two gates; it is kept
  as the user-facing knob.
- `finite`: any NaN/inf fails. `max_abs` is recorded, not gated (its scale depends on the output).
Besides the outputs, the FP32 reference's largest intermediate activation (`fp32_peak_activation`, over
every leaf module's output) must stay below FP16's largest finite value (65504) for a graph that runs in
FP16: ONNX Runtime's CPU kernels compute many FP16 ops in FP32 internally, so an overflow that a GPU's FP16
kernels would hit can pass the output comparison on the CPU, but it cannot hide from this figure.

Why these thresholds. FP16 keeps 11 significant bits (relative rounding 2**-11 ~ 4.9e-4 per value). Errors
of many roundings add up in quadrature, and normalization layers keep them from compounding, so FP16
networks land at a relative error of 1e-3 .. 1e-2 against FP32 (measured with ONNX Runtime: 2.4e-4 .. 7.8e-4
on the tiny presets, 2.5e-4 .. 9.6e-4 on full-size random-weight SD-Turbo, TAESD and AutoencoderKL included;
benchmarks/results/vae-choices-sd-turbo-cpu.md). Failures are an order of magnitude above: a graph that
overflows produces NaN/inf or saturated activations (rel_error near 1); a dropped op or a misread weight
moves outputs by tens of percent (a wrong picture in tests/test_vae.py: rel_error > 0.5). Each bound sits
30-50x above the FP16 error measured on the CPU (a GPU's FP16 kernels, which upcast less, and trained
weights may err more: the bounds are 3-5x above the 1e-2 end) and well below the failures:
- text encoders (0.03): a CLIP stack of 3 (tiny) .. 32 (bigG) layers with a final layer norm; embeddings
  are what every later stage sees, so the bound is the tightest.
- unet (0.05): the deepest network (~100 layers with attention); its prediction (not the a*x step term,
  see validation_inputs.py) is compared.
- vae decoder (0.03): float image in [-1, 1] before the cast; 0.03 of an image's spread (~0.5) is ~2
  levels of 255 RMS, the runner parity tests' per-pixel tolerance.
- vae encoder (0.05): latents of a convolutional stack, compared without the added noise term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from turbo_trt.errors import ValidationError

DEFAULT_MIN_COSINE = 0.99
#: Largest finite FP16 value.
FP16_MAX = 65504.0
MAX_REL_ERROR: dict[str, float] = {
    "text_encoder": 0.03,
    "text_encoder_2": 0.03,
    "unet": 0.05,
    "vae_decoder": 0.03,
    "vae_encoder": 0.05,
}
#: Bound for a component not listed above.
DEFAULT_MAX_REL_ERROR = 0.05
#: The decoder's float image, the last float tensor before the uint8 cast: added as a graph output for
#: validation only (the bundle's graph keeps the runner's IO, see turbo_trt/io_contract.py).
DECODED = "decoded"


def run_onnx(path: Path | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a graph (a file, or a serialized model) on ONNX Runtime's CPU provider; all outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def float_outputs(path: Path) -> bytes:
    """The decoder graph with its float image (before clamp, rounding and the uint8 cast) as an extra
    output named DECODED. The tensor is found as the input of the graph's NaN check, which feeds the
    `nonfinite` output (see wrappers.VaeDecodeGraph). Returns the serialized model (the file is unchanged)."""
    import onnx

    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    stack, seen, found = ["nonfinite"], set(), None
    while stack and found is None:
        name = stack.pop()
        node = producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type in ("IsNaN", "IsInf"):
            found = node.input[0]
        stack.extend(node.input)
    if found is None:
        raise ValidationError(f"{path.name}: no NaN check upstream of 'nonfinite'; cannot find the float image "
                              "before the uint8 cast to validate")
    # float32 always: the wrapper casts the decoded image to float32 before the NaN check.
    model.graph.node.append(onnx.helper.make_node("Identity", [found], [DECODED]))
    model.graph.output.append(onnx.helper.make_tensor_value_info(DECODED, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Figures of one output: finite, rel_error and cosine of the centred values, max_abs."""
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    if not bool(np.isfinite(got).all()):
        bad = int((~np.isfinite(got)).sum())
        return {"finite": False, "nonfinite_values": bad, "values": int(got.size), "max_abs": None,
                "cosine": None, "rel_error": None}
    centre = float(ref.mean()) if ref.size else 0.0
    ref_c, got_c = ref - centre, got - centre
    spread = float(np.linalg.norm(ref_c))
    error = float(np.linalg.norm(got - ref))
    denom = spread * float(np.linalg.norm(got_c))
    if error == 0.0:  # identical (all-zero or constant tensors included)
        cosine, rel_error = 1.0, 0.0
    else:
        cosine = float(ref_c @ got_c) / denom if denom else 0.0
        rel_error = error / spread if spread else float("inf")
    return {"finite": True, "max_abs": float(np.abs(ref - got).max()) if ref.size else 0.0, "cosine": cosine,
            "rel_error": rel_error}


def max_rel_error(component: str) -> float:
    return MAX_REL_ERROR.get(component, DEFAULT_MAX_REL_ERROR)


def validate_outputs(
    component: str, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], min_cosine: float,
    *, precision: str = "fp16", peak_activation: float | None = None,
) -> dict[str, Any]:
    """Compare each output named in `reference`; raise ValidationError naming the component, the figure and
    the fix when one fails. Returns the figures."""
    limit = max_rel_error(component)
    fix = fix_hint(component, precision)
    if precision == "fp16" and peak_activation is not None and peak_activation >= FP16_MAX:
        raise ValidationError(
            f"{component}: the FP32 reference's largest intermediate activation is {peak_activation:.4g}, beyond "
            f"FP16's largest value {FP16_MAX:g}; this graph runs in FP16 and would overflow. {fix}")
    figures: dict[str, Any] = {}
    for name, ref in reference.items():
        got = candidate[name]
        if got.shape != ref.shape:
            raise ValidationError(f"{component}.{name}: ONNX shape {got.shape} != PyTorch shape {ref.shape}")
        if not bool(np.isfinite(ref).all()):
            bad = int((~np.isfinite(ref)).sum())
            raise ValidationError(
                f"{component}.{name}: {bad} of {ref.size} values of the FP32 PyTorch reference itself are NaN/inf "
                "on the validation inputs: broken weights (NaN/inf in the checkpoint?), not an export or FP16 "
                "problem; check the model files.")
        stats = compare(ref, got)
        figures[name] = stats
        if not stats["finite"]:
            raise ValidationError(
                f"{component}.{name}: {stats['nonfinite_values']} of {stats['values']} values are NaN/inf in the "
                f"{precision.upper()} ONNX graph (FP32 PyTorch: none) on the validation inputs. {fix}")
        # Written as "not (within the limit)" so a NaN figure fails instead of slipping through.
        if not (stats["cosine"] >= min_cosine) or not (stats["rel_error"] <= limit):
            raise ValidationError(
                f"{component}.{name}: relative error {stats['rel_error']:.4g} (limit {limit}), centred cosine "
                f"{stats['cosine']:.6f} (limit {min_cosine}) against the FP32 PyTorch reference "
                f"(max abs error {stats['max_abs']:.4g}). {fix}")
    return {"reference": "pytorch-fp32", "runtime": "onnxruntime-cpu", "min_cosine": min_cosine,
            "max_rel_error": limit, "fp32_peak_activation": peak_activation, "outputs": figures}


def fix_hint(component: str, precision: str) -> str:
    """What to do about a failed component (the message's last sentence)."""
    if component.startswith("vae") and precision == "fp16":
        return ("Fix: build the VAE in FP32 (--vae-fp32, or force_upcast: true in the VAE's config.json, which "
                "SDXL pipelines honour) or use an FP16-safe VAE (--vae madebyollin/sdxl-vae-fp16-fix for SDXL, "
                "--vae tiny).")
    if precision == "fp16":
        return ("This network does not run correctly in FP16 with these weights; check the weights (NaN in the "
                "checkpoint?) or report the model.")
    return "The graph disagrees with PyTorch even in FP32: the export is wrong; report the model and versions."


def nonfinite_count_check(component: str, count: np.ndarray, precision: str) -> None:
    """The decoder's own NaN/inf counter must read 0 on the validation inputs."""
    value = int(np.asarray(count).ravel()[0])
    if value:
        raise ValidationError(f"{component}: the graph's NaN/inf counter reads {value} on the validation inputs "
                              f"({precision.upper()}). {fix_hint(component, precision)}")


def torch_reference(module: Any, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    """Run the FP32 wrapper on the same inputs; returns numpy outputs keyed by the spec's names."""
    import torch

    with torch.no_grad():
        result = module.eval()(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
    if not isinstance(result, tuple):
        result = (result,)
    return {name: value.detach().cpu().numpy() for name, value in zip(output_names, result)}


class PeakActivation:
    """Context manager: the largest |value| any leaf module of `module` outputs while it is active."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.peak = 0.0
        self._handles: list[Any] = []

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        import torch

        values = output if isinstance(output, (tuple, list)) else (output,)
        for value in values:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                peak = float(value.detach().abs().max())  # inf counts (an FP32 overflow); NaN is skipped
                if peak == peak:
                    self.peak = max(self.peak, peak)

    def __enter__(self) -> PeakActivation:
        leaves = [m for m in self.module.modules() if not any(True for _ in m.children())]
        self._handles = [m.register_forward_hook(self._hook) for m in leaves]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
