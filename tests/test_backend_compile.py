"""Compile with TVM for x86 and run the artifact: graphs built in code and real models vs onnxruntime."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from graphpress import runtime
from graphpress.backends import compile
from graphpress.backends.timing import sample_inputs
from graphpress.errors import BackendError, ModelLoadError
from test_backend_models import (assert_close, conv_net, onnxruntime_outputs, real_model,
                                 scalar_constant_of_shape_net, two_output_net, unsupported_op_net)


def test_conv_net_matches_onnxruntime_and_binds_batch_to_one(tmp_path):
    model = conv_net()
    artifact = compile(model, "x86", tmp_path / "conv", progress=False)
    loaded = runtime.load(artifact)
    assert loaded.inputs == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert loaded.outputs == [{"name": "y", "shape": [1, 5], "dtype": "float32"}]
    assert loaded.metadata["bound_dims"] == {"N": 1}
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert_close(loaded.run({"x": x}), onnxruntime_outputs(model, {"x": x}))


def test_shape_override_and_tar_artifact(tmp_path):
    model = conv_net()
    artifact = compile(model, "x86", tmp_path / "conv.tar", shapes={"x": [3, 3, 16, 16]}, progress=False)
    assert artifact.is_file()
    loaded = runtime.load(artifact)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    assert_close(loaded.run({"x": x}), onnxruntime_outputs(model, {"x": x}))
    with pytest.raises(BackendError, match="shape given for unknown input"):
        compile(model, "x86", tmp_path / "bad", shapes={"nope": [1]}, progress=False)
    with pytest.raises(BackendError, match="does not fit input 'x'"):
        compile(model, "x86", tmp_path / "bad", shapes={"x": [1, 4, 16, 16]}, progress=False)


def test_int_input_and_two_outputs(tmp_path):
    model = two_output_net()
    loaded = runtime.load(compile(model, "x86-64-v3", tmp_path / "two", progress=False))
    ids = np.array([[0, 3, 9, 1], [2, 2, 5, 7]], dtype=np.int64)
    got = loaded.run({"ids": ids})
    assert list(got) == ["ln", "mean"]
    assert_close(got, onnxruntime_outputs(model, {"ids": ids}))


def test_scalar_constant_of_shape_imports_and_the_given_model_is_not_modified(tmp_path):
    model = scalar_constant_of_shape_net()
    before = model.SerializeToString()
    loaded = runtime.load(compile(model, "x86", tmp_path / "cos", progress=False))
    assert model.SerializeToString() == before
    x = np.array(1.5, dtype=np.float32)  # a 0-d input stays 0-d through the runtime
    assert_close(loaded.run({"x": x}), onnxruntime_outputs(model, {"x": x}))


def test_unsupported_op_names_op_node_and_onnxruntime(tmp_path):
    with pytest.raises(BackendError) as err:
        compile(unsupported_op_net(), "x86", tmp_path / "q", progress=False)
    message = str(err.value)
    assert "QLinearMatMul" in message and "'qmm_node'" in message and "onnxruntime" in message
    assert "\n" not in message
    assert not (tmp_path / "q").exists()


def test_bad_model_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        compile(bad, "x86", tmp_path / "out", progress=False)


@pytest.mark.parametrize("file", ["resnet8_cifar10.onnx", "lenet_mnist.onnx"])
def test_real_model_matches_onnxruntime_and_input_untouched(tmp_path, file):
    path = real_model(file)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    artifact = compile(path, "x86", tmp_path / "art", progress=False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    loaded = runtime.load(artifact)
    inputs = sample_inputs(loaded.inputs, seed=3)
    if file.startswith("resnet8"):  # raw 0..255 pixels, as the model expects
        inputs = {k: (np.abs(v) * 80).astype(np.float32) for k, v in inputs.items()}
    expected = onnxruntime_outputs(path, inputs)
    assert_close(loaded.run(inputs), expected)
    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["source"]["sha256"] == before
    assert meta["versions"]["tvm"].startswith("0.27")
    assert onnx.load_from_string(loaded.onnx_model_bytes()).graph.node  # the ONNX model travels with it


def test_pipeline_runs_before_compiling(tmp_path):
    pytest.importorskip("graphpress.passes")
    model = conv_net()
    artifact = compile(model, "x86", tmp_path / "p", pipeline="fold", progress=False)
    loaded = runtime.load(artifact)
    assert loaded.metadata["pipeline"] == "fold"
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert_close(loaded.run({"x": x}), onnxruntime_outputs(model, {"x": x}))
