"""Valid ranges of integer model inputs that index a table (Gather indices), for the runtime to check.

TVM imports ONNX Gather with its "fast" take, which does not check indices: an out-of-range one
reads past the table (garbage outputs, or a crash), where onnxruntime refuses the input. MiniLM's
`input_ids` index a 30522-row embedding table, its `token_type_ids` a 2-row one. At compile time we
follow each integer graph input through value-preserving ops to the Gathers it indexes and record the
range every table accepts, [-rows, rows - 1]; `runtime.CompiledModel.run` checks inputs against it.
"""

from __future__ import annotations

import onnx

#: ops whose output holds the same integer values as their first input
_SAME_VALUES = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand"}
_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                  onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32}


def gather_index_bounds(proto: onnx.ModelProto) -> dict[str, dict]:
    """{input name: {"range": [low, high], "node": the Gather that bounds it most}} for graph inputs
    used as Gather indices into a table of known size (an initializer or Constant)."""
    sizes = {init.name: list(init.dims) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            sizes[node.output[0]] = list(node.attribute[0].t.dims)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    bounds = {}
    for value in proto.graph.input:
        if value.name in sizes or value.type.tensor_type.elem_type not in _INTEGER_TYPES:
            continue
        best = None
        for gather in _gathers_indexed_by(value.name, readers):
            table = sizes.get(gather.input[0])
            if table is None:
                continue
            axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
            rows = table[axis % len(table)]
            if best is None or rows < best[0]:
                best = (rows, gather.name or gather.output[0])
        if best is not None:
            bounds[value.name] = {"range": [-best[0], best[0] - 1], "node": best[1]}
    return bounds


def _gathers_indexed_by(name: str, readers: dict) -> list[onnx.NodeProto]:
    """Gather nodes whose indices are `name`'s values, directly or through `_SAME_VALUES` ops."""
    found, frontier, seen = [], [name], {name}
    while frontier:
        tensor = frontier.pop()
        for node in readers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                found.append(node)
            elif node.op_type in _SAME_VALUES and node.input[0] == tensor and node.output[0] not in seen:
                seen.add(node.output[0])
                frontier.append(node.output[0])
    return found
