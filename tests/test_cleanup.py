"""eliminate-dead, eliminate-identity, dedup-initializers and cse on small models built in code."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphpress.ir as ir
from graphpress.passes import PassContext, get
from test_fold_support import FLOAT, model, ops, run_pass


def test_eliminate_dead_removes_dead_nodes_and_unused_initializers():
    proto = model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Add", ["x", "w"], ["dead"]),
                   helper.make_node("Neg", ["dead"], ["dead2"])],
                  [("x", FLOAT, [2])], [("y", FLOAT, [2])], {"w": np.float32([1, 2]), "unused": np.float32([3])})
    cleaned, stats = run_pass(proto, "eliminate-dead")
    assert ops(cleaned) == ["Relu"]
    assert stats["eliminate-dead"] == {"nodes": 2, "initializers": 1}
    assert not cleaned.to_onnx().graph.initializer


def test_eliminate_dead_leaves_a_live_graph_alone():
    proto = model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])],
                  {"w": np.float32([1, 2])})
    m = ir.load(proto)
    assert not get("eliminate-dead")().run(m, PassContext()).changed


def test_eliminate_identity_bypasses_identity_dropout_and_no_op_casts_reshapes_transposes():
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Dropout", ["a"], ["b"], name="dropout"),
             helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["c", "same"], ["d"]),
             helper.make_node("Transpose", ["d"], ["e"], perm=[0, 1]),
             helper.make_node("Expand", ["e", "ones"], ["f"]),
             helper.make_node("Relu", ["f"], ["y"])]
    proto = model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])],
                  {"same": np.int64([0, -1]), "ones": np.int64([1, 3])})
    cleaned, stats = run_pass(proto, "eliminate-identity")
    assert ops(cleaned) == ["Relu"]
    assert stats["eliminate-identity"] == {"Identity": 1, "Dropout": 1, "Cast": 1, "Reshape": 1, "Transpose": 1,
                                           "Expand": 1}


def test_eliminate_identity_keeps_nodes_that_change_something():
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT64),
             helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["cf", "flat"], ["r"]),
             helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Expand", ["x", "wider"], ["e"]),
             helper.make_node("Dropout", ["x", "ratio", "train"], ["dr", "mask"], seed=0),
             helper.make_node("Dropout", ["x"], ["d2", "mask2"])]
    proto = model(nodes, [("x", FLOAT, [2, 3])],
                  [("r", FLOAT, [6]), ("t", FLOAT, [3, 2]), ("e", FLOAT, [4, 2, 3]), ("dr", FLOAT, [2, 3]),
                   ("mask2", TensorProto.BOOL, [2, 3])],
                  {"flat": np.int64([6]), "wider": np.int64([4, 2, 3]), "ratio": np.float32(0.0),
                   "train": np.bool_(True)}, opset=13)
    m = ir.load(proto)
    assert not get("eliminate-identity")().run(m, PassContext()).changed
    assert ops(m) == ["Cast", "Cast", "Reshape", "Transpose", "Expand", "Dropout", "Dropout"]


def test_identity_between_a_graph_input_and_a_graph_output_is_kept():
    proto = model([helper.make_node("Identity", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])])
    m = ir.load(proto)
    assert not get("eliminate-identity")().run(m, PassContext()).changed


def test_identity_feeding_a_graph_output_hands_over_the_output_name():
    proto = model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
                  [("x", FLOAT, [2])], [("y", FLOAT, [2])])
    cleaned, _ = run_pass(proto, "eliminate-identity")
    assert ops(cleaned) == ["Relu"] and cleaned.graph.outputs[0].name == "y"


def test_dedup_merges_equal_constants_only():
    same = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "w2"], ["b"]),
             helper.make_node("Add", ["b", "w3"], ["c"]),
             helper.make_node("Cast", ["c"], ["ci"], to=TensorProto.INT32),
             helper.make_node("Add", ["ci", "w4"], ["y"])]
    proto = model(nodes, [("x", FLOAT, [2, 3])], [("y", TensorProto.INT32, [2, 3])],
                  {"w1": same, "w2": same.copy(), "w3": same + 1, "w4": same.view(np.int32)})
    cleaned, stats = run_pass(proto, "dedup-initializers")
    assert stats["dedup-initializers"] == {"merged": 1}  # w2 -> w1; w3 differs; w4 has w1's bytes but not its dtype
    assert sorted(i.name for i in cleaned.to_onnx().graph.initializer) == ["w1", "w3", "w4"]


def test_dedup_does_nothing_without_duplicates():
    proto = model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])],
                  {"w": np.float32([1, 2])})
    assert not get("dedup-initializers")().run(ir.load(proto), PassContext()).changed


def test_cse_merges_equal_nodes_transitively():
    nodes = [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Relu", ["x"], ["r2"]),
             helper.make_node("Softmax", ["r1"], ["s1"], axis=1), helper.make_node("Softmax", ["r2"], ["s2"], axis=1),
             helper.make_node("Add", ["s1", "s2"], ["y"])]
    proto = model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])])
    cleaned, stats = run_pass(proto, "cse")
    assert stats["cse"] == {"merged": 2}
    assert ops(cleaned) == ["Relu", "Softmax", "Add"]


def test_cse_keeps_nodes_that_differ_in_inputs_or_attributes():
    nodes = [helper.make_node("Softmax", ["x"], ["s1"], axis=1), helper.make_node("Softmax", ["x"], ["s0"], axis=0),
             helper.make_node("Add", ["x", "a"], ["xa"]), helper.make_node("Add", ["x", "b"], ["xb"]),
             helper.make_node("Sum", ["s1", "s0", "xa", "xb"], ["y"])]
    proto = model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])],
                  {"a": np.float32([1, 2, 3]), "b": np.float32([1, 2, 4])})
    m = ir.load(proto)
    assert not get("cse")().run(m, PassContext()).changed


@pytest.mark.parametrize("op", ["RandomNormalLike", "RandomUniformLike", "Bernoulli"])
def test_cse_never_merges_random_ops(op):
    nodes = [helper.make_node(op, ["p"], ["r1"]), helper.make_node(op, ["p"], ["r2"]),
             helper.make_node("Sub", ["r1", "r2"], ["y"])]
    proto = model(nodes, [("p", FLOAT, [4])], [("y", FLOAT, [4])])
    m = ir.load(proto)
    assert not get("cse")().run(m, PassContext()).changed
    assert ops(m) == [op, op, "Sub"]


def test_cse_keeps_both_nodes_when_each_is_a_graph_output():
    proto = model([helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"])],
                  [("x", FLOAT, [2])], [("y1", FLOAT, [2]), ("y2", FLOAT, [2])])
    cleaned, _ = run_pass(proto, "cse")
    assert [o.name for o in cleaned.to_onnx().graph.output] == ["y1", "y2"]


def test_compact_shortens_internal_names_and_drops_shapes_but_keeps_the_interface():
    """Long internal names (as converters write them) become short counters, also inside an If branch that
    reads an outer tensor; value_info and doc strings go; graph input/output names and outputs stay."""
    long = "MobilenetV2/expanded_conv/depthwise/BatchNorm_Fold/bias_prequant;" * 2
    then_branch = helper.make_graph([helper.make_node("Mul", [long + "a", "w"], ["t_out"])], "then", [],
                                    [helper.make_tensor_value_info("t_out", FLOAT, [2])])
    else_branch = helper.make_graph([helper.make_node("Neg", [long + "a"], ["e_out"])], "else", [],
                                    [helper.make_tensor_value_info("e_out", FLOAT, [2])])
    nodes = [helper.make_node("Relu", ["x"], [long + "a"], name=long + "relu", doc_string="converted from tf"),
             helper.make_node("ReduceSum", [long + "a"], [long + "s"], keepdims=0),
             helper.make_node("Greater", [long + "s", "zero"], [long + "c"]),
             helper.make_node("If", [long + "c"], [long + "b"], then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Clip", [long + "b", "", "six"], ["y"])]   # "" is an omitted optional input
    proto = model(nodes, [("x", FLOAT, [2])], [("y", FLOAT, [2])],
                  {"w": np.float32([2, 3]), "zero": np.float32(0), "six": np.float32(6)})
    proto.graph.value_info.extend([helper.make_tensor_value_info(long + "a", FLOAT, [2])])
    proto.doc_string = "exported"
    for x in (np.float32([1, -2]), np.float32([-1, -2])):
        compacted, stats = run_pass(proto, "compact", inputs={"x": x})
    out = compacted.to_onnx()
    names = [n.name for n in out.graph.node] + [e for n in out.graph.node for e in list(n.input) + list(n.output)]
    assert max(len(name) for name in names) <= 2 and "" in out.graph.node[-1].input
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert not out.graph.value_info and not out.doc_string and not any(n.doc_string for n in out.graph.node)
    assert stats["compact"]["renamed"] == 7 and len(out.SerializeToString()) < len(proto.SerializeToString()) / 2
