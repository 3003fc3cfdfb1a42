"""fold-constants, fold-shapes and the `fold` pipeline on small models built in code."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphpress.ir as ir
from graphpress.passes import PassContext, PassManager, get
from test_fold_support import FLOAT, model, ops, run_pass

INT64 = TensorProto.INT64


def test_constant_chain_folds_into_one_initializer():
    proto = model([helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", FLOAT, [3], [2, 2, 2])),
                   helper.make_node("Mul", ["two", "w"], ["w2"]),
                   helper.make_node("Sqrt", ["w2"], ["s"]),
                   helper.make_node("Add", ["x", "s"], ["y"])],
                  [("x", FLOAT, ["n", 3])], [("y", FLOAT, ["n", 3])], {"w": np.float32([1, 4.5, 8])})
    folded, stats = run_pass(proto, "fold-constants")
    assert ops(folded) == ["Add"]
    assert stats["fold-constants"]["folded"] == 2 and stats["fold-constants"]["constant_nodes"] == 1
    np.testing.assert_allclose(folded.constant_value(folded.graph.nodes[0].inputs[1]), [np.sqrt(2), 3, 4])


def test_random_ops_and_nodes_reading_inputs_are_not_folded():
    proto = model([helper.make_node("RandomUniformLike", ["w"], ["r"], seed=1.0),
                   helper.make_node("Mul", ["r", "zero"], ["z"]),
                   helper.make_node("Add", ["x", "z"], ["y"])],
                  [("x", FLOAT, [3])], [("y", FLOAT, [3])], {"w": np.ones(3, np.float32), "zero": np.zeros(3, np.float32)})
    folded, stats = run_pass(proto, "fold-constants")
    assert ops(folded) == ["RandomUniformLike", "Mul", "Add"]
    assert not stats["fold-constants"]


def test_custom_domain_nodes_are_not_folded():
    proto = model([helper.make_node("Twice", ["w"], ["t"], domain="com.example"),
                   helper.make_node("Add", ["x", "t"], ["y"])],
                  [("x", FLOAT, [3])], [("y", FLOAT, [3])], {"w": np.ones(3, np.float32)}, domains=["com.example"])
    m = ir.load(proto)
    assert not get("fold-constants")().run(m, PassContext()).changed
    assert ops(m) == ["Twice", "Add"]


def test_size_limit_keeps_broadcast_constants_small_but_materializes_weights():
    big = [64, 64, 16, 16]  # 1 MiB of float32
    proto = model([helper.make_node("Expand", ["half", "shape"], ["halves"]),
                   helper.make_node("ConstantOfShape", ["wshape"], ["weight"],
                                    value=helper.make_tensor("v", FLOAT, [1], [0.01])),
                   helper.make_node("Conv", ["x", "weight"], ["c"]),
                   helper.make_node("Mul", ["c", "halves"], ["y"])],
                  [("x", FLOAT, [1, 64, 16, 16])], [("y", FLOAT, big)],
                  {"half": np.float32(0.5), "shape": np.int64(big), "wshape": np.int64([64, 64, 1, 1])})
    pass_ = get("fold-constants")(size_floor_kb=16)
    m = ir.load(proto)
    stats = pass_.run(m, PassContext()).stats
    assert ops(m) == ["Expand", "Conv", "Mul"]  # the 1 MiB Expand stays; the 16 KiB weight is folded
    assert stats == {"folded": 1, "kept_oversized": 1}
    assert ir.compare(proto, m).within(1e-6)
    roomy = ir.load(proto)
    get("fold-constants")(size_floor_kb=4096).run(roomy, PassContext())
    assert ops(roomy) == ["Conv", "Mul"]


def test_graph_output_computed_from_constants_keeps_its_name():
    proto = model([helper.make_node("Neg", ["w"], ["c"]), helper.make_node("Add", ["x", "w"], ["y"])],
                  [("x", FLOAT, [2])], [("y", FLOAT, [2]), ("c", FLOAT, [2])], {"w": np.float32([1, 2])})
    folded, _ = run_pass(proto, "fold-constants")
    assert [o.name for o in folded.to_onnx().graph.output] == ["y", "c"]


def test_constants_inside_if_branches_fold_and_the_if_survives():
    then_g = helper.make_graph([helper.make_node("Constant", [], ["k"], value=helper.make_tensor("v", FLOAT, [1], [3])),
                                helper.make_node("Mul", ["x", "k"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", FLOAT, None)])
    proto = model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                   helper.make_node("Greater", ["s", "zero"], ["cond"]),
                   helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                  [("x", FLOAT, [3])], [("y", FLOAT, [3])], {"zero": np.float32(0)})
    for sign in (1, -1):
        folded, stats = run_pass(proto, "fold-constants", inputs={"x": sign * np.float32([1, 2, 3])})
        assert stats["fold-constants"]["constant_nodes"] == 1
        assert "If" in ops(folded)
        assert "Constant" not in [n.op for n in folded.nodes()]


def shape_model():
    """x [batch, 3, 4] -> Reshape(x, [Shape(x)[0], Shape(x)[1] * Shape(x)[2]]), plus Size(x[0]) paths."""
    axes = {"zero": np.int64([0])}
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "i0"], ["batch"]),
             helper.make_node("Gather", ["shape", "i1"], ["d1"]),
             helper.make_node("Slice", ["shape", "two", "three"], ["d2"]),
             helper.make_node("Unsqueeze", ["batch", "zero"], ["batch1"]),
             helper.make_node("Unsqueeze", ["d1", "zero"], ["d1_1"]),
             helper.make_node("Mul", ["d1_1", "d2"], ["flat"]),
             helper.make_node("Concat", ["batch1", "flat"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    inits = {"i0": np.int64(0), "i1": np.int64(1), "two": np.int64([2]), "three": np.int64([3]), **axes}
    return model(nodes, [("x", FLOAT, ["batch", 3, 4])], [("y", FLOAT, ["batch", 12])], inits)


def test_fold_shapes_folds_static_dims_next_to_symbolic_ones():
    proto = shape_model()
    folded, stats = run_pass(proto, "fold-shapes,fold-constants", inputs={"x": np.ones((5, 3, 4), np.float32)})
    assert stats["fold-shapes"]["folded"] == 2  # Gather(shape, 1) and Slice(shape, 2:3); not Gather(shape, 0)
    assert ops(folded) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]


def test_fold_shapes_does_not_fire_when_every_dim_read_is_symbolic():
    proto = model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i"], ["b"]),
                   helper.make_node("Unsqueeze", ["b", "zero"], ["b1"]),
                   helper.make_node("Expand", ["one", "b1"], ["y"])],
                  [("x", FLOAT, ["batch", 3])], [("y", FLOAT, ["batch"])],
                  {"i": np.int64(0), "zero": np.int64([0]), "one": np.float32([1])})
    folded, stats = run_pass(proto, "fold-shapes", inputs={"x": np.ones((4, 3), np.float32)})
    assert stats["fold-shapes"] == {"folded": 0}
    assert ops(folded) == ["Shape", "Gather", "Unsqueeze", "Expand"]


def test_fold_shapes_replaces_a_fully_static_shape_and_size():
    proto = model([helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("Size", ["x"], ["n"]),
                   helper.make_node("Cast", ["n"], ["nf"], to=FLOAT),
                   helper.make_node("Reshape", ["x", "s"], ["r"], allowzero=0),
                   helper.make_node("Mul", ["r", "nf"], ["y"])],
                  [("x", FLOAT, [1, 2, 3])], [("y", FLOAT, [2, 3])])
    folded, stats = run_pass(proto, "fold-shapes,fold-constants")
    assert stats["fold-shapes"]["folded"] == 2
    assert ops(folded) == ["Reshape", "Mul"]


def test_fold_pipeline_reaches_a_fixed_point_and_keeps_subgraphs():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", FLOAT, None)])
    proto = model([helper.make_node("Shape", ["x"], ["s"]),
                   helper.make_node("Reshape", ["x", "s"], ["x2"]),
                   helper.make_node("Identity", ["x2"], ["x3"]),
                   helper.make_node("Relu", ["x3"], ["a"]), helper.make_node("Relu", ["x3"], ["b"]),
                   helper.make_node("Add", ["a", "b"], ["ab"]),
                   helper.make_node("ReduceSum", ["ab"], ["sum"], keepdims=0),
                   helper.make_node("Greater", ["sum", "zero"], ["cond"]),
                   helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                  [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], {"zero": np.float32(0)})
    folded, stats = run_pass(proto, "fold")
    assert ops(folded) == ["Relu", "Add", "ReduceSum", "Greater", "If"]
    assert stats["fold"]["rounds"] >= 2
    again = PassManager("fold")
    again.run(folded)
    assert not again.records[-1].changed


def test_fold_is_registered_with_its_options():
    fold = get("fold")
    assert {o.key for o in fold.options()} >= {"max-iterations", "max-growth", "size-floor-kb"}
    pm = PassManager("fold(max-iterations=2)")
    m = ir.load(shape_model())
    pm.run(m)
    assert pm.records[-1].stats["rounds"] <= 2


def test_fold_constants_survives_ops_onnxruntime_cannot_evaluate_together():
    # a string-typed Constant cannot become an initializer; the numeric chain beside it still folds
    proto = model([helper.make_node("Constant", [], ["words"], value=helper.make_tensor("s", TensorProto.STRING, [1], [b"a"])),
                   helper.make_node("Identity", ["words"], ["w2"]),
                   helper.make_node("Neg", ["w"], ["nw"]), helper.make_node("Add", ["x", "nw"], ["y"])],
                  [("x", FLOAT, [2])], [("y", FLOAT, [2]), ("w2", TensorProto.STRING, [1])], {"w": np.float32([1, 2])})
    folded, _ = run_pass(proto, "fold-constants")
    assert "Neg" not in ops(folded)


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_fold_on_old_and_new_opsets(opset):
    proto = model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["f"], to=FLOAT),
                   helper.make_node("Add", ["x", "f"], ["y"])],
                  [("x", FLOAT, [2])], [("y", FLOAT, [2])], opset=opset)
    folded, _ = run_pass(proto, "fold")
    assert ops(folded) == ["Add"]


def test_shapes_are_inferred_for_ir3_models_whose_initializers_are_not_inputs():
    # IR 3 wants initializers listed as inputs too (the light models do that); gs drops them from the
    # inputs, and shape inference ignores initializers that are not inputs in an IR-3 model
    proto = model([helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("Shape", ["m"], ["s"]),
                   helper.make_node("Reshape", ["m", "s"], ["y"])],
                  [("x", FLOAT, [2, 3]), ("k", FLOAT, [1, 3])], [("y", FLOAT, [2, 3])],
                  {"k": np.ones((1, 3), np.float32)}, opset=9)
    proto.ir_version = 3
    onnx.checker.check_model(proto)
    folded, _ = run_pass(proto, "fold", inputs={"x": np.ones((2, 3), np.float32)})
    assert ops(folded) == ["Mul"]


def test_loop_body_is_cleaned_and_the_loop_survives():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Constant", [], ["step"], value=helper.make_tensor("v", FLOAT, [1], [0.5])),
         helper.make_node("Identity", ["step"], ["step2"]),
         helper.make_node("Add", ["acc_in", "step2"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", FLOAT, [1])])
    proto = model([helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
                  [("x", FLOAT, [1])], [("y", FLOAT, [1])], {"trips": np.int64(4)})
    folded, stats = run_pass(proto, "fold")
    assert ops(folded) == ["Loop"]
    body_ops = [n.op for n in folded.graph.nodes[0].attrs["body"].nodes]
    assert "Constant" not in body_ops and body_ops.count("Identity") == 1  # cond_in -> cond_out must stay


def test_a_node_onnxruntime_cannot_evaluate_does_not_stop_the_others():
    # the dead Reshape cannot run (6 values into 4), so the one-session evaluation fails; node-by-node
    # evaluation still folds Neg and leaves the Reshape as it was
    proto = model([helper.make_node("Reshape", ["w", "bad"], ["dead"]), helper.make_node("Neg", ["w"], ["nw"]),
                   helper.make_node("Add", ["x", "nw"], ["y"])],
                  [("x", FLOAT, [6])], [("y", FLOAT, [6])], {"w": np.arange(6, dtype=np.float32), "bad": np.int64([4])})
    m = ir.load(proto)
    stats = get("fold-constants")().run(m, PassContext()).stats
    assert stats["folded"] == 1
    assert ops(m) == ["Add"]  # (the dead Reshape is gone with the clean-up, not folded)
    x = np.ones(6, np.float32)
    np.testing.assert_array_equal(ir.run(m, {"x": x})["y"], x - np.arange(6))


@pytest.mark.parametrize("condition,expected_op", [(True, "Mul"), (False, "Neg")])
def test_if_on_a_constant_condition_is_inlined(condition, expected_op):
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", FLOAT, [3])])
    proto = model([helper.make_node("Not", ["flag"], ["cond"]),
                   helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                  [("x", FLOAT, [3])], [("y", FLOAT, [3])],
                  {"flag": np.bool_(not condition), "two": np.float32(2)})
    folded, stats = run_pass(proto, "fold,inline-if,fold")
    assert ops(folded) == [expected_op] and folded.graph.outputs[0].name == "y"
    assert stats["inline-if"]["inlined"] == 1


def test_if_on_an_input_condition_is_not_inlined():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", FLOAT, [3])])
    proto = model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                  [("x", FLOAT, [3]), ("cond", TensorProto.BOOL, [])], [("y", FLOAT, [3])])
    m = ir.load(proto)
    assert not get("inline-if")().run(m, PassContext()).changed
    assert ops(m) == ["If"]
