"""prune-channels on graphs built in code: one per dependency kind, plus no-op, frozen and option cases.

The central trick: a channel whose weights (producer rows, consumer columns, depthwise filters) are all
zero has importance 0, so it must be the one removed, and removing it must leave the outputs unchanged
(to float rounding); every test checks both, with onnxruntime on the original model as reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphpress.ir as ir
from graphpress.errors import PassError
from graphpress.ir.cost import macs
from graphpress.passes import PassContext, PassManager
from graphpress.pruning.groups import analyze
from graphpress.ir.cost import tensor_shapes


class Builder:
    """A tiny graph builder: random weights, named nodes, ONNX opset 17."""

    def __init__(self, input_shape, seed=0, opset=17):
        self.rng = np.random.default_rng(seed)
        self.input_shape = input_shape
        self.nodes, self.inits = [], []
        self.opset = opset
        self.count = 0

    def const(self, name, value):
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, name=None, outputs=1, **attrs):
        self.count += 1
        name = name or f"{op.lower()}{self.count}"
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def weight(self, name, shape):
        return self.const(name, self.rng.standard_normal(shape).astype(np.float32) * 0.5)

    def conv(self, x, cin, cout, name, k=3, group=1, bias=True, stride=1):
        w = self.weight(f"{name}.w", (cout, cin // group, k, k))
        inputs = [x, w] + ([self.weight(f"{name}.b", (cout,))] if bias else [])
        return self.node("Conv", inputs, name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group,
                         strides=[stride, stride])

    def bn(self, x, c, name):
        r = self.rng
        params = [self.const(f"{name}.{p}", v.astype(np.float32)) for p, v in
                  (("scale", r.uniform(0.5, 1.5, c)), ("bias", r.standard_normal(c)),
                   ("mean", r.standard_normal(c) * 0.1), ("var", r.uniform(0.5, 1.5, c)))]
        return self.node("BatchNormalization", [x] + params, name=name)

    def model(self, output) -> ir.Model:
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.input_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.inits)
        return ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)]))


def kill(model: ir.Model, channels: dict[str, list[int]], consumers: dict[str, list[int]]) -> ir.Model:
    """Zero output rows (`channels`: weight initializer -> rows along axis 0, biases too) and input columns
    (`consumers`: weight initializer -> columns along axis 1) so those channels have importance 0."""
    tensors = model.graph.tensors()
    for name, rows in channels.items():
        tensors[name].values = _zeroed(tensors[name].values, rows, 0)
    for name, cols in consumers.items():
        tensors[name].values = _zeroed(tensors[name].values, cols, 1)
    return model


def _zeroed(value, index, axis):
    value = np.array(value)
    where = [slice(None)] * value.ndim
    where[axis] = index
    value[tuple(where)] = 0
    return value


def prune(model: ir.Model, pipeline="prune-channels(ratio=0.25)", calibration=None):
    ctx = PassContext(calibration=calibration)
    pruned = PassManager(pipeline).run(model.copy(), ctx)
    return pruned, ctx.reports["prune-channels"]


def assert_same_outputs(original, pruned, atol=1e-4, shape=(1, 3, 8, 8)):
    inputs = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    comparison = ir.compare(original, pruned, inputs)
    assert comparison.within(rtol=1e-4, atol=atol), str(comparison)


def weight(model, name_prefix, index=1):
    node = next(n for n in model.graph.nodes if n.name == name_prefix)
    return np.asarray(model.constant_value(node.inputs[index]))


# ---- dependency kinds --------------------------------------------------------------------------------
def residual_model():
    b = Builder(["N", 3, 8, 8])
    stem = b.node("Relu", [b.conv("x", 3, 8, "stem")])
    branch = b.node("Relu", [b.bn(b.conv(stem, 8, 8, "c1"), 8, "bn1")])
    branch = b.bn(b.conv(branch, 8, 8, "c2"), 8, "bn2")
    added = b.node("Relu", [b.node("Add", [stem, branch], name="add")])
    head = b.conv(added, 8, 4, "head", k=1)
    return b.model(b.node("GlobalAveragePool", [head])), b


def test_residual_add_ties_both_branches_and_removes_the_dead_channel():
    model, _ = residual_model()
    # channel 5 of the residual stream: written by stem and c2 (+bn2), read by c1 and head
    kill(model, {"stem.w": [5], "stem.b": [5], "c2.w": [5], "c2.b": [5], "bn2.scale": [5], "bn2.bias": [5]},
         {"c1.w": [5], "head.w": [5]})
    shapes = tensor_shapes(ir.infer_shapes(model))
    cg = analyze(model, shapes)
    stream = [g for g in cg.prunable() if cg.space_of(model.graph.tensors()["add_out"]) in g.spaces]
    assert len(stream) == 1 and stream[0].size == 8
    names = {cg.spaces[s].tensor.name for s in stream[0].spaces}
    assert {"stem_out", "bn2_out", "add_out"} <= names

    pruned, report = prune(model, "prune-channels(layer-ratios=['stem:0.125'],ratio=0)")
    assert weight(pruned, "stem").shape == (7, 3, 3, 3)
    assert weight(pruned, "c2").shape == (7, 8, 3, 3)
    assert weight(pruned, "c1").shape == (8, 7, 3, 3)
    assert weight(pruned, "head").shape == (4, 7, 1, 1)
    bn2 = next(n for n in pruned.graph.nodes if n.name == "bn2")
    assert all(np.asarray(pruned.constant_value(t)).shape == (7,) for t in bn2.inputs[1:])
    assert_same_outputs(model, pruned)
    # the kept rows are the original rows without row 5
    np.testing.assert_array_equal(weight(pruned, "stem"), np.delete(weight(model, "stem"), 5, axis=0))


def test_concat_offsets_map_each_input_to_its_slice_of_the_consumer():
    b = Builder([1, 3, 8, 8])
    a = b.node("Relu", [b.conv("x", 3, 4, "a")])
    c = b.node("Relu", [b.conv("x", 3, 6, "b")])
    cat = b.node("Concat", [a, c], name="cat", axis=1)
    model = b.model(b.node("GlobalAveragePool", [b.conv(cat, 10, 2, "consumer", k=1)]))
    kill(model, {"a.w": [1], "a.b": [1], "b.w": [3], "b.b": [3]}, {"consumer.w": [1, 4 + 3]})
    pruned, report = prune(model, "prune-channels(ratio=0.25)")
    assert weight(pruned, "a").shape[0] == 3 and weight(pruned, "b").shape[0] == 5
    np.testing.assert_array_equal(weight(pruned, "consumer"), np.delete(weight(model, "consumer"), [1, 7], axis=1))
    assert_same_outputs(model, pruned)


def test_split_on_channels_updates_split_sizes():
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "producer")])
    sizes = b.const("sizes", np.array([3, 5], dtype=np.int64))
    left, right = b.node("Split", [y, sizes], name="split", outputs=2, axis=1)
    s = b.node("Add", [b.node("GlobalAveragePool", [b.conv(left, 3, 2, "l", k=1)]),
                       b.node("GlobalAveragePool", [b.conv(right, 5, 2, "r", k=1)])])
    model = b.model(s)
    kill(model, {"producer.w": [1, 6], "producer.b": [1, 6]}, {"l.w": [1], "r.w": [3]})
    pruned, _ = prune(model, "prune-channels(ratio=0.25)")
    assert weight(pruned, "l").shape[1] == 2 and weight(pruned, "r").shape[1] == 4
    assert_same_outputs(model, pruned)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_follows_its_input_channels(multiplier):
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "expand")])
    dw = b.node("Relu", [b.conv(y, 8, 8 * multiplier, "dw", group=8)])
    model = b.model(b.node("GlobalAveragePool", [b.conv(dw, 8 * multiplier, 4, "project", k=1)]))
    dead_dw = [2 * multiplier + i for i in range(multiplier)]
    kill(model, {"expand.w": [2], "expand.b": [2], "dw.w": dead_dw, "dw.b": dead_dw}, {"project.w": dead_dw})
    pruned, _ = prune(model, "prune-channels(ratio=0.125)")
    dw_node = next(n for n in pruned.graph.nodes if n.name == "dw")
    assert dw_node.attrs["group"] == 7
    assert weight(pruned, "dw").shape == (7 * multiplier, 1, 3, 3)
    assert weight(pruned, "project").shape == (4, 7 * multiplier, 1, 1)
    assert_same_outputs(model, pruned)


def test_grouped_conv_freezes_its_input_and_prunes_its_output_evenly():
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "before")])
    g = b.node("Relu", [b.conv(y, 8, 8, "grouped", group=2)])
    model = b.model(b.node("GlobalAveragePool", [b.conv(g, 8, 4, "after", k=1)]))
    kill(model, {"grouped.w": [1, 6], "grouped.b": [1, 6]}, {"after.w": [1, 6]})
    pruned, report = prune(model, "prune-channels(ratio=0.25)")
    frozen = [g for g in report.groups if g.frozen]
    assert any("grouped Conv" in g.frozen for g in frozen)
    assert weight(pruned, "before").shape[0] == 8
    assert weight(pruned, "grouped").shape == (6, 4, 3, 3)
    assert next(n for n in pruned.graph.nodes if n.name == "grouped").attrs["group"] == 2
    assert_same_outputs(model, pruned)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_flatten_into_gemm_removes_each_channels_block_of_features(flatten):
    b = Builder([1, 3, 6, 6])
    y = b.node("Relu", [b.conv("x", 3, 4, "conv", stride=2)])  # 4 x 3 x 3
    if flatten == "Flatten":
        flat = b.node("Flatten", [y], axis=1)
    else:
        flat = b.node("Reshape", [y, b.const("shape", np.array([1, 36], dtype=np.int64))])
    fc_w = b.weight("fc.w", (5, 36))
    model = b.model(b.node("Gemm", [flat, fc_w, b.weight("fc.b", (5,))], name="fc", transB=1))
    kill(model, {"conv.w": [2], "conv.b": [2]}, {"fc.w": list(range(18, 27))})
    pruned, _ = prune(model, "prune-channels(ratio=0.25)")
    np.testing.assert_array_equal(weight(pruned, "fc"), np.delete(weight(model, "fc"), range(18, 27), axis=1))
    assert_same_outputs(model, pruned, shape=(1, 3, 6, 6))


def test_nhwc_transpose_flatten_into_matmul():
    """The TF-converter layout: NHWC input, Transpose to NCHW, conv, Transpose back, flatten, MatMul."""
    b = Builder([1, 6, 6, 3])
    nchw = b.node("Transpose", ["x"], perm=[0, 3, 1, 2])
    y = b.node("Relu", [b.conv(nchw, 3, 4, "conv", stride=2)])  # N,4,3,3
    nhwc = b.node("Transpose", [y], perm=[0, 2, 3, 1])  # N,3,3,4: feature = (h*3+w)*4 + c
    flat = b.node("Reshape", [nhwc, b.const("shape", np.array([-1, 36], dtype=np.int64))])
    out = b.node("Add", [b.node("MatMul", [flat, b.weight("dense.w", (36, 10))], name="dense"),
                         b.weight("dense.b", (10,))])
    model = b.model(out)
    dead_rows = [k * 4 + 1 for k in range(9)]
    tensors = model.graph.tensors()
    tensors["dense.w"].values = _zeroed(tensors["dense.w"].values, dead_rows, 0)
    kill(model, {"conv.w": [1], "conv.b": [1]}, {})
    pruned, _ = prune(model, "prune-channels(ratio=0.25)")
    np.testing.assert_array_equal(weight(pruned, "dense"), np.delete(weight(model, "dense"), dead_rows, axis=0))
    assert weight(pruned, "conv").shape[0] == 3
    assert_same_outputs(model, pruned, shape=(1, 6, 6, 3))


def test_qdq_weights_are_sliced_in_the_quantized_domain():
    b = Builder([1, 3, 8, 8])
    q = np.random.default_rng(3).integers(-100, 100, (8, 3, 3, 3)).astype(np.int8)
    q[4] = 0
    deq = b.node("DequantizeLinear", [b.const("wq", q), b.const("ws", np.full(8, 0.01, np.float32)),
                                      b.const("wz", np.zeros(8, np.int8))], name="dq", axis=0)
    y = b.node("Conv", ["x", deq, b.const("cb", np.zeros(8, np.float32))], name="qconv", kernel_shape=[3, 3],
               pads=[1, 1, 1, 1])
    act = b.node("DequantizeLinear", [b.node("QuantizeLinear", [y, b.const("s", np.float32(0.05)),
                                                                 b.const("z", np.int8(0))]),
                                      "s", "z"])
    model = b.model(b.node("GlobalAveragePool", [b.conv(b.node("Relu", [act]), 8, 2, "consumer", k=1)]))
    kill(model, {}, {"consumer.w": [4]})
    pruned, _ = prune(model, "prune-channels(ratio=0.125)")
    dq = next(n for n in pruned.graph.nodes if n.op == "DequantizeLinear" and n.inputs[0].name.startswith("wq"))
    assert pruned.constant_value(dq.inputs[0]).shape == (7, 3, 3, 3)
    assert pruned.constant_value(dq.inputs[0]).dtype == np.int8
    assert pruned.constant_value(dq.inputs[1]).shape == (7,)
    assert_same_outputs(model, pruned)


# ---- choosing channels -------------------------------------------------------------------------------
def chain_model():
    b = Builder(["N", 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "first")])
    return b.model(b.node("GlobalAveragePool", [b.conv(y, 8, 4, "second")]))


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_removed_channels_are_exactly_the_least_important(criterion):
    model = chain_model()
    w1, w2 = weight(model, "first"), weight(model, "second")
    p = 1 if criterion == "l1" else 2

    def norms(w, axis):
        moved = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
        n = moved.sum(1) if p == 1 else np.sqrt((moved ** 2).sum(1))
        return n / n.mean()

    expected = np.sort(np.argsort(norms(w1, 0) + norms(w2, 1), kind="stable")[:3])
    pruned, _ = prune(model, f"prune-channels(ratio=0.375,criterion={criterion})")
    kept = [i for i in range(8) if i not in expected]
    np.testing.assert_array_equal(weight(pruned, "first"), w1[kept])
    np.testing.assert_array_equal(weight(pruned, "second"), w2[:, kept])


def test_bn_criterion_removes_the_smallest_gammas():
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.bn(b.conv("x", 3, 8, "conv"), 8, "bn")])
    model = b.model(b.node("GlobalAveragePool", [b.conv(y, 8, 4, "next")]))
    gamma = model.graph.tensors()["bn.scale"]
    gamma.values = np.array([1, 0.1, 1, 1, 0.05, 1, 1, 1], dtype=np.float32)
    pruned, _ = prune(model, "prune-channels(ratio=0.25,criterion=bn)")
    np.testing.assert_array_equal(weight(pruned, "conv"), np.delete(weight(model, "conv"), [1, 4], axis=0))


def test_ratio_zero_is_an_exact_no_op():
    model, _ = residual_model()
    before = model.to_onnx().SerializeToString()
    pruned, report = prune(model, "prune-channels(ratio=0)")
    assert pruned.to_onnx().SerializeToString() == before
    assert report.macs_after == report.macs_before


def test_everything_frozen_does_not_fire_and_says_why():
    """A single conv feeding the graph output: its channels are the model's interface."""
    b = Builder([1, 3, 8, 8])
    model = b.model(b.node("Softmax", [b.conv("x", 3, 8, "only")], axis=1))
    before = model.to_onnx().SerializeToString()
    pruned, report = prune(model, "prune-channels(ratio=0.5)")
    assert pruned.to_onnx().SerializeToString() == before
    assert report.groups and all(g.frozen for g in report.groups)
    assert "normalizes across the channels" in report.groups[0].frozen


