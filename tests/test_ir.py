"""The IR: lossless round trip, loading errors, atomic saves, queries, edits, comparison."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphpress.ir as ir
from graphpress.errors import ModelLoadError


def small_model(with_if: bool = False) -> onnx.ModelProto:
    """x -> Relu -> Add(w) -> y, with metadata, doc strings and value info to preserve."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], np.arange(6, dtype=np.float32).ravel())
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu", doc_string="the relu"),
             helper.make_node("Add", ["r", "w"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])]
    if with_if:
        then_g = helper.make_graph([helper.make_node("Neg", ["y"], ["t"], name="neg")], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
        else_g = helper.make_graph([helper.make_node("Abs", ["y"], ["e"], name="abs")], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
        nodes += [helper.make_node("ReduceSum", ["y"], ["s"], name="sum", keepdims=0),
                  helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                  helper.make_node("If", ["c"], ["z"], name="if", then_branch=then_g, else_branch=else_g)]
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3]))
    inits = [w] + ([helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])] if with_if else [])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              outputs, inits, doc_string="graph doc",
                              value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.x", 1)],
                              producer_name="test", doc_string="model doc")
    model.model_version = 7
    helper.set_model_props(model, {"author": "me", "license": "MIT"})
    return model


def test_round_trip_keeps_model_facts():
    proto = small_model(with_if=True)
    back = ir.load(proto).to_onnx()
    assert back.doc_string == "model doc" and back.model_version == 7
    assert {(p.key, p.value) for p in back.metadata_props} == {("author", "me"), ("license", "MIT")}
    assert {(o.domain, o.version) for o in back.opset_import} == {("", 17), ("com.x", 1)}
    assert back.graph.doc_string == "graph doc"
    assert next(n for n in back.graph.node if n.name == "relu").doc_string == "the relu"
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in proto.graph.node]
    assert "r" in {v.name for v in back.graph.value_info}
    onnx.checker.check_model(back)


def test_load_sources_agree(tmp_path):
    proto = small_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    for source in (path, str(path), path.read_bytes(), proto):
        assert ir.compare(proto, ir.load(source)).max_abs == 0


def test_nodes_reach_subgraphs():
    model = ir.load(small_model(with_if=True))
    assert {n.name for n in model.nodes("Neg")} == {"neg"}
    assert not list(model.nodes("Neg", recursive=False))
    assert len(model.graphs()) == 3


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty"),
    (b"\x00\x01garbage\xff" * 10, "not an ONNX model"),
])
def test_load_errors_are_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        ir.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    data = small_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated|not an ONNX"):
        ir.load(path)


def test_directory_and_future_opset_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        ir.load(tmp_path)
    proto = small_model()
    proto.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    with pytest.raises(ModelLoadError, match="opset"):
        ir.load(proto)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    model = ir.load(small_model())
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", explode)
    with pytest.raises(OSError):
        ir.save(model, target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    monkeypatch.undo()
    ir.save(model, target)
    assert ir.compare(model, ir.load(target)).max_abs == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_large_models_use_external_data(tmp_path, monkeypatch):
    from graphpress.ir import io
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 16)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 8)
    model = ir.load(small_model())
    path = ir.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert ir.compare(model, ir.load(path)).max_abs == 0


def test_queries():
    model = ir.load(small_model())
    tensors = model.tensors()
    add = next(model.nodes("Add"))
    assert model.producer(tensors["y"]) is add
    assert model.consumers(tensors["r"]) == [add]
    np.testing.assert_array_equal(model.constant_value(tensors["w"]), np.arange(6).reshape(2, 3))
    assert model.constant_value(tensors["r"]) is None
    assert model.unique_name("relu") != "relu" and model.unique_name("fresh") == "fresh"
    assert model.parameter_count() == 6


def test_replace_uses_keeps_graph_output_names():
    model = ir.load(small_model())
    relu = next(model.nodes("Relu"))
    add = next(model.nodes("Add"))
    ir.remove_node(model, add)  # the output y is now produced by the Relu, under the name y
    model.cleanup()
    assert [t.name for t in model.graph.outputs] == ["y"]
    assert model.producer(model.graph.outputs[0]) is relu
    x = {"x": np.array([[-1.0, 2.0, 3.0]], dtype=np.float32)}
    np.testing.assert_array_equal(ir.run(model, x)["y"], [[0, 2, 3]])


def test_replace_graph_output_by_graph_input_inserts_identity():
    model = ir.load(small_model())
    tensors = model.tensors()
    ir.replace_uses(model, tensors["y"], tensors["x"])
    model.cleanup()
    x = {"x": np.array([[-1.0, 2.0, 3.0]], dtype=np.float32)}
    np.testing.assert_array_equal(ir.run(model, x)["y"], x["x"])


def test_insert_node_after():
    model = ir.load(small_model())
    ir.insert_node_after(model, model.tensors()["r"], "Neg")
    x = {"x": np.array([[1.0, 2.0, 3.0]], dtype=np.float32)}
    np.testing.assert_array_equal(ir.run(model, x)["y"], -x["x"] + np.arange(6).reshape(2, 3))


def test_compare_reports_errors_per_output():
    proto = small_model()
    other = small_model()
    other.graph.initializer[0].CopyFrom(
        helper.make_tensor("w", TensorProto.FLOAT, [2, 3], (np.arange(6) + 0.5).astype(np.float32)))
    result = ir.compare(proto, other, inputs={"x": np.ones((2, 3), np.float32)})
    assert result.max_abs == pytest.approx(0.5)
    assert result.max_rel == pytest.approx(0.5 / 6)
    assert not result.within(rtol=1e-3) and result.within(rtol=0.1)


def test_random_inputs_follow_specs():
    inputs = ir.random_inputs(small_model(), dims={"batch": 4})
    assert inputs["x"].shape == (4, 3) and inputs["x"].dtype == np.float32


def test_shape_inference_tolerates_symbolic_dims():
    proto = small_model()
    del proto.graph.value_info[:]
    model = ir.infer_shapes(ir.load(proto))
    r = model.tensors()["r"]
    assert r.shape == ["batch", 3] and ir.static_shape(r) is None
    assert ir.static_shape(model.tensors()["w"]) == (2, 3)


def test_activation_batches_stream_inner_tensors():
    model = ir.load(small_model())
    batches = [{"x": np.full((1, 3), v, np.float32)} for v in (-1.0, 2.0)]
    seen = list(ir.activation_batches(model, ["r", "w"], batches))
    np.testing.assert_array_equal(seen[0]["r"], [[0, 0, 0]])
    np.testing.assert_array_equal(seen[1]["r"], [[2, 2, 2]])
    assert seen[1]["w"].shape == (2, 3)
