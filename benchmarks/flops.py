"""FLOPs per image counted from a bundle's ONNX graphs (2 FLOP per multiply-add).

Counted: Conv, ConvTranspose, MatMul and Gemm (attention is exported as MatMul pairs, so it is included).
Elementwise ops, normalizations and softmax are left out: they are memory-bound and small next to
the products (under 2% of the UNet's FLOPs). Shapes come from ONNX shape inference on the static graph.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Any


def _shapes(model: Any) -> dict[str, list[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    shapes: dict[str, list[int]] = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def node_flops(op: str, inputs: list[list[int] | None], outputs: list[list[int] | None], attrs: dict[str, Any]) -> int:
    """FLOPs of one node from its input/output shapes (0 for ops that are not counted)."""
    if op in ("Conv", "ConvTranspose"):
        x, w, y = inputs[0], inputs[1], outputs[0]
        if x is None or w is None or y is None:
            return 0
        kernel = prod(w[2:])
        if op == "Conv":  # w: (Cout, Cin/groups, k...): each output value takes Cin/groups * k MACs
            return 2 * prod(y) * w[1] * kernel
        return 2 * prod(x) * w[1] * kernel  # w: (Cin, Cout/groups, k...): each input value feeds that many
    if op == "MatMul":
        a, b, y = inputs[0], inputs[1], outputs[0]
        if a is None or b is None or y is None:
            return 0
        k = a[-1]
        return 2 * prod(y) * k
    if op == "Gemm":
        a, y = inputs[0], outputs[0]
        if a is None or y is None:
            return 0
        k = a[0] if int(attrs.get("transA", 0)) else a[-1]
        return 2 * prod(y) * k
    return 0


def graph_flops(path: Path) -> int:
    """Total counted FLOPs of one ONNX graph (weights are not loaded, only their shapes)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    shapes = _shapes(model)
    total = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        total += node_flops(node.op_type, [shapes.get(i) for i in node.input], [shapes.get(o) for o in node.output],
                            attrs)
    return total


def bundle_flops(bundle: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """FLOPs per image per component (a UNet figure is one step); divided by the bundle's batch."""
    batch = int(manifest["shapes"]["batch"])
    return {name: graph_flops(bundle / entry["onnx"]) // batch for name, entry in manifest["components"].items()}