@pytest.mark.parametrize("blocker", ["output", "unknown", "shuffle"])
def test_frozen_groups(blocker):
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "conv")])
    if blocker == "output":
        out, reason = y, "graph output"
    elif blocker == "unknown":
        out, reason = b.node("LRN", [y], size=3), "not understood"
    else:  # channel shuffle: (1,8,8,8) -> (1,2,4,8,8) -> transpose -> (1,8,8,8)
        r = b.node("Reshape", [y, b.const("s1", np.array([1, 2, 4, 8, 8], dtype=np.int64))])
        t = b.node("Transpose", [r], perm=[0, 2, 1, 3, 4])
        out = b.conv(b.node("Reshape", [t, b.const("s2", np.array([1, 8, 8, 8], dtype=np.int64))]), 8, 2, "next")
        reason = "mixes the channels"
    model = b.model(out)
    pruned, report = prune(model, "prune-channels(ratio=0.5)")
    group = next(g for g in report.groups if g.name == "conv")
    assert group.frozen and reason in group.frozen
    assert weight(pruned, "conv").shape[0] == 8


def test_round_to_keeps_multiples():
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 32, "first")])
    model = b.model(b.node("GlobalAveragePool", [b.conv(y, 32, 4, "second")]))
    pruned, _ = prune(model, "prune-channels(ratio=0.3,round-to=8)")
    assert weight(pruned, "first").shape[0] == 24


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_target_macs_is_met(target):
    model, _ = residual_model()
    pruned, report = prune(model, f"prune-channels(target-macs={target})")
    assert macs(pruned).total <= target * macs(model).total * 1.02
    assert macs(pruned).total >= (target - 0.15) * macs(model).total
    assert report.macs_after == macs(pruned).total


