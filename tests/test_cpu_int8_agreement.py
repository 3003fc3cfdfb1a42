"""The TVM int8 path against onnxruntime per quantized activation (graphpress.quant.agreement).

End to end, a QDQ transformer cannot be held to "within one step" of onnxruntime: one element rounded
the other way at a tie moves everything after it (MiniLM's last hidden state by up to ~1, in
onnxruntime alone). What the CPU lowering promises is per segment: fed onnxruntime's own quantized
activations, every QuantizeLinear output of the compiled artifact equals onnxruntime's (graph
optimizations off: ONNX's float semantics), except single elements whose value lies within float error
of a rounding tie, one step away. Its integer matmuls are exact where onnxruntime's float sums are not:
at those ties the artifact is the one that agrees with exact arithmetic (bench_int8_agreement.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("tvm")

from graphpress.ir import Model  # noqa: E402
from graphpress.passes import PassManager  # noqa: E402
from graphpress.quant import agreement  # noqa: E402
from test_cpu_schedules import lower_and_run, make_model, tensor, weight  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
RNG = np.random.default_rng(7)
#: a differing element's reference value lies at most this far (in quantization steps) from a rounding tie
TIE = 1e-3
SEQ, HIDDEN, HEADS, FFN, VOCAB = 16, 32, 2, 64, 50


def transformer_layer() -> onnx.ModelProto:
    """Embedding Gather + LayerNorm, then one BERT layer: Q/K/V projections, masked softmax attention
    (two activation x activation matmuls), output projection + residual + LayerNorm, GELU (Erf) FFN +
    residual + LayerNorm: the op patterns of MiniLM, small."""
    head = HIDDEN // HEADS

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [weight("table", VOCAB, HIDDEN, scale=1.0), const("ones", np.ones(HIDDEN)), const("zeros", np.zeros(HIDDEN)),
             const("heads", [1, SEQ, HEADS, head], np.int64), const("merged", [1, SEQ, HIDDEN], np.int64),
             const("root", np.sqrt(head)), const("one", 1.0), const("neg", -1e4), const("half", 0.5),
             const("sqrt2", np.sqrt(2.0)), const("axes", [1, 2], np.int64)]
    for name, rows, cols in (("wq", HIDDEN, HIDDEN), ("wk", HIDDEN, HIDDEN), ("wv", HIDDEN, HIDDEN),
                             ("wo", HIDDEN, HIDDEN), ("w1", HIDDEN, FFN), ("w2", FFN, HIDDEN)):
        inits += [weight(name, rows, cols), weight("b" + name[1:], cols, scale=0.1)]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("LayerNormalization", ["e", "ones", "zeros"], ["h0"], axis=-1),
        helper.make_node("Cast", ["mask"], ["maskf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["masked"]),
        helper.make_node("Mul", ["masked", "neg"], ["bias2d"]),
        helper.make_node("Unsqueeze", ["bias2d", "axes"], ["attn_bias"]),
    ]
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["h0", "w" + name], [name + "m"]),
                  helper.make_node("Add", [name + "m", "b" + name], [name + "a"]),
                  helper.make_node("Reshape", [name + "a", "heads"], [name + "r"]),
                  helper.make_node("Transpose", [name + "r"], [name + "t"],
                                   perm=[0, 2, 3, 1] if name == "k" else [0, 2, 1, 3])]
    nodes += [
        helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "root"], ["scaled"]),
        helper.make_node("Add", ["scaled", "attn_bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merged"], ["context_m"]),
        helper.make_node("MatMul", ["context_m", "wo"], ["om"]),
        helper.make_node("Add", ["om", "bo"], ["oa"]),
        helper.make_node("Add", ["oa", "h0"], ["res1"]),
        helper.make_node("LayerNormalization", ["res1", "ones", "zeros"], ["h1"], axis=-1),
        helper.make_node("MatMul", ["h1", "w1"], ["f1"]),
        helper.make_node("Add", ["f1", "b1"], ["f1b"]),
        helper.make_node("Div", ["f1b", "sqrt2"], ["f1s"]),
        helper.make_node("Erf", ["f1s"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf1"]),
        helper.make_node("Mul", ["f1b", "erf1"], ["gelu2"]),
        helper.make_node("Mul", ["gelu2", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["f2"]),
        helper.make_node("Add", ["f2", "b2"], ["f2b"]),
        helper.make_node("Add", ["f2b", "h1"], ["res2"]),
        helper.make_node("LayerNormalization", ["res2", "ones", "zeros"], ["y"], axis=-1),
    ]
    ints = [helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [1, SEQ]) for name in ("ids", "mask")]
    model = make_model(nodes, ints, [tensor("y", 1, SEQ, HIDDEN)], inits)
    onnx.checker.check_model(model)
    return model


def sentence(rng) -> dict[str, np.ndarray]:
    """Random token ids with a random-length tail of padding (mask 0), as MiniLM's padded sentences."""
    length = int(rng.integers(4, SEQ + 1))
    mask = (np.arange(SEQ) < length).astype(np.int64)[None]
    return {"ids": rng.integers(1, VOCAB, (1, SEQ)) * mask, "mask": mask}


def quantized_transformer() -> onnx.ModelProto:
    """graphpress' MiniLM recipe (bench_cpu): every MatMul input and the embedding table quantized."""
    model = Model.from_onnx(transformer_layer())
    PassManager("insert-qdq(method=minmax,ops=[MatMul,Gather])").run(model, calibration=[sentence(RNG) for _ in range(8)])
    return model.to_onnx()


