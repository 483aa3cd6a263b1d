"""The export-time weight map of a refittable graph: which ONNX initializer carries each module weight.

The dynamo exporter renames and transforms weights: a Linear's weight usually lands transposed in an
initializer named like `val_123` (its Transpose is constant-folded), identical tensors are merged into one
initializer, and weights of modules the graph does not use are pruned. So the map is recorded here, at
export time, by content: every Linear / Conv weight of the exported part (in the dtype it was exported in)
is looked up among the graph's initializers as it is and, for 2-D weights, transposed. Nothing is guessed at
run time.

Refittable graphs keep every initializer in `<name>.onnx.data`, so the map can also record each one's byte
offset: the torch-free runner reads base values from there (numpy) without the `onnx` package.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from turbo_trt.runner.lora import WEIGHT_MAP_FORMAT, canonical_module

#: Components whose weights LoRAs touch (and that get a weight map in a refittable bundle).
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


_FLOAT_TYPES = ("FLOAT16", "FLOAT", "BFLOAT16", "DOUBLE")
#: Ops whose inputs after the first are shapes, scales or indices: ONNX Runtime's shape inference reads
#: those constants, so they stay inline.
_SHAPE_INPUT_OPS = {"Resize", "Upsample", "Reshape", "Expand", "Tile", "Slice", "Pad", "ConstantOfShape", "Range",
                    "TopK", "Squeeze", "Unsqueeze", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "Split"}


def externalize_weights(graph: Path) -> None:
    """Rewrite `graph` so that every floating-point initializer lives in `<graph name>.data` (64-byte
    aligned) and everything else (shape constants, which shape inference must read) stays inline.

    Streams: weights already in external data are copied from the memory-mapped old data file, so only
    the graph structure is held in memory (not a second copy of a multi-GB UNet)."""
    import os

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    data_name = f"{graph.name}.data"
    float_types = {getattr(onnx.TensorProto, name) for name in _FLOAT_TYPES}
    shape_inputs = {name for node in model.graph.node if node.op_type in _SHAPE_INPUT_OPS for name in node.input[1:]}
    tmp_data = graph.with_name(data_name + ".tmp")
    sources: dict[str, np.memmap] = {}

    def stored_bytes(init: Any) -> Any:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(init).tobytes()
        info = {entry.key: entry.value for entry in init.external_data}
        location = info["location"]
        if location not in sources:
            sources[location] = np.memmap(graph.parent / location, dtype=np.uint8, mode="r")
        offset = int(info.get("offset", 0))
        return sources[location][offset:offset + int(info["length"])]

    with open(tmp_data, "wb") as out:
        for init in model.graph.initializer:
            keep_inline = init.data_type not in float_types or init.name in shape_inputs
            if keep_inline and init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            raw = stored_bytes(init)
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(name)
            del init.external_data[:]
            if keep_inline:  # an external shape constant comes back inline
                init.data_location = onnx.TensorProto.DEFAULT
                init.raw_data = bytes(raw)
                continue
            offset = out.tell()
            out.write(memoryview(raw))
            out.write(b"\0" * (-len(raw) % 64))
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    sources.clear()
    for stale in graph.parent.iterdir():
        if stale.name != graph.name and stale != tmp_data:
            stale.unlink()
    os.replace(tmp_data, graph.with_name(data_name))
    onnx.save_model(model, str(graph))


def wrapped_part(wrapper: Any) -> tuple[str, Any]:
    """(attribute name, module) of the one child of an export wrapper that holds parameters, or the child the
    wrapper names in `weight_part` (the UNet of a graph with ControlNets fused in)."""
    named = getattr(wrapper, "weight_part", None)
    if named is not None:
        return named, getattr(wrapper, named)
    holders = [(name, child) for name, child in wrapper.named_children() if any(True for _ in child.parameters())]
    if len(holders) != 1:
        raise ValueError(f"{type(wrapper).__name__} wraps {len(holders)} modules with parameters, expected 1")
    return holders[0]


def _key(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    return array.dtype.str, tuple(array.shape), hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def record_weight_map(wrapper: Any, component: str, part: str, graph: Path) -> dict[str, Any]:
    """Map the LoRA-targetable weights of `wrapper`'s part onto `graph`'s initializers (all external)."""
    import onnx
    import torch

    model = onnx.load(str(graph), load_external_data=False)
    data_files = set()
    locations: dict[str, dict[str, Any]] = {}
    by_content: dict[tuple[str, tuple[int, ...], str], list[str]] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue  # shape constants stay inline (see externalize_weights); no weight is among them
        info = {entry.key: entry.value for entry in init.external_data}
        data_files.add(info["location"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        locations[init.name] = {"offset": int(info.get("offset", 0)), "length": int(info["length"]),
                                "shape": [int(d) for d in init.dims], "dtype": np.dtype(dtype).name}
    if len(data_files) > 1:
        raise ValueError(f"{graph.name}: initializers spread over {sorted(data_files)}; expected one data file")
    # Inline constants (shapes, scales) carry no module weight; external ones are read straight from the
    # data file (memory-mapped: no second copy of a full-size UNet in memory).
    if data_files:
        blob = np.memmap(graph.parent / next(iter(data_files)), dtype=np.uint8, mode="r")
        for name, loc in locations.items():
            raw = blob[loc["offset"]:loc["offset"] + loc["length"]]
            array = np.frombuffer(raw, dtype=loc["dtype"]).reshape(loc["shape"])
            by_content.setdefault(_key(array), []).append(name)
        del blob

    _, module = wrapped_part(wrapper)
    modules: dict[str, dict[str, Any]] = {}
    claimed: dict[str, list[str]] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        weight = sub.weight.detach().cpu().numpy()
        path = canonical_module(part, name)
        targets = []
        layouts = [("identity", weight)] + ([("transpose", weight.T)] if weight.ndim == 2 else [])
        for layout, candidate in layouts:
            for initializer in by_content.get(_key(candidate), []):
                loc = locations[initializer]
                targets.append({"initializer": initializer, "layout": layout, "offset": loc["offset"],
                                "length": loc["length"], "shape": loc["shape"]})
                claimed.setdefault(initializer, []).append(path)
        modules[path] = {"shape": list(weight.shape), "dtype": weight.dtype.name, "targets": targets}
    # Identical weights share one initializer after the exporter's de-duplication: such a weight cannot be
    # changed alone, so a LoRA on it must be baked in instead.
    for initializer, owners in claimed.items():
        if len(owners) > 1:
            for path in owners:
                modules[path]["unmapped"] = (f"its initializer {initializer} also carries "
                                             f"{', '.join(o for o in owners if o != path)}")
    used = {t["initializer"] for info in modules.values() for t in info["targets"]}
    return {
        "format": WEIGHT_MAP_FORMAT, "component": component, "part": part,
        "data_file": next(iter(data_files)) if data_files else None,
        "modules": modules,
        "other_initializers": {name: loc for name, loc in locations.items() if name not in used},
    }
