"""Accuracy recovery: smooth-quant, bias correction and sensitivity-ranked keep-float."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.ir import compare, load, run
from graphpress.passes import PassContext, PassManager
from graphpress.quant.sensitivity import sqnr_db

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _f(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def outlier_linear():
    """Two MatMuls (and a float-only consumer) reading one activation whose channel 2 is 50x larger."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="q_proj"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="k_proj"),
             helper.make_node("Relu", ["x"], ["y3"], name="residual")]
    inits = [_const("w1", RNG.standard_normal((8, 5)) * 0.2), _const("w2", RNG.standard_normal((8, 3)) * 0.2)]
    return _model(nodes, [_f("x", 4, 6, 8)], [_f("y1", 4, 6, 5), _f("y2", 4, 6, 3), _f("y3", 4, 6, 8)], inits)


def outlier_batches(n=4, seed=1):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        x = rng.standard_normal((4, 6, 8)).astype(np.float32)
        x[..., 2] *= 50
        batches.append({"x": x})
    return batches


def test_smooth_quant_keeps_the_function_and_shares_one_scale():
    model = outlier_linear()
    original = model.copy()
    manager = PassManager("smooth-quant(alpha=0.5)")
    manager.run(model, calibration=outlier_batches())
    assert manager.records[-1].stats == {"smoothed": 1}
    (mul,) = [n for n in model.nodes(op="Mul")]
    assert sorted(n.name for n in mul.outputs[0].outputs) == ["k_proj", "q_proj"]
    assert next(n for n in model.nodes() if n.name == "residual").inputs[0].name == "x"  # untouched
    assert compare(original, model, outlier_batches(1, seed=9)[0]).within(rtol=1e-5)
    before = model.to_onnx().SerializeToString()
    PassManager("smooth-quant").run(model, calibration=None)  # already smoothed: nothing to do
    assert model.to_onnx().SerializeToString() == before


def test_smooth_quant_lowers_int8_error_on_outlier_channels():
    errors = {}
    for pipeline in ("insert-qdq(ops=[MatMul])", "smooth-quant,insert-qdq(ops=[MatMul])"):
        model = outlier_linear()
        original = model.copy()
        PassManager(pipeline).run(model, calibration=outlier_batches())
        smoothing = [n for n in model.nodes(op="Mul")]
        assert all(isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.dtype == np.float32
                   for n in smoothing)  # the smoothing Mul itself stays float
        test = outlier_batches(2, seed=5)
        errors[pipeline] = sqnr_db([list(run(original, b).values()) for b in test],
                                   [list(run(model, b).values()) for b in test])
    assert errors["smooth-quant,insert-qdq(ops=[MatMul])"] > errors["insert-qdq(ops=[MatMul])"] + 3  # dB


def biased_rounding_conv(bias=True):
    """A 1x1 Conv whose small weights all round up (0.0119 -> 2 steps of 1/127): a systematic shift."""
    w = np.full((4, 8, 1, 1), 0.0119, np.float32)
    w[:, 0] = 1.0
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    inits = [_const("w", w)] + ([_const("b", np.zeros(4))] if bias else [])
    nodes = [helper.make_node("Conv", inputs, ["y"], name="conv")]
    return _model(nodes, [_f("x", 2, 8, 4, 4)], [_f("y", 2, 4, 4, 4)], inits)


