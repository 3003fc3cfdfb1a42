"""4-bit weights and GPTQ rounding in insert-qdq: storage, rounding quality, which weights go to 4 bits."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.errors import PassError
from graphpress.ir import Model, load, model_size_bytes, run
from graphpress.passes import PassManager
from graphpress.quant.gptq import gptq_quantize, gptq_with_scale_search
from graphpress.quant.scales import clipped_ranges, dequantize, quantize_weight
from graphpress.quant.sensitivity import sqnr_db

RNG = np.random.default_rng(0)


def _f(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def mlp(widths=(64, 48, 40, 10), opset=17):
    """MatMul+Add+Relu layers of the given widths; layer i's weight is w{i}."""
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        scale = 1.0 / np.sqrt(k)
        inits += [numpy_helper.from_array((RNG.standard_normal((k, n)) * scale).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((RNG.standard_normal(n) * 0.1).astype(np.float32), f"b{i}")]
        last = i == len(widths) - 2
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"linear{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], ["y" if last else f"a{i}"], name=f"bias{i}")]
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [_f("x", "batch", widths[0])], [_f("y", "batch", widths[-1])], inits)
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def correlated_batches(k=64, n=6, rows=64, seed=1):
    rng = np.random.default_rng(seed)
    mixing = np.eye(k) + 0.3 * rng.standard_normal((k, k))
    return [{"x": (rng.standard_normal((rows, k)) @ mixing).astype(np.float32)} for _ in range(n)]