def test_bad_options_are_clear_errors():
    model, _ = residual_model()
    with pytest.raises(PassError, match="no prunable layer named 'nope'"):
        prune(model, "prune-channels(layer-ratios=['nope:0.5'])")
    with pytest.raises(PassError, match="needs calibration data"):
        prune(model, "prune-channels(criterion=activation)")


# ---- data-driven: activation importance and reconstruction ----------------------------------------------
def redundant_model():
    """first has a channel 6 that is exactly 0.5 * channel 2 (rows and bias): after a Relu it carries no
    information of its own, so least squares can fold it into channel 2's column of `second`."""
    model = chain_model()
    tensors = model.graph.tensors()
    w, bias = np.array(tensors["first.w"].values), np.array(tensors["first.b"].values)
    w[6], bias[6] = 0.5 * w[2], 0.5 * bias[2]
    w[2] *= 3
    bias[2] *= 3
    tensors["first.w"].values, tensors["first.b"].values = w, bias
    return model


def calibration(n=4, shape=(2, 3, 8, 8)):
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_reconstruction_recovers_a_redundant_channel_exactly():
    model = redundant_model()
    plain, _ = prune(model, "prune-channels(ratio=0.125,reconstruct=false)")
    refit, report = prune(model, "prune-channels(ratio=0.125,ridge=0)", calibration())
    assert weight(refit, "first").shape[0] == 7
    inputs = calibration(1)[0]
    assert not ir.compare(model, plain, inputs).within(rtol=1e-3)
    assert ir.compare(model, refit, inputs).within(rtol=1e-4, atol=1e-4)
    fit = report.reconstruction[0]
    assert fit.layer == "second" and fit.error_after < 1e-6 < fit.error_before


