"""insert-qdq on small models built in code: coverage, axes, fusion, exclusions, idempotence, errors."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.errors import PassError
from graphpress.ir import activation_batches, compare, load, model_size_bytes, random_inputs, run
from graphpress.passes import PassManager, parse_pipeline
from graphpress.quant.scales import dequantize, quantize_weight

RNG = np.random.default_rng(0)


def _init(name, *shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _f(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def conv_net(opset=17):
    """Conv-Relu-MaxPool-Conv-Clip-Add-AveragePool-GlobalAveragePool-Flatten-Gemm(transB=1)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("Add", ["r2", "p1"], ["s"], name="add"),
        helper.make_node("AveragePool", ["s"], ["a"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [_init("w1", 4, 3, 3, 3), _init("b1", 4), _init("w2", 4, 4, 3, 3), _init("b2", 4),
             numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi"),
             _init("wf", 5, 4), _init("bf", 5)]
    return _model(nodes, [_f("x", 2, 3, 8, 8)], [_f("y", 2, 5)], inits, opset)


def matmul_net():
    """MatMul(W) + bias, Mul by a constant, attention-like MatMul of two activations, Concat, Resize;
    plus an int64 shape Concat that must stay untouched."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="linear"),
        helper.make_node("Add", ["m", "b"], ["mb"], name="bias_add"),
        helper.make_node("Mul", ["mb", "k"], ["mk"], name="scale"),
        helper.make_node("Transpose", ["mk"], ["mt"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["mk", "mt"], ["att"], name="scores"),
        helper.make_node("Concat", ["att", "att"], ["cat"], name="concat", axis=2),
        helper.make_node("Shape", ["cat"], ["shape"], name="shape"),
        helper.make_node("Concat", ["shape", "one"], ["shape2"], name="int_concat", axis=0),
        helper.make_node("Reshape", ["cat", "shape2"], ["cat4"], name="reshape"),
        helper.make_node("Resize", ["cat4", "", "scales"], ["y"], name="resize", mode="nearest"),
    ]
    inits = [_init("w", 8, 6), _init("b", 6), numpy_helper.from_array(np.float32(0.5), "k"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    return _model(nodes, [_f("x", 2, 5, 8)], [_f("y", 2, 5, 20, 2)], inits)


def conv_transpose_net(group=1):
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", strides=[2, 2],
                              group=group)]
    inits = [_init("w", 4, 6 // group, 2, 2), _init("b", 6)]
    return _model(nodes, [_f("x", 1, 4, 5, 5)], [_f("y", 1, 6, 10, 10)], inits)


def calibration(model, n=4, seed=1):
    return [random_inputs(model, seed=seed + i) for i in range(n)]


def quantize(model, pipeline="insert-qdq", batches=None):
    original = model.copy()
    manager = PassManager(pipeline)
    manager.run(model, calibration=batches if batches is not None else calibration(original))
    return original, model, manager.records[-1]


def dq_of(model, weight_name):
    """The DequantizeLinear node that replaced the constant named `weight_name`."""
    for node in model.nodes(op="DequantizeLinear"):
        if node.inputs[0].name.startswith(weight_name + "_quantized"):
            return node
    raise AssertionError(f"no DequantizeLinear for {weight_name}")


def consumers_ops(model, tensor_name):
    return sorted(n.op for n in model.tensors()[tensor_name].outputs)


@pytest.mark.parametrize("build", [conv_net, matmul_net, conv_transpose_net])
def test_output_runs_in_onnxruntime_close_to_float(build):
    original, quantized, record = quantize(build())
    assert record.changed
    inputs = calibration(original, n=1, seed=1)[0]
    assert compare(original, quantized, inputs).within(rtol=0.05)
    optimized = run(quantized, inputs, optimize=True)  # onnxruntime's int8 kernel fusion accepts it
    reference = run(original, inputs)
    name = next(iter(reference))
    assert np.abs(optimized[name] - reference[name]).max() <= 0.1 * np.abs(reference[name]).max()
    onnx.checker.check_model(quantized.to_onnx())


def test_per_channel_axes_and_int32_biases():
    _, q, _ = quantize(conv_net())
    for weight, axis, channels in (("w1", 0, 4), ("w2", 0, 4), ("wf", 0, 5)):  # Gemm transB=1 -> axis 0
        node = dq_of(q, weight)
        assert node.attrs["axis"] == axis and node.inputs[0].values.dtype == np.int8
        assert node.inputs[1].values.shape == (channels,)
    bias = dq_of(q, "b1")
    assert bias.inputs[0].values.dtype == np.int32
    # bias scale = input scale x weight scale, per output channel: a Mul of the two initializers, not stored
    x_dq = q.tensors()["x"].outputs[0].outputs[0].outputs[0]
    assert x_dq.op == "DequantizeLinear"
    product = bias.inputs[1].inputs[0]
    assert product.op == "Mul" and product.inputs == [x_dq.inputs[1], dq_of(q, "w1").inputs[1]]
    # symmetric weights and biases: no zero-point input (0 by default); activations keep theirs
    assert all(len(dq_of(q, name).inputs) == 2 for name in ("w1", "w2", "wf", "b1"))
    assert len(x_dq.inputs) == 3
    _, qt, _ = quantize(conv_transpose_net())
    assert dq_of(qt, "w").attrs["axis"] == 1 and dq_of(qt, "w").inputs[1].values.shape == (6,)
    _, qm, _ = quantize(matmul_net())
    assert dq_of(qm, "w").attrs["axis"] == 1 and dq_of(qm, "w").inputs[1].values.shape == (6,)


def test_gemm_without_trans_b_uses_axis_1_and_grouped_deconv_is_per_tensor():
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")]
    model = _model(nodes, [_f("x", 2, 4)], [_f("y", 2, 3)], [_init("w", 4, 3), _init("b", 3)])
    _, q, _ = quantize(model)
    assert dq_of(q, "w").attrs["axis"] == 1
    _, qg, _ = quantize(conv_transpose_net(group=2))
    assert "axis" not in dq_of(qg, "w").attrs and dq_of(qg, "w").inputs[1].values.shape == ()


def test_per_tensor_weights_when_per_channel_is_off():
    _, q, _ = quantize(conv_net(), "insert-qdq(per-channel=false)")
    assert all("axis" not in n.attrs or n.inputs[0].values.dtype == np.int32 for n in q.nodes(op="DequantizeLinear"))
    assert dq_of(q, "w1").inputs[1].values.shape == ()


def test_relu_and_clip_are_fused_not_split():
    _, q, _ = quantize(conv_net())
    conv1 = next(n for n in q.nodes(op="Conv") if n.name == "conv1")
    assert consumers_ops(q, conv1.outputs[0].name) == ["Relu"]      # no Q between Conv and Relu
    relu = conv1.outputs[0].outputs[0]
    assert consumers_ops(q, relu.outputs[0].name) == ["QuantizeLinear"]
    clip = next(n for n in q.nodes(op="Clip"))
    assert clip.inputs[0].inputs[0].op == "Conv"
    assert consumers_ops(q, clip.outputs[0].name) == ["QuantizeLinear"]


def test_maxpool_and_resize_reuse_their_input_parameters():
    _, q, _ = quantize(conv_net())
    pool = next(iter(q.nodes(op="MaxPool")))
    in_dq, out_q = pool.inputs[0].inputs[0], pool.outputs[0].outputs
    out_q = next(n for n in out_q if n.op == "QuantizeLinear")
    assert in_dq.inputs[1].values == out_q.inputs[1].values and in_dq.inputs[2].values == out_q.inputs[2].values


def test_uint8_symmetric_and_covered_ops():
    _, q, record = quantize(matmul_net(), "insert-qdq(activation-type=uint8,symmetric-activations=true)")
    zero_points = [n.inputs[2].values for n in q.nodes(op="QuantizeLinear")]
    assert zero_points and all(z.dtype == np.uint8 and int(z) == 128 for z in zero_points)
    for op in ("MatMul", "Add", "Mul", "Concat", "Resize"):
        node = next(n for n in q.nodes(op=op) if n.inputs[0].dtype == np.float32 or op != "Concat")
        assert node.inputs[0].inputs[0].op == "DequantizeLinear", op
    int_concat = next(n for n in q.nodes(op="Concat") if n.name == "int_concat")
    assert all(t.inputs[0].op != "DequantizeLinear" for t in int_concat.inputs if t.inputs)  # int64: untouched
    scores = next(n for n in q.nodes(op="MatMul") if n.name == "scores")
    assert [t.inputs[0].op for t in scores.inputs] == ["DequantizeLinear", "DequantizeLinear"]


def test_attention_matmul_can_stay_float():
    _, q, _ = quantize(matmul_net(), "insert-qdq(activation-matmul=false)")
    scores = next(n for n in q.nodes(op="MatMul") if n.name == "scores")
    assert scores.inputs[1].inputs[0].op == "Transpose"


@pytest.mark.parametrize("option,float_node", [("exclude-nodes=[conv2]", "conv2"), ("exclude-ops=[Gemm]", "fc"),
                                               ("exclude-pattern='^con.2$'", "conv2"), ("ops=[Conv]", "fc")])
def test_exclusions_keep_nodes_float(option, float_node):
    _, q, _ = quantize(conv_net(), f"insert-qdq({option})")
    node = next(n for n in q.nodes() if n.name == float_node)
    assert isinstance(node.inputs[1], __import__("onnx_graphsurgeon").Constant)
    assert node.inputs[1].values.dtype == np.float32
    assert dq_of(q, "w1").inputs[0].values.dtype == np.int8  # the others are still quantized


def test_running_twice_changes_nothing():
    _, once, _ = quantize(conv_net())
    before = once.to_onnx().SerializeToString()
    manager = PassManager("insert-qdq")
    manager.run(once, calibration=None)  # nothing left to quantize: no calibration needed
    assert not manager.records[-1].changed
    assert once.to_onnx().SerializeToString() == before


def test_does_not_fire_without_covered_float_ops():
    nodes = [helper.make_node("Softmax", ["x"], ["s"], name="softmax"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    model = _model(nodes, [_f("x", 2, 4)], [_f("y", 2, 4)], [])
    before = model.to_onnx().SerializeToString()
    _, q, record = quantize(model)
    assert not record.changed and q.to_onnx().SerializeToString() == before


def test_missing_calibration_is_a_clear_error():
    with pytest.raises(PassError, match="--calib"):
        PassManager("insert-qdq").run(conv_net())


def test_old_opset_is_converted_for_per_channel_dq():
    original, q, _ = quantize(conv_net(opset=11))
    assert q.opset == 13 and dq_of(q, "w1").attrs["axis"] == 0
    assert compare(original, q, calibration(original, 1)[0]).within(rtol=0.05)


def test_weights_shrink_about_four_times():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="l1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="l2")]
    model = _model(nodes, [_f("x", 1, 256)], [_f("y", 1, 256)], [_init("w", 256, 512), _init("w2", 512, 256)])
    original, q, _ = quantize(model)
    ratio = model_size_bytes(original) / model_size_bytes(q)
    assert 3.5 <= ratio <= 4.0


def test_pipeline_options_round_trip():
    (pass_,) = parse_pipeline("insert-qdq(method=entropy,per-channel=false,exclude-ops=[Add,Mul])")
    assert pass_.method == "entropy" and not pass_.per_channel and pass_.exclude_ops == ["Add", "Mul"]
    assert str(pass_) == "insert-qdq(method=entropy,per-channel=false,exclude-ops=[Add,Mul])"


@pytest.mark.parametrize("method", ["moving-average", "percentile", "entropy", "mse"])
def test_every_observer_produces_a_working_model(method):
    original, q, record = quantize(conv_net(), f"insert-qdq(method={method})", )
    assert record.changed
    assert compare(original, q, calibration(original, 1)[0]).within(rtol=0.1)


def test_outputs_can_stay_float():
    _, q, _ = quantize(matmul_net(), "insert-qdq(ops=[MatMul],outputs=false)")
    linear = next(n for n in q.nodes(op="MatMul") if n.name == "linear")
    assert linear.inputs[0].inputs[0].op == "DequantizeLinear"
    assert consumers_ops(q, linear.outputs[0].name) == ["Add"]  # no Q after the MatMul


def test_gather_tables_are_stored_int8_per_row():
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
    model = _model(nodes, [ids], [_f("y", 2, 3, 4)], [_init("table", 10, 6), _init("w", 6, 4)])
    inputs = {"ids": np.array([[0, 3, 9], [1, 1, 2]], np.int64)}
    original, q, _ = quantize(model, batches=[inputs])
    embed = next(q.nodes("Gather"))   # reads the int8 rows; only they are dequantized, not the table
    assert embed.inputs[0].values.dtype == np.int8 and embed.inputs[0].values.shape == (10, 6)
    scales = [n for n in q.nodes("Gather") if n is not embed][0].inputs[0].values
    assert scales.shape == (10,)
    assert not list(q.nodes("DequantizeLinear")) or all(
        n.inputs[0].name != embed.inputs[0].name for n in q.nodes("DequantizeLinear"))
    assert compare(original, q, inputs).within(rtol=0.05)
    table = original.constant_value(original.tensors()["table"])
    expected = quantize_weight(table, 0)
    rows = next(activation_batches(q, [embed.outputs[0].name], [inputs]))[embed.outputs[0].name]
    np.testing.assert_array_equal(rows, expected[0][inputs["ids"]])


def test_int4_tables_are_packed_two_values_a_byte_and_decoded_after_the_lookup():
    nodes = [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
    model = _model(nodes, [ids], [_f("y", 2, 3, 6)], [_init("table", 10, 6)])
    inputs = {"ids": np.array([[0, 3, 9], [1, 1, 2]], np.int64)}
    q = model.copy()
    PassManager("insert-qdq(int4-share=1.0)").run(q, calibration=[inputs])
    packed = next(q.nodes("Gather")).inputs[0].values
    assert packed.dtype == np.uint8 and packed.shape == (10, 3)
    table = model.constant_value(model.tensors()["table"])
    values, scale, zero = quantize_weight(table, 0, bits=4)
    expected = dequantize(values, scale, zero, 0)[inputs["ids"]]
    np.testing.assert_allclose(run(q, inputs)["y"], expected, rtol=1e-6, atol=1e-7)


def test_svd_split_output_quantizes_too():
    pytest.importorskip("graphpress.passes.svd_split")
    low_rank = (RNG.standard_normal((32, 4)) @ RNG.standard_normal((4, 32))).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    model = _model(nodes, [_f("x", 8, 32)], [_f("y", 8, 32)], [numpy_helper.from_array(low_rank, "w")])
    original, q, _ = quantize(model, "svd-split(method=plain,ratio=0.125),insert-qdq")
    matmuls = list(q.nodes(op=("MatMul", "Gemm")))
    assert len(matmuls) == 2
    assert all(n.inputs[1].inputs[0].op == "DequantizeLinear" for n in matmuls)  # both factors int8
    assert all(n.inputs[0].inputs[0].op == "DequantizeLinear" for n in matmuls)
    assert compare(original, q, calibration(original, 1)[0]).within(rtol=0.05)


def test_old_opset_without_quantizable_ops_is_left_alone():
    nodes = [helper.make_node("Softmax", ["x"], ["y"], name="softmax")]
    model = _model(nodes, [_f("x", 2, 4)], [_f("y", 2, 4)], [], opset=11)
    _, q, record = quantize(model)
    assert not record.changed and q.opset == 11
