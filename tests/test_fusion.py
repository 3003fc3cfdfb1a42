"""fuse-conv-bn, fuse-conv-affine and fuse-matmul-add on small models built in code."""

import numpy as np
import pytest
from onnx import helper

import graphpress.ir as ir
from graphpress.ir.model import PROVENANCE_PREFIX
from graphpress.passes import PassContext, get
from test_fold_support import FLOAT, model, ops, run_pass

RNG = np.random.default_rng(0)


def conv_inits(with_bias: bool = True, groups: int = 1) -> dict:
    inits = {"w": RNG.standard_normal((4, 6 // groups, 3, 3)).astype(np.float32)}
    if with_bias:
        inits["b"] = RNG.standard_normal(4).astype(np.float32)
    return inits


def bn_inits() -> dict:
    return {"scale": RNG.uniform(0.5, 2, 4).astype(np.float32), "beta": RNG.standard_normal(4).astype(np.float32),
            "mean": RNG.standard_normal(4).astype(np.float32), "var": RNG.uniform(0.1, 3, 4).astype(np.float32)}


X = [("x", FLOAT, [1, 6, 8, 8])]
Y = [("y", FLOAT, [1, 4, 6, 6])]


@pytest.mark.parametrize("with_bias,groups", [(True, 1), (False, 1), (True, 2)])
def test_conv_bn_becomes_one_conv(with_bias, groups):
    conv_in = ["x", "w", "b"] if with_bias else ["x", "w"]
    proto = model([helper.make_node("Conv", conv_in, ["c"], group=groups),
                   helper.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["y"], epsilon=1e-3)],
                  X, Y, {**conv_inits(with_bias, groups), **bn_inits()})
    fused, stats = run_pass(proto, "fuse-conv-bn")
    assert ops(fused) == ["Conv"] and stats["fuse-conv-bn"] == {"conv-bn": 1}
    assert fused.graph.outputs[0].name == "y"
    assert fused.node_docs[fused.graph.nodes[0].name].startswith(PROVENANCE_PREFIX)


def test_conv_bn_is_left_alone_when_the_conv_output_has_another_reader_or_bn_params_are_inputs():
    shared = model([helper.make_node("Conv", ["x", "w", "b"], ["c"]),
                    helper.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["y"]),
                    helper.make_node("Relu", ["c"], ["z"])],
                   X, Y + [("z", FLOAT, [1, 4, 6, 6])], {**conv_inits(), **bn_inits()})
    m = ir.load(shared)
    assert not get("fuse-conv-bn")().run(m, PassContext()).changed
    params_in = model([helper.make_node("Conv", ["x", "w", "b"], ["c"]),
                       helper.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["y"])],
                      X + [("var", FLOAT, [4])], Y, {**conv_inits(), **{k: v for k, v in bn_inits().items() if k != "var"}})
    m = ir.load(params_in)
    assert not get("fuse-conv-bn")().run(m, PassContext()).changed
    assert ops(m) == ["Conv", "BatchNormalization"]


@pytest.mark.parametrize("op,shape", [("Mul", (4, 1, 1)), ("Mul", (1, 4, 1, 1)), ("Mul", ()), ("Add", (4, 1, 1)),
                                      ("Add", (1,))])
def test_conv_then_per_channel_mul_or_add_becomes_one_conv(op, shape):
    proto = model([helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node(op, ["k", "c"], ["y"])],
                  X, Y, {**conv_inits(), "k": RNG.uniform(0.5, 2, shape).astype(np.float32)})
    fused, stats = run_pass(proto, "fuse-conv-affine")
    assert ops(fused) == ["Conv"] and stats["fuse-conv-affine"][f"conv-{op.lower()}"] == 1


@pytest.mark.parametrize("shape", [(6, 6), (1, 1, 6, 6), (2, 4, 1, 1)])
def test_conv_then_spatial_or_rank_raising_mul_is_left_alone(shape):
    out_shape = [2, 4, 6, 6] if shape[0] == 2 else [1, 4, 6, 6]
    proto = model([helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])],
                  X, [("y", FLOAT, out_shape)], {**conv_inits(), "k": np.ones(shape, np.float32)})
    m = ir.load(proto)
    assert not get("fuse-conv-affine")().run(m, PassContext()).changed


def test_matmul_add_becomes_gemm_for_2d_input():
    proto = model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                  [("x", FLOAT, ["n", 5])], [("y", FLOAT, ["n", 3])],
                  {"w": RNG.standard_normal((5, 3)).astype(np.float32), "b": RNG.standard_normal(3).astype(np.float32)})
    fused, stats = run_pass(proto, "fuse-matmul-add", inputs={"x": RNG.standard_normal((4, 5)).astype(np.float32)})
    assert ops(fused) == ["Gemm"] and stats["fuse-matmul-add"] == {"matmul-add": 1}


@pytest.mark.parametrize("x_shape,bias_shape,y_shape", [(["n", "s", 5], (3,), ["n", "s", 3]),
                                                      (["n", 5], (2, 1, 3), [2, "n", 3]), ([4, 5], (4, 3, 1), [4, 4, 3])])
def test_matmul_add_is_left_alone_for_3d_input_or_a_bias_that_broadcasts_the_output(x_shape, bias_shape, y_shape):
    proto = model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                  [("x", FLOAT, x_shape)], [("y", FLOAT, y_shape)],
                  {"w": np.ones((5, 3), np.float32), "b": np.ones(bias_shape, np.float32)})
    m = ir.load(proto)
    assert not get("fuse-matmul-add")().run(m, PassContext()).changed
    assert ops(m) == ["MatMul", "Add"]


def test_batchnorm_then_per_channel_mul_and_add_become_one_batchnorm():
    proto = model([helper.make_node("BatchNormalization", ["x", "scale", "beta", "mean", "var"], ["n"]),
                   helper.make_node("Mul", ["n", "k"], ["m"]), helper.make_node("Add", ["c", "m"], ["y"])],
                  [("x", FLOAT, [2, 4, 5, 5])], [("y", FLOAT, [2, 4, 5, 5])],
                  {**bn_inits(), "k": RNG.uniform(0.5, 2, (4, 1, 1)).astype(np.float32),
                   "c": RNG.standard_normal((1, 4, 1, 1)).astype(np.float32)})
    fused, stats = run_pass(proto, "fuse-conv-affine", inputs={"x": RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)})
    assert ops(fused) == ["BatchNormalization"]
    assert stats["fuse-conv-affine"] == {"conv-mul": 0, "conv-add": 0, "bn-mul": 1, "bn-add": 1}


def test_batchnorm_then_spatial_mul_is_left_alone():
    proto = model([helper.make_node("BatchNormalization", ["x", "scale", "beta", "mean", "var"], ["n"]),
                   helper.make_node("Mul", ["n", "k"], ["y"])],
                  [("x", FLOAT, [2, 4, 5, 5])], [("y", FLOAT, [2, 4, 5, 5])],
                  {**bn_inits(), "k": np.ones((5, 5), np.float32)})
    m = ir.load(proto)
    assert not get("fuse-conv-affine")().run(m, PassContext()).changed