def test_activation_criterion_uses_the_calibration_data():
    model = chain_model()
    # make channel 3 never fire on the data (large negative bias) although its weights are big
    tensors = model.graph.tensors()
    w, bias = np.array(tensors["first.w"].values), np.array(tensors["first.b"].values)
    w[3] *= 4
    bias[3] = -1e3
    tensors["first.w"].values, tensors["first.b"].values = w, bias
    pruned, _ = prune(model, "prune-channels(ratio=0.125,criterion=activation,reconstruct=false)", calibration())
    np.testing.assert_array_equal(weight(pruned, "first"), np.delete(w, 3, axis=0))
    assert_same_outputs(model, pruned)


def test_sensitivity_allocation_meets_the_target():
    model, _ = residual_model()
    pruned, report = prune(model, "prune-channels(target-macs=0.7,sensitivity=true)",
                           calibration(shape=(2, 3, 8, 8)))
    assert macs(pruned).total <= 0.7 * macs(model).total * 1.02


def test_reconstruction_criterion_finds_the_channel_the_refit_can_replace():
    """Channel 6 is a scaled copy of channel 2: removing either costs nothing after the re-fit, so the
    reconstruction-aware criterion must pick one of them, and the re-fit makes the outputs exact."""
    model = redundant_model()
    pruned, _ = prune(model, "prune-channels(ratio=0.125,criterion=reconstruction,ridge=0)", calibration())
    w = weight(model, "first")
    kept = weight(pruned, "first")
    removed = [i for i in range(8) if not any(np.array_equal(w[i], k) for k in kept)]
    assert removed in ([2], [6])
    assert ir.compare(model, pruned, calibration(1)[0]).within(rtol=1e-4, atol=1e-4)