def assert_segments_agree(qdq: onnx.ModelProto, inputs: dict, target_name: str = "x86") -> list:
    """Every quantized activation of the compiled teacher-forced model equals onnxruntime's, but for
    elements within TIE steps of a rounding tie, which are one step away; returns the disagreements."""
    values = agreement.reference_values(qdq, inputs)
    forced = agreement.teacher_forced(qdq, values)
    got, _ = lower_and_run(forced, agreement.forced_inputs(qdq, inputs, values), target_name)
    names = [o.name for o in forced.graph.output]
    found = agreement.disagreements(qdq, dict(zip(names, got)), values)
    for d in found:
        assert d.max_steps <= 1 and d.max_tie_distance <= TIE, d
    return found


@pytest.mark.parametrize("target_name", ["x86", "x86-64-v3"])
def test_transformer_layer_quantized_activations_match_onnxruntime_per_segment(target_name):
    """Gather of int8 rows, LayerNorm, weight and activation x activation integer matmuls, the masked
    softmax and GELU's Erf (TVM's fast_* polynomials), the requantization epilogues: exact given the
    same quantized inputs, on the host's channel quads (VNNI) and on AVX2's int16 pairs."""
    qdq = quantized_transformer()
    assert len(agreement.activation_quantizers(qdq)) == 16
    for seed in range(3):
        found = assert_segments_agree(qdq, sentence(np.random.default_rng(seed)), target_name)
        assert sum(d.differing for d in found) <= 3  # of 9216 elements: ties are rare


def test_teacher_forced_model_cuts_every_quantized_activation():
    """Each quantized activation is an output no node reads; its consumers read `<name>__fed`, so a
    value fed there (here: one element one step off) reaches exactly the segments after it."""
    qdq = quantized_transformer()
    inputs = sentence(np.random.default_rng(0))
    values = agreement.reference_values(qdq, inputs)
    forced = agreement.teacher_forced(qdq, values)
    quantized = [n.output[0] for n in agreement.activation_quantizers(qdq)]
    read = {name for node in forced.graph.node for name in node.input}
    assert not read & set(quantized) and {q + agreement.FED for q in quantized} <= read
    from graphpress.ir.execute import run
    feed = agreement.forced_inputs(qdq, inputs, values)
    assert all(d.differing == 0 for d in agreement.disagreements(qdq, run(forced, feed), values))
    first = quantized[0]
    nudged = feed[first + agreement.FED].astype(np.int32)
    nudged.flat[0] += 1 if nudged.flat[0] < 127 else -1
    feed[first + agreement.FED] = nudged.astype(values[first].dtype)
    moved = [d.tensor for d in agreement.disagreements(qdq, run(forced, feed), values) if d.differing]
    assert moved and first not in moved and set(moved) < set(quantized[1:])


def test_a_model_without_quantized_activations_is_refused():
    from graphpress.errors import GraphpressError
    with pytest.raises(GraphpressError, match="no QuantizeLinear on a computed tensor"):
        agreement.reference_values(transformer_layer(), sentence(np.random.default_rng(0)))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "minilm_l6_v2.onnx").is_file(), reason="../shared/models absent")
def test_minilm_int8_artifact_matches_onnxruntime_per_segment():
    """All 96 quantized activations of MiniLM (bench_cpu's int8 model, 128 tokens) on two held-out STS-B
    sentences and bench_cpu's random timing input: only elements on rounding ties differ."""
    from benchmarks.bench_cpu import quantized, static_model
    from benchmarks.realdata import calibration_indices
    from graphpress.backends.timing import sample_inputs

    qdq = quantized("minilm", static_model("minilm", 1), 1)
    data = np.load(SHARED / "data" / "stsb_test_tokenized.npz")
    padding = [(0, 0), (0, 128 - data["input_ids_b"].shape[1])]  # bench_cpu's 128 tokens: padding ids and mask 0
    feeds = [{"input_ids": np.pad(data["input_ids_b"][i:i + 1], padding),
              "attention_mask": np.pad(data["attention_mask_b"][i:i + 1], padding),
              "token_type_ids": np.zeros((1, 128), np.int64)}
             for i in (5, 23) if i not in calibration_indices("minilm")]
    feeds.append(sample_inputs([{"name": i.name, "shape": [1, 128], "dtype": "int64"} for i in qdq.graph.input]))
    for feed in feeds:
        found = assert_segments_agree(qdq, feed)
        assert len(found) == 96 and sum(d.differing for d in found) <= 20


def test_cut_at_one_tensor_lets_a_fed_value_propagate_to_the_output():
    """Cut at one quantized activation only, the rest of the model computes from it as usual: the
    model as given when fed the reference value, a different output when one element is a step off."""
    from graphpress.errors import GraphpressError
    from graphpress.ir.execute import run
    qdq = quantized_transformer()
    inputs = sentence(np.random.default_rng(1))
    values = agreement.reference_values(qdq, inputs)
    name = agreement.activation_quantizers(qdq)[0].output[0]
    forced = agreement.teacher_forced(qdq, values, [name])
    assert [i.name for i in forced.graph.input][-1] == name + agreement.FED and len(forced.graph.input) == 3
    feed = agreement.forced_inputs(qdq, inputs, values, [name])
    want = run(qdq, inputs)["y"]
    np.testing.assert_array_equal(run(forced, feed)["y"], want)
    nudged = values[name].astype(np.int32)
    nudged.flat[0] += 1 if nudged.flat[0] < 0 else -1
    feed[name + agreement.FED] = nudged.astype(values[name].dtype)
    assert np.abs(run(forced, feed)["y"] - want).max() > 0
    with pytest.raises(GraphpressError, match="not the output of a QuantizeLinear"):
        agreement.teacher_forced(qdq, values, ["y"])
