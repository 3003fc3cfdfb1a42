"""Lookup tables (embeddings) stored quantized and dequantized after the lookup, row by row.

A `DequantizeLinear` in front of `Gather` would dequantize the whole table on every run: for MiniLM's
30522 x 384 word embeddings that is 11.7M values, most of an int8 model's run time in onnxruntime.
Here each Gather reads the integer table and the per-row scales instead, and only the gathered rows
are turned back into floats:

    int8 table q [V, D]:             Cast(Gather(q, ids)) * Unsqueeze(Gather(scale, ids), -1)
    int4 table, packed p [V, D/2]:   two values a byte (ONNX's Gather takes no INT4 tensors), as
                                     q + 8 in 0..15, element 2j in the low nibble and 2j+1 in the high;
                                     after the Gather: BitwiseAnd(p, 15) and BitShift(p, 4), interleaved
                                     back to D values, then (u - 8) * scale as above.

The result is plain ONNX (opset 18+ for BitwiseAnd in the int4 form) with the same values as the
dequantize-then-gather form.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from .insert import Names, short_name

#: int4 values are stored with this offset in a nibble (0..15)
NIBBLE_OFFSET = 8


def is_lookup_table(tensor: gs.Tensor) -> bool:
    """A constant read only as the data of Gather(axis=0) nodes, 2-D."""
    consumers = list(tensor.outputs)
    return (bool(consumers) and len(tensor.shape or ()) == 2
            and all(c.op == "Gather" and c.inputs[0] is tensor and c.attrs.get("axis", 0) == 0 for c in consumers))


def packed_int4(q: np.ndarray) -> np.ndarray:
    """int4 values [V, D] (D even) -> uint8 [V, D/2], two values a byte (see the module docstring)."""
    u = (np.asarray(q, np.int16) + NIBBLE_OFFSET).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def store_table(model: Model, names: Names, table: gs.Tensor, q: np.ndarray, scale: np.ndarray) -> None:
    """Replace float `table` by integer rows `q` (int8, or int4 with an even row length) and per-row
    `scale`, dequantized after each of its Gathers."""
    base = short_name(table.name)
    four_bit = np.dtype(q.dtype).name == "int4"
    stored = names.constant(f"{base}_quantized", packed_int4(q) if four_bit else np.asarray(q, np.int8))
    scales = names.constant(f"{base}_scale", np.asarray(scale, np.float32).reshape(-1))
    for gather in list(table.outputs):
        output = gather.outputs[0]
        rows = _variable(names, f"{base}_rows", stored.dtype)
        gather.inputs[0] = stored
        gather.outputs[0] = rows
        row_scales = _node(model, names, "Gather", [scales, gather.inputs[1]], f"{base}_row_scale", np.float32,
                           axis=0)
        axis = names.constant(f"{base}_last_axis", np.array([-1], np.int64))
        factor = _node(model, names, "Unsqueeze", [row_scales, axis], f"{base}_row_scale", np.float32)
        values = _unpacked(model, names, rows, base) if four_bit else rows
        floats = _node(model, names, "Cast", [values], f"{base}_rows_float", np.float32, to=1)
        if four_bit:
            offset = names.constant(f"{base}_offset", np.array(NIBBLE_OFFSET, np.float32))
            floats = _node(model, names, "Sub", [floats, offset], f"{base}_rows_centered", np.float32)
        scaled = gs.Node("Mul", names.new(f"{base}_dequantize"), inputs=[floats, factor], outputs=[output])
        model.graph.nodes.append(scaled)


def _unpacked(model: Model, names: Names, packed: gs.Variable, base: str) -> gs.Variable:
    """uint8 [..., D/2] of nibble pairs -> uint8 [..., D] of nibbles, in the original order."""
    low_mask = names.constant(f"{base}_low_mask", np.array(15, np.uint8))
    four = names.constant(f"{base}_four", np.array(4, np.uint8))
    last = names.constant(f"{base}_pair_axis", np.array([-1], np.int64))
    low = _node(model, names, "BitwiseAnd", [packed, low_mask], f"{base}_low", np.uint8)
    high = _node(model, names, "BitShift", [packed, four], f"{base}_high", np.uint8, direction="RIGHT")
    pairs = _node(model, names, "Concat",
                  [_node(model, names, "Unsqueeze", [low, last], f"{base}_low", np.uint8),
                   _node(model, names, "Unsqueeze", [high, last], f"{base}_high", np.uint8)],
                  f"{base}_pairs", np.uint8, axis=-1)
    shape = _node(model, names, "Shape", [packed], f"{base}_shape", np.int64, end=-1)
    width = names.constant(f"{base}_width", np.array([-1], np.int64))
    full = _node(model, names, "Concat", [shape, width], f"{base}_unpacked_shape", np.int64, axis=0)
    return _node(model, names, "Reshape", [pairs, full], f"{base}_nibbles", np.uint8)


def _variable(names: Names, base: str, dtype) -> gs.Variable:
    return gs.Variable(names.new(base), dtype=dtype)


def _node(model: Model, names: Names, op: str, inputs: list, base: str, dtype, **attrs) -> gs.Variable:
    """Append `op(inputs)` with a new output of `dtype`; returns the output."""
    output = _variable(names, base, dtype)
    model.graph.nodes.append(gs.Node(op, names.new(f"{base}_{op.lower()}"), attrs=attrs, inputs=inputs,
                                     outputs=[output]))
    return output