def test_sensitivity_scan_with_refits_sees_the_redundant_channel_as_free():
    """With the re-fit-aware criterion, the scan runs consumers with their re-fitted weights: removing
    the redundant channel of `redundant_model` then costs (almost) nothing."""
    from graphpress.pruning.obs import eliminate
    from graphpress.pruning.sensitivity import scan, steps_for

    model = redundant_model()
    cg = analyze(model, tensor_shapes(ir.infer_shapes(model)))
    steps = steps_for(cg)
    elimination = eliminate(model, cg, calibration(), steps)
    scores, refits = elimination.scores, elimination.refits
    group = cg.prunable()[0]
    with_refit = scan(model, cg, scores, calibration(), steps=(0.125,), refits=refits)[group.id][0.125]
    without = scan(model, cg, scores, calibration(), steps=(0.125,))[group.id][0.125]
    assert with_refit < 1e-6 < without


def test_refit_with_too_few_rows_keeps_the_pruned_weights():
    """Two calibration samples cannot determine a 28-input Gemm: the re-fit leaves it as pruned."""
    b = Builder(["N", 3, 6, 6])
    y = b.node("Relu", [b.conv("x", 3, 4, "conv", stride=2)])
    flat = b.node("Flatten", [y], axis=1)
    model = b.model(b.node("Gemm", [flat, b.weight("fc.w", (5, 36)), b.weight("fc.b", (5,))], name="fc", transB=1))
    data = [{"x": np.random.default_rng(5).standard_normal((2, 3, 6, 6)).astype(np.float32)}]
    plain, _ = prune(model, "prune-channels(ratio=0.25,reconstruct=false)")
    refit, report = prune(model, "prune-channels(ratio=0.25)", data)
    np.testing.assert_array_equal(weight(refit, "fc"), weight(plain, "fc"))
    np.testing.assert_array_equal(weight(refit, "fc", 2), weight(plain, "fc", 2))
    assert [f.error_after for f in report.reconstruction] == [f.error_before for f in report.reconstruction]