def positive_batches(n=4, seed=2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, (2, 8, 4, 4)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_correction_cancels_the_mean_shift(has_bias):
    shifts = {}
    for flag in ("false", "true"):
        model = biased_rounding_conv(has_bias)
        original = model.copy()
        PassManager(f"insert-qdq(bias-correction={flag})").run(model, calibration=positive_batches())
        conv = next(iter(model.nodes(op="Conv")))
        assert len(conv.inputs) == 3 or flag == "false"  # a bias was added where there was none
        test = positive_batches(2, seed=7)
        shifts[flag] = np.mean([np.abs((run(model, b)["y"] - run(original, b)["y"]).mean(axis=(0, 2, 3))).max()
                                for b in test])
    assert shifts["true"] < 0.3 * shifts["false"]


def _conv_net():
    from test_qdq import calibration, conv_net
    model = conv_net()
    return model, calibration(model, n=4)


def test_keep_float_by_name_and_auto():
    model, batches = _conv_net()
    PassManager("insert-qdq(keep-float=[conv2])").run(model, calibration=batches)
    conv2 = next(n for n in model.nodes() if n.name == "conv2")
    assert isinstance(conv2.inputs[1], gs.Constant) and conv2.inputs[1].values.dtype == np.float32

    model, batches = _conv_net()
    ctx = PassContext(calibration=batches)
    manager = PassManager("insert-qdq(keep-float=auto,target-sqnr=500,max-float=0.5)")
    manager.run(model, ctx)
    report = ctx.reports["insert-qdq"]
    ranked = list(report["sensitivity_db"].values())
    assert ranked == sorted(ranked) and len(ranked) == 7  # every quantized node scored, worst first
    assert len(report["float_nodes"]) == 3  # target unreachable: stops at the cap, 50% of 7
    assert report["float_nodes"] == list(report["sensitivity_db"])[:3]

    model, batches = _conv_net()
    manager = PassManager("insert-qdq(keep-float=auto,target-sqnr=0)")
    manager.run(model, calibration=batches)
    assert manager.records[-1].stats["float"] == 0


def test_sqnr_of_identical_and_noisy_outputs():
    ref = [[np.ones((2, 3), np.float32)]]
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, [[np.full((2, 3), 1.1, np.float32)]]) == pytest.approx(20.0)


def conv_chain(activation="Relu", depthwise=False):
    """Conv -> activation -> Conv (dense or depthwise) with badly balanced channel ranges."""
    w1 = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.array([10, 0.1, 1, 3], np.float32)[:, None, None, None]
    w2 = (RNG.standard_normal((4, 1, 3, 3)) if depthwise else RNG.standard_normal((5, 4, 1, 1))).astype(np.float32)
    act_inputs = ["c1", "lo", "hi"] if activation == "Clip" else ["c1"]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node(activation, act_inputs, ["r1"], name="act"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", **({"group": 4, "pads": [1, 1, 1, 1]}
                                                                           if depthwise else {}))]
    inits = [_const("w1", w1), _const("b1", RNG.standard_normal(4)), _const("w2", w2),
             _const("lo", 0.0), _const("hi", 6.0)]
    out = 4 if depthwise else 5
    return _model(nodes, [_f("x", 1, 3, 6, 6)], [_f("y", 1, out, 6, 6)], inits)


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalize_balances_ranges_and_keeps_the_function(depthwise):
    model = conv_chain(depthwise=depthwise)
    original = model.copy()
    manager = PassManager("equalize")
    manager.run(model)
    assert manager.records[-1].stats == {"pairs": 1}
    assert compare(original, model).within(rtol=1e-5)
    conv1, conv2 = (next(n for n in model.nodes() if n.name == name) for name in ("conv1", "conv2"))
    r1 = np.abs(conv1.inputs[1].values).reshape(4, -1).max(1)
    w2 = conv2.inputs[1].values
    r2 = np.abs(w2 if depthwise else w2.swapaxes(0, 1)).reshape(4, -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-4)
    manager.run(model)
    assert not manager.records[-1].changed  # balanced already: running again changes nothing


def test_equalize_leaves_relu6_alone_unless_asked():
    model = conv_chain("Clip")
    manager = PassManager("equalize")
    manager.run(model)
    assert not manager.records[-1].changed
    PassManager("equalize(relu6-as-relu=true)").run(model)
    assert [n.op for n in model.nodes()] == ["Conv", "Relu", "Conv"]
    sigmoid = conv_chain("Sigmoid")
    PassManager("equalize").run(sigmoid)
    assert [n.op for n in sigmoid.nodes()] == ["Conv", "Sigmoid", "Conv"]
