"""The generic export loop: a spec + a wrapped module -> a static-shape ONNX graph on disk.

Uses the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, ~20x faster than TorchScript on the
full UNet) with its optimizer on (constant folding, dead-code elimination). Outputs not named by the spec
are never returned by the wrappers, so they do not exist in the graph. Graphs whose weights exceed
EXTERNAL_DATA_BYTES keep their weights in `<name>.onnx.data` beside the graph (protobuf's 2 GB cap).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from turbo_trt.errors import ExportError

from .specs import ComponentSpec, Dims, TensorSpec

#: Weights above this many bytes go to an external data file (protobuf caps a message at 2 GiB; the
#: margin leaves room for the graph itself).
EXTERNAL_DATA_BYTES = 1 << 30

def example_inputs(spec: ComponentSpec, family: str, dims: Dims, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs in each tensor's declared dtype, with realistic scales.

    UNet: latents at a first-step sigma, step_coeffs (c_in, 0, 1, 0) so that the output is the raw model
    prediction: validation then compares the network itself, not `a * latents` which would dominate.
    """
    rng = np.random.default_rng(seed)
    inputs, _ = spec.io(family)
    sigma = 14.6
    special: dict[str, np.ndarray] = {
        "timestep": np.array([999.0], np.float32),
        "step_coeffs": np.array([1.0 / np.sqrt(sigma**2 + 1.0), 0.0, 1.0, 0.0], np.float32),
        "noise_sigma": np.array([0.5], np.float32),
        "control_scale": np.ones(dims.values.get("N", 0), np.float32),
    }
    feeds: dict[str, np.ndarray] = {}
    for tensor in inputs:
        shape = dims.shape(tensor)
        if tensor.name in special:
            feeds[tensor.name] = special[tensor.name]
        elif tensor.dtype == "int32":
            feeds[tensor.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int32)
        elif tensor.dtype == "uint8":
            feeds[tensor.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            scale = sigma if (spec.name == "unet" and tensor.name == "latents") else 1.0
            feeds[tensor.name] = (rng.standard_normal(shape) * scale).astype(tensor.dtype)
    return feeds


def to_torch(feeds: dict[str, np.ndarray]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())


def weight_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def staged_export(
    module: Any, spec: ComponentSpec, family: str, feeds: dict[str, np.ndarray], dest: Path,
    weight_map: bool = False,
) -> Iterator[dict[str, Any]]:
    """Export `module` into a staging folder beside `dest` and yield facts incl. the staged graph path.

    The files move to their final names (data files first, the graph last) only when the `with` body
    (validation) succeeds; on any error the staging folder is removed and nothing is left under `dest`.
    With `weight_map` (refittable bundles) a component that LoRAs touch keeps every initializer in
    `<name>.onnx.data` and gets `<component>.weights.json`, the map from module weights to initializers
    (see lora_map.py).
    """
    import torch

    from .lora_map import LORA_COMPONENTS

    inputs, outputs = spec.io(family)
    weight_map = weight_map and spec.name in LORA_COMPONENTS
    external = weight_map or weight_bytes(module) > EXTERNAL_DATA_BYTES
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".tmp", dir=dest.parent))
    try:
        start = time.perf_counter()
        staged = staging / dest.name
        try:
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    module.eval(), to_torch(feeds),
                    input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                    dynamo=True, optimize=True, external_data=external, verbose=False,
                )
                if program is None:
                    raise ExportError(f"torch.onnx.export returned nothing for {spec.name}")
                program.save(str(staged), external_data=external)
                if weight_map:
                    from .lora_map import externalize_weights

                    externalize_weights(staged)  # every float weight at a byte offset in one data file
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"exporting {spec.name} to ONNX failed: {type(exc).__name__}: {exc}") from exc
        _check_io(staged, inputs, outputs, spec.name)
        if weight_map:
            _write_weight_map(module, spec, staged, staging)
        data_files = sorted(p for p in staging.iterdir() if p.name != dest.name)
        yield {
            "staged": staged,
            "export_seconds": round(time.perf_counter() - start, 2),
            "onnx_files": [f"onnx/{dest.name}"] + [f"onnx/{p.name}" for p in data_files],
            "external_data": external,
        }
        for path in data_files + [staged]:
            os.replace(path, dest.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_weight_map(module: Any, spec: ComponentSpec, staged: Path, staging: Path) -> None:
    import json

    from turbo_trt.runner.lora import weight_map_name

    from .lora_map import record_weight_map

    try:
        mapping = record_weight_map(module, spec.name, spec.parts[0], staged)
    except ValueError as exc:
        raise ExportError(f"{spec.name}: recording the weight map for refitting failed: {exc}") from exc
    (staging / weight_map_name(spec.name)).write_text(json.dumps(mapping, indent=1, sort_keys=True) + "\n")


def _check_io(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], name: str) -> None:
    """The exported graph must have exactly the spec's IO names, in order, with static shapes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != [t.name for t in inputs] or got_out != [t.name for t in outputs]:
        raise ExportError(f"{name}: exported IO {got_in} -> {got_out} differs from the spec")
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise ExportError(f"{name}: {value.name} has a dynamic dimension; bundles are static-shape")
