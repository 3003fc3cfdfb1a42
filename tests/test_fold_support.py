"""Helpers shared by the fold/clean-up/fusion tests: build a small model, run a pass, compare outputs.

(It holds no tests itself; the name keeps it next to the tests that use it.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphpress.ir as ir
from graphpress.passes import PassContext, get

FLOAT = TensorProto.FLOAT


def model(nodes, inputs, outputs, initializers=(), opset: int = 17, domains=()) -> onnx.ModelProto:
    """A ModelProto from nodes, (name, elem type, shape) inputs/outputs and {name: array} initializers."""
    def info(spec):
        name, elem, shape = spec
        return helper.make_tensor_value_info(name, elem, shape)

    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()]
    graph = helper.make_graph(nodes, "g", [info(i) for i in inputs], [info(o) for o in outputs], inits)
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    proto = helper.make_model(graph, opset_imports=imports)
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def run_pass(proto: onnx.ModelProto, pipeline: str, inputs=None, rtol: float = 1e-5):
    """Apply `pipeline` (a pass name, or several joined by commas) to `proto` and check the result is
    valid and computes what the original computes in onnxruntime. Returns (model, {pass: stats})."""
    original = ir.load(proto)
    result = ir.load(proto)
    ctx = PassContext()
    stats = {}
    for name in pipeline.split(","):
        stats[name] = get(name)().run(result, ctx).stats
    onnx.checker.check_model(result.to_onnx())
    comparison = ir.compare(original, result, inputs=inputs)
    assert comparison.within(rtol, 1e-6), str(comparison)
    return result, stats


def ops(m: ir.Model) -> list[str]:
    return [n.op for n in m.graph.nodes]