def test_int4_constants_survive_export_and_run_in_onnxruntime():
    q = np.arange(-8, 8, dtype=np.int8).reshape(4, 4).astype(ml_dtypes.int4)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [helper.make_tensor("q", TensorProto.INT4, [4, 4], np.asarray(q, np.int8).ravel().tolist()),
             numpy_helper.from_array(np.full(4, 0.5, np.float32), "s")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [_f("x", 1, 4)], [_f("y", 1, 4)], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model = load(proto)
    stored = model.constant_value(model.tensors()["q"])   # loaded: gs now holds one byte per value
    model.tensors()["q"].values = stored
    again = Model.from_onnx(model.to_onnx())
    onnx.checker.check_model(again.to_onnx())
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(run(again, {"x": x})["y"], x @ (np.asarray(q, np.float32) * 0.5))
    assert model_size_bytes(again) < model_size_bytes(load(proto)) + 8  # still two values a byte


def test_int4_weights_are_clipped_where_that_lowers_the_error():
    w = RNG.standard_normal((256, 8)).astype(np.float32)
    w[0, 0] = 12.0                      # one outlier in channel 0
    low, high = clipped_ranges(w, 1, 7, -8)
    assert high[0] < 12.0 and np.allclose(low, -high)
    q, scale, zero = quantize_weight(w, 1, bits=4)
    assert q.dtype == ml_dtypes.int4 and not np.any(np.asarray(zero, np.int8))
    clipped_error = np.square(dequantize(q, scale, zero, 1) - w)[:, 0].sum()
    full_scale = np.abs(w[:, 0]).max() / 7
    full_error = np.square(np.clip(np.rint(w[:, 0] / full_scale), -8, 7) * full_scale - w[:, 0]).sum()
    assert clipped_error < full_error


def test_int4_weights_use_all_sixteen_levels():
    """A channel whose negative tail reaches further than its positive one uses level -8 (step = range / 7),
    and its error is below the 15-level [-7, 7] grid's."""
    w = RNG.standard_normal((512, 4)).astype(np.float32)
    w[0] = -np.abs(w).max() * 1.1
    q, scale, zero = quantize_weight(w, 1, bits=4)
    assert int(np.asarray(q, np.int8).min()) == -8
    sixteen = np.square(dequantize(q, scale, zero, 1) - w).sum()
    low, high = clipped_ranges(w, 1, 7)
    step = high / 7
    fifteen = np.square(np.clip(np.rint(w / step), -7, 7) * step - w).sum()
    assert sixteen < fifteen


def test_gptq_scale_search_lowers_the_output_error_below_fixed_clipping():
    """Choosing each column's step by its output error after GPTQ beats GPTQ with the weight-MSE clipping."""
    x = correlated_batches(k=64, n=1, rows=2000)[0]["x"].astype(np.float64)
    w = RNG.standard_normal((64, 16)) * np.linspace(0.2, 2.0, 64)[:, None]
    gram = x.T @ x
    q, step = gptq_with_scale_search(w, gram, 7, -8, 7)
    assert np.all(q == np.rint(q)) and q.min() >= -8 and q.max() <= 7 and step.shape == (16,)
    _, high = clipped_ranges(w, 1, 7, -8)
    fixed = gptq_quantize(w, gram, high / 7, -8, 7)
    searched_error = np.linalg.norm(x @ (w - q * step))
    assert searched_error < np.linalg.norm(x @ (w - fixed * (high / 7)))


def test_gptq_lowers_the_output_error_below_round_to_nearest():
    x = correlated_batches(k=96, n=1, rows=2000)[0]["x"].astype(np.float64)
    w = RNG.standard_normal((96, 32))
    _, high = clipped_ranges(w, 1, 7)
    scale = high / 7
    rtn = np.clip(np.rint(w / scale), -7, 7)
    gptq = gptq_quantize(w, x.T @ x, scale, -7, 7)
    assert np.all(gptq == np.rint(gptq)) and gptq.min() >= -7 and gptq.max() <= 7
    error = {name: np.linalg.norm(x @ (w - q * scale)) for name, q in (("rtn", rtn), ("gptq", gptq))}
    assert error["gptq"] < 0.85 * error["rtn"]


def test_gptq_on_an_exactly_representable_weight_is_exact():
    scale = np.full(8, 0.25)
    q = RNG.integers(-7, 8, (16, 8)).astype(np.float64)
    x = RNG.standard_normal((200, 16))
    np.testing.assert_array_equal(gptq_quantize(q * scale, x.T @ x, scale, -7, 7), q)


def _quantized(pipeline, model, batches):
    model = model.copy()
    PassManager(pipeline).run(model, calibration=batches)
    return model


def _int4_weights(model):
    return {n.inputs[0].name for n in model.nodes("DequantizeLinear")
            if isinstance(n.inputs[0], __import__("onnx_graphsurgeon").Constant)
            and n.inputs[0].values.dtype == ml_dtypes.int4}


def test_int4_share_stores_the_least_sensitive_weights_in_four_bits():
    model, batches = mlp(), correlated_batches()
    # make layer 1 far more sensitive: scale its weight up and the next one down (same function)
    w1, w2 = (model.tensors()[n] for n in ("w1", "w2"))
    w1.values = w1.values * 8
    model.tensors()["b1"].values = model.tensors()["b1"].values * 8
    w2.values = w2.values / 8
    w1.values[:, 0] *= 30      # an outlier column only 4 bits cannot follow
    reference = run(model, batches[0])["y"]
    half = _quantized("insert-qdq(int4-share=0.5)", model, batches)
    assert half.opset == 21
    int4 = _int4_weights(half)
    assert int4 and all("w1" not in name for name in int4)
    assert model_size_bytes(half) < model_size_bytes(_quantized("insert-qdq", model, batches))
    assert sqnr_db([[reference]], [[run(half, batches[0])["y"]]]) > 15


def test_a_search_over_shares_analyses_the_weights_once(monkeypatch):
    """The per-weight analysis (roundings, 4-bit costs) is share-independent and kept per model and data:
    three shares cost one analysis, the cached result equals a fresh one, and other data is analysed anew."""
    from graphpress.quant import lowbit
    calls = []
    original = lowbit.int4_costs
    monkeypatch.setattr(lowbit, "int4_costs", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(lowbit, "_ANALYSES", {})
    model, batches = mlp(), correlated_batches()
    pipelines = [f"insert-qdq(int4-share={share},rounding=gptq)" for share in (0.25, 0.5, 0.9)]
    shares = [len(_int4_weights(_quantized(p, model, batches))) for p in pipelines]
    assert len(calls) == 1 and shares[0] <= shares[1] <= shares[2] and shares[2] > shares[0]
    cached = _quantized(pipelines[1], model, batches).to_onnx()
    monkeypatch.setattr(lowbit, "_ANALYSES", {})
    fresh = _quantized(pipelines[1], model, batches).to_onnx()
    assert len(calls) == 2 and cached.SerializeToString() == fresh.SerializeToString()
    _quantized(pipelines[1], model, correlated_batches(seed=2))
    assert len(calls) == 3


def test_int4_share_zero_and_full():
    model, batches = mlp(), correlated_batches()
    assert not _int4_weights(_quantized("insert-qdq", model, batches))
    full = _quantized("insert-qdq(int4-share=1.0,rounding=gptq)", model, batches)
    assert len(_int4_weights(full)) == 3
    reference = run(model, batches[0])["y"]
    assert sqnr_db([[reference]], [[run(full, batches[0])["y"]]]) > 10


def test_gptq_rounding_improves_the_quantized_model():
    model, batches = mlp(), correlated_batches(n=8)
    reference = [run(model, b)["y"] for b in batches[4:]]
    scores = {}
    for rounding in ("nearest", "gptq"):
        quantized = _quantized(f"insert-qdq(int4-share=1.0,rounding={rounding})", model, batches[:4])
        scores[rounding] = sqnr_db([[r] for r in reference], [[run(quantized, b)["y"]] for b in batches[4:]])
    assert scores["gptq"] > scores["nearest"] + 0.5


@pytest.mark.parametrize("pipeline, message", [
    ("insert-qdq(int4-share=1.5)", "not a share"),
    ("insert-qdq(int4-share=0.5,bias-correction=true)", "bias-correction"),
])
def test_bad_low_bit_options_are_refused(pipeline, message):
    with pytest.raises(PassError, match=message):
        PassManager(pipeline).run(mlp(), calibration=correlated_batches())


def test_a_four_bit_model_compiles_through_tvm_with_onnxruntime_outputs(tmp_path):
    from graphpress import runtime
    from graphpress.backends import compile as compile_model
    model, batches = mlp(), correlated_batches()
    quantized = _quantized("insert-qdq(int4-share=1.0)", model, batches)
    compile_model(quantized, "x86", tmp_path / "artifact", pipeline=None)
    sample = {"x": batches[0]["x"][:1]}
    got = next(iter(runtime.load(tmp_path / "artifact").run(sample).values()))
    np.testing.assert_allclose(got, run(quantized, sample)["y"], rtol=1e-4, atol=1e-4)


def test_four_bit_matmuls_keep_float_inputs_and_run_as_one_fused_kernel(tmp_path):
    """Weight-only int4 MatMul (the transformer recipe, 3-D activations): onnxruntime fuses
    DequantizeLinear(int4) -> MatMul into MatMulNBits; no weight is dequantized per run."""
    import onnxruntime as ort
    model = mlp()
    model.graph.inputs[0].shape = [1, "batch", 64]
    model.graph.outputs[0].shape = [1, "batch", 10]
    batches = [{"x": b["x"][None]} for b in correlated_batches()]
    recipe = "insert-qdq(ops=[MatMul],outputs=false,int4-share={})"
    quantized = _quantized(recipe.format(1.0), model, batches)
    for node in quantized.nodes("MatMul"):
        producer = quantized.producer(node.inputs[0])
        assert producer is None or producer.op != "DequantizeLinear"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(quantized.to_onnx().SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert fused.count("MatMulNBits") == 3 and "DequantizeLinear" not in fused
    half = _quantized(recipe.format(0.5), model, batches)   # the int8 MatMuls keep int8 inputs
    assert any(half.producer(n.inputs[0]) is not None and half.producer(n.inputs[0]).op == "DequantizeLinear"
               for n in half.nodes("MatMul"))
