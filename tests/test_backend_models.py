"""Small ONNX graphs built in code, and the real-model paths, shared by the backend tests.

(The module holds no tests itself; its name keeps it beside the other backend test files.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REAL_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
RTOL = 1e-4


def real_model(file: str) -> Path:
    """Path of a model in ../shared/models, or skip the test saying where it was looked for."""
    path = REAL_MODELS / file
    if not path.is_file():
        pytest.skip(f"real model {file} not found in {REAL_MODELS} (the shared models sit beside the repo)")
    return path


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def conv_net(batch: str | int = "N") -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv -> Relu -> MaxPool -> Flatten -> Gemm -> Softmax -> y[N,5]."""
    rng = np.random.default_rng(0)
    inits = [_const("w", rng.standard_normal((8, 3, 3, 3)) * 0.3), _const("b", rng.standard_normal(8) * 0.1),
             _const("fw", rng.standard_normal((5, 8 * 8 * 8)) * 0.05), _const("fb", rng.standard_normal(5) * 0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["g"], name="fc", transB=1),
        helper.make_node("Softmax", ["g"], ["y"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "conv_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_output_net() -> onnx.ModelProto:
    """Token ids (int64) -> embedding Gather -> LayerNormalization and ReduceMean: two outputs, int input."""
    rng = np.random.default_rng(1)
    inits = [_const("table", rng.standard_normal((10, 6))), _const("scale", rng.standard_normal(6)),
             _const("bias", rng.standard_normal(6)), numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("LayerNormalization", ["e", "scale", "bias"], ["ln"], name="ln", axis=-1),
        helper.make_node("ReduceMean", ["ln", "axes"], ["mean"], name="pool", keepdims=0),
    ]
    graph = helper.make_graph(nodes, "two_outputs", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])],
                              [helper.make_tensor_value_info("ln", TensorProto.FLOAT, [2, 4, 6]),
                               helper.make_tensor_value_info("mean", TensorProto.FLOAT, [2, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def unsupported_op_net() -> onnx.ModelProto:
    """A graph with QLinearMatMul, which TVM 0.27's ONNX importer has no converter for."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z"),
             numpy_helper.from_array(np.ones((4, 3), np.uint8), "w")]
    nodes = [helper.make_node("QLinearMatMul", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="qmm_node")]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def onnxruntime_outputs(model: onnx.ModelProto | Path, inputs: dict) -> dict[str, np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


def assert_close(actual: dict, expected: dict, rtol: float = RTOL) -> None:
    """Outputs match by name within `rtol` relative to each output's largest magnitude."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = max(float(np.abs(want).max()), 1e-6)
        error = float(np.abs(got.astype(np.float64) - want).max()) / scale
        assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol}"


def scalar_constant_of_shape_net() -> onnx.ModelProto:
    """y = x * ConstantOfShape(shape=[]), x and y 0-d: a scalar made from an empty shape, as exported BERT masks do."""
    empty = numpy_helper.from_array(np.zeros(0, np.int64), "empty_shape")
    nodes = [helper.make_node("Constant", [], ["shape"], name="shape_const", value=empty),
             helper.make_node("ConstantOfShape", ["shape"], ["two"], name="scalar_two",
                              value=numpy_helper.from_array(np.array([2.0], np.float32))),
             helper.make_node("Mul", ["x", "two"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "scalar_cos", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
