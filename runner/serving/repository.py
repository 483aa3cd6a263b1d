"""`turbo-trt export-triton`: write a standard Triton model repository for a bundle.

    REPO/<model>/config.pbtxt    the served contract (contract.py), dynamic batching up to the bundle's
                                 batch, one instance group per GPU (or CPU instances), the bundle's path
    REPO/<model>/1/model.py      Python backend model calling the runner (triton_model.py)
    REPO/<model>/1/bundle/       with include_bundle: a copy of the bundle, so the repository stands alone

A stock `tritonserver --model-repository REPO` serves it where turbo-trt is installed in the Python that
Triton's Python backend runs. The model directory is written beside its final place and renamed into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from turbo_trt.errors import UsageError
from turbo_trt.fsutil import public_dir

from .contract import DEFAULT_MODEL_NAME, TensorSpec, model_inputs, model_outputs

TEMPLATE = Path(__file__).with_name("triton_model.py")


@dataclass
class ExportOptions:
    engines: Path
    out: Path
    model_name: str = DEFAULT_MODEL_NAME
    gpus: Sequence[int] | None = None  # None: the GPUs nvidia-smi lists now (none for onnxruntime); () for CPU
    instances: int = 1  # per GPU (or in all, on the CPU)
    executor: str = "auto"
    max_queue_delay_us: int = 2000
    include_bundle: bool = False
    force: bool = False
    strict_targets: bool = True  # False: run TensorRT engines on a GPU outside their build targets (a warning)


def visible_gpus() -> list[int]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def pbtxt_string(text: str) -> str:
    """`text` as a protobuf text-format string literal (quotes included): backslash, double quote and line
    breaks escaped, so any path reads back unchanged."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _tensor(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.config_dims)
    optional = " optional: true" if spec.optional else ""
    return f'  {{ name: "{spec.name}" data_type: TYPE_{spec.triton_type} dims: [ {dims} ]{optional} }}'


def _instance_groups(gpus: Sequence[int], instances: int) -> str:
    if not gpus:
        return f"  {{ count: {instances} kind: KIND_CPU }}"
    return ",\n".join(f"  {{ count: {instances} kind: KIND_GPU gpus: [ {gpu} ] }}" for gpu in gpus)


def config_pbtxt(name: str, batch: int, height: int, width: int, gpus: Sequence[int], instances: int,
                 executor: str, bundle: str, max_queue_delay_us: int, strict_targets: bool = True,
                 controlnets: int = 0) -> str:
    inputs = ",\n".join(_tensor(s) for s in model_inputs(height, width, controlnets))
    outputs = ",\n".join(_tensor(s) for s in model_outputs(height, width))
    return (
        f"# Written by `turbo-trt export-triton`: a turbo-trt bundle served by Triton's Python backend.\n"
        f'name: {pbtxt_string(name)}\nbackend: "python"\nmax_batch_size: {batch}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        f"instance_group [\n{_instance_groups(gpus, instances)}\n]\n"
        f'parameters: {{ key: "bundle" value: {{ string_value: {pbtxt_string(bundle)} }} }}\n'
        f'parameters: {{ key: "executor" value: {{ string_value: {pbtxt_string(executor)} }} }}\n'
        f'parameters: {{ key: "strict_targets" value: {{ string_value: "{str(strict_targets).lower()}" }} }}\n'
    )


def export_repository(options: ExportOptions) -> Path:
    """Write REPO/<model>; returns the model directory."""
    from ..bundle import open_bundle

    if options.instances < 1:
        raise UsageError(f"--instances must be at least 1, got {options.instances}")
    if not options.model_name or "/" in options.model_name or options.model_name.startswith("."):
        raise UsageError(f"model name {options.model_name!r} must be a plain directory name")
    # The files are checked (sha256) when the model loads; here only what the config needs is read.
    bundle = open_bundle(options.engines, files="engine" if options.executor == "tensorrt" else "onnx", verify=False)
    shapes = bundle.shapes
    if options.gpus is not None:
        gpus = list(options.gpus)
    else:  # ONNX Runtime's executor runs on the CPU: GPU instance groups would only pin processes to GPUs
        gpus = [] if options.executor == "onnxruntime" else visible_gpus()
    final = options.out / options.model_name
    if final.exists() and not options.force:
        raise UsageError(f"{final} exists; pass --force to replace it")
    options.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{options.model_name}.", suffix=".tmp", dir=options.out))
    try:
        public_dir(work)
        version = work / "1"
        version.mkdir()
        shutil.copyfile(TEMPLATE, version / "model.py")
        if options.include_bundle:
            shutil.copytree(bundle.path, version / "bundle", ignore=shutil.ignore_patterns(".lock", "*.tmp"))
            bundle_param = "bundle"
        else:
            bundle_param = str(bundle.path.resolve())
        (work / "config.pbtxt").write_text(config_pbtxt(
            options.model_name, int(shapes["batch"]), int(shapes["height"]), int(shapes["width"]), gpus,
            options.instances, options.executor, bundle_param, options.max_queue_delay_us, options.strict_targets,
            int(shapes.get("controlnets", 0))))
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(work, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final