def test_conv_transpose_is_both_a_consumer_and_a_producer():
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "down", stride=2)])
    up = b.node("ConvTranspose", [y, b.weight("up.w", (8, 6, 2, 2)), b.weight("up.b", (6,))], name="up",
                kernel_shape=[2, 2], strides=[2, 2])
    model = b.model(b.node("GlobalAveragePool", [b.conv(b.node("Relu", [up]), 6, 2, "head", k=1)]))
    kill(model, {"down.w": [3], "down.b": [3], "up.b": [4]}, {"head.w": [4]})
    tensors = model.graph.tensors()
    w = np.array(tensors["up.w"].values)
    w[3], w[:, 4] = 0, 0
    tensors["up.w"].values = w
    pruned, _ = prune(model, "prune-channels(ratio=0.2,reconstruct=false)")  # one channel of each group
    np.testing.assert_array_equal(weight(pruned, "up"), np.delete(np.delete(w, 3, axis=0), 4, axis=1))
    assert weight(pruned, "head").shape == (2, 5, 1, 1)
    assert_same_outputs(model, pruned)


# ---- budget allocation: residual streams, round_to with a target, error curves -------------------------
def test_scope_blocks_prunes_only_the_channels_inside_blocks():
    """A residual block followed by a linear bottleneck (`narrow`, no activation before `wide`): only the
    block's inner channels (c1, behind a Relu) and `wide`'s (behind a Relu) may go."""
    b = Builder(["N", 3, 8, 8])
    stem = b.node("Relu", [b.conv("x", 3, 8, "stem")])
    branch = b.bn(b.conv(b.node("Relu", [b.bn(b.conv(stem, 8, 8, "c1"), 8, "bn1")]), 8, 8, "c2"), 8, "bn2")
    added = b.node("Relu", [b.node("Add", [stem, branch], name="add")])
    wide = b.node("Relu", [b.conv(b.conv(added, 8, 8, "narrow", k=1), 8, 8, "wide", k=1)])
    model = b.model(b.node("GlobalAveragePool", [b.conv(wide, 8, 4, "head", k=1)]))
    pruned, report = prune(model, "prune-channels(ratio=0.5,scope=blocks)")
    assert [weight(pruned, n).shape[0] for n in ("stem", "c1", "c2", "narrow", "wide")] == [8, 4, 8, 8, 4]
    reasons = {g.name: g.frozen for g in report.groups}
    assert "residual stream" in reasons["stem"] and "linear bottleneck" in reasons["narrow"]


def test_round_to_with_a_target_does_not_overshoot():
    """Groups of 16 and 32 with round-to=8: past 77% of the MACs one uniform ratio takes both groups down
    to 8 and 16 channels at once (28% of the MACs); single steps stop at the next step below the target."""
    b = Builder([1, 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 16, "first")])
    y = b.node("Relu", [b.conv(y, 16, 32, "second")])
    model = b.model(b.node("GlobalAveragePool", [b.conv(y, 32, 4, "third", k=1)]))
    pruned, _ = prune(model, "prune-channels(target-macs=0.7,round-to=8)")
    kept = macs(pruned).total / macs(model).total
    assert 0.5 < kept <= 0.7
    assert weight(pruned, "first").shape[0] % 8 == 0 and weight(pruned, "second").shape[0] % 8 == 0


def copies_model():
    """first's channels 4..7 are positive multiples of channels 0..3 (a Relu keeps them copies): removing
    them costs nothing after the re-fit of `second`, whose own channels are all independent."""
    b = Builder(["N", 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "first")])
    y = b.node("Relu", [b.conv(y, 8, 8, "second")])
    model = b.model(b.node("GlobalAveragePool", [b.conv(y, 8, 4, "third", k=1)]))
    tensors = model.graph.tensors()
    w, bias = np.array(tensors["first.w"].values), np.array(tensors["first.b"].values)
    w[4:], bias[4:] = w[:4] * 2, bias[:4] * 2
    tensors["first.w"].values, tensors["first.b"].values = w, bias
    return model


def test_refit_error_allocation_spends_the_budget_where_the_refit_recovers_it():
    model = copies_model()
    pipeline = "prune-channels(target-macs=0.55,criterion=reconstruction,allocate=refit-error,ridge=0)"
    pruned, _ = prune(model, pipeline, calibration())
    assert macs(pruned).total <= 0.55 * macs(model).total
    assert weight(pruned, "first").shape[0] == 4 and weight(pruned, "second").shape[0] == 8
    assert ir.compare(model, pruned, calibration(1)[0]).within(rtol=1e-3, atol=1e-4)
    uniform, _ = prune(model, pipeline.replace("allocate=refit-error", "allocate=uniform"), calibration())
    assert weight(uniform, "second").shape[0] < 8


def test_refit_error_allocation_needs_the_reconstruction_criterion():
    model = copies_model()
    with pytest.raises(PassError, match="allocate=refit-error needs"):
        prune(model, "prune-channels(target-macs=0.7,allocate=refit-error)", calibration())


def test_scan_error_of_probability_outputs_is_their_kl_divergence():
    from graphpress.pruning.sensitivity import _output_error

    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = np.array([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    kl = np.mean(np.sum(p * np.log(p / q), axis=1))
    assert _output_error([p], [q]) == pytest.approx(kl)
    assert _output_error([p * 5], [q * 5]) == pytest.approx(np.sum((p - q) ** 2) / np.sum(p ** 2))


# ---- re-fit: ridge chosen on held-out batches, downstream layers ------------------------------------------
def _normal_of(x, y):
    from graphpress.pruning.reconstruct import Normal

    normal = Normal(np.zeros((x.shape[1], x.shape[1])), np.zeros((x.shape[1], y.shape[1])))
    normal.add(x, y)
    return normal


def test_held_out_ridge_keeps_weights_that_already_generalize_and_fixes_those_that_do_not():
    from graphpress.pruning.reconstruct import _solve_by_held_out

    rng = np.random.default_rng(3)
    truth = rng.standard_normal((10, 3))
    x_fit, x_held = rng.standard_normal((12, 10)), rng.standard_normal((200, 10))
    fit = _normal_of(x_fit, x_fit @ truth + rng.standard_normal((12, 3)))  # few noisy rows: a fit memorizes
    held = _normal_of(x_held, x_held @ truth)
    np.testing.assert_array_equal(_solve_by_held_out(truth, fit, held), truth)
    zeros = np.zeros_like(truth)
    solved = _solve_by_held_out(zeros, fit, held)
    assert held.error(solved) < 0.1 < held.error(zeros)


def test_downstream_refit_also_refits_the_later_layers_and_lowers_the_output_error():
    b = Builder(["N", 3, 8, 8])
    y = b.node("Relu", [b.conv("x", 3, 8, "first")])
    y = b.node("Relu", [b.conv(y, 8, 8, "second")])
    model = b.model(b.conv(y, 8, 4, "third", k=1))
    pipeline = "prune-channels(layer-ratios=['first:0.5'],ratio=0,refit={})"
    errors = {}
    for refit in ("consumers", "downstream"):
        pruned, report = prune(model, pipeline.format(refit), calibration(8))
        errors[refit] = sum(float(np.sum((ir.run(model, feed)[o] - ir.run(pruned, feed)[o]) ** 2))
                            for feed in calibration(8) for o in ir.run(model, feed))
        layers = [fit.layer for fit in report.reconstruction]
        assert layers == (["second"] if refit == "consumers" else ["second", "third"])
    assert errors["downstream"] < errors["consumers"]
