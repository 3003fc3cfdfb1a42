"""QDQ models through graphpress' CPU layer: integer convolutions/matmuls, requantization fused.

The QDQ models are made by onnxruntime's own `quantize_static` (per-channel int8 weights, int8
activations) from float graphs built in code, and the TVM result is compared with onnxruntime's
execution of the same QDQ model: its fused integer kernels (QLinearConv etc.) and its exact
reference (graph optimizations off, float arithmetic on the dequantized values).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

from graphpress.backends import targets  # noqa: E402
from graphpress.backends.cpu import pipeline  # noqa: E402
from graphpress.backends.tvm_compile import import_relax, input_specs  # noqa: E402
from test_cpu_schedules import conv_block, lower_and_run, make_model, tensor, weight  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
RNG = np.random.default_rng(1)


def quantize_static(model: onnx.ModelProto, feeds: list[dict], tmp_path: Path, per_channel=True, activation="int8",
                    **extra):
    """onnxruntime's QDQ quantization of `model` calibrated on `feeds` (int8 or uint8 activations, int8
    weights); returns the QDQ ModelProto."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, str(src))
    ort_quantize(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                 activation_type=QuantType.QInt8 if activation == "int8" else QuantType.QUInt8,
                 weight_type=QuantType.QInt8, extra_options=extra)
    return onnx.load(str(dst))


def onnxruntime_qdq(model: onnx.ModelProto, feeds: dict, optimized: bool) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def output_step(model: onnx.ModelProto) -> float:
    """The quantization step of the last QuantizeLinear (the output's grid)."""
    last_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][-1]
    scale = next(i for i in model.graph.initializer if i.name == last_q.input[1])
    return float(onnx.numpy_helper.to_array(scale))


def integer_kernels(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of the fused conv/matmul functions after `prepare`, once per call: (integer ones, float ones).

    Integer convolutions are the packed `conv2d_pairs` / `conv2d_quads` kernels; integer matmuls take
    int16 or uint8. Layers of equal shapes and constants share one function, called once each.
    """
    specs, _ = input_specs(model, None, "test")
    target = targets.resolve("x86").tvm_target()
    prepared = pipeline.prepare(import_relax(model, specs, "test"), target)
    integer, floating = [], []
    for gvar, func in prepared.functions_items():
        name = gvar.name_hint
        if isinstance(func, tvm.tirx.PrimFunc) and ("conv2d" in name or "matmul" in name):
            signature = next(line for line in func.script().splitlines() if "def main(" in line)
            first_dtype = re.search(r'"(\w+)"\)', signature).group(1)
            is_integer = "conv2d_pairs" in name or "conv2d_quads" in name or ("matmul" in name and first_dtype in ("int16", "uint8"))
            calls = len(re.findall(rf"\b{name}\b,", prepared["main"].script()))
            (integer if is_integer else floating).extend([name] * calls)
    assert "dequantize" not in str(prepared) and "quantize(" not in str(prepared)
    return integer, floating


def residual_conv_net():
    """conv3x3+bias+ReLU -> conv3x3+bias, + residual, ReLU -> depthwise -> 1x1: the ResNet/MobileNet chains."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Conv", ["r2", "wd", "bd"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, group=16, strides=[2, 2]),
        helper.make_node("Relu", ["d"], ["r3"]),
        helper.make_node("Conv", ["r3", "wp", "bp"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [weight("w1", 16, 8, 3, 3), weight("b1", 16), weight("w2", 16, 16, 3, 3), weight("b2", 16),
             weight("wd", 16, 1, 3, 3), weight("bd", 16), weight("wp", 24, 16, 1, 1), weight("bp", 24)]
    return make_model(nodes, [tensor("x", 1, 8, 12, 12)], [tensor("y", 1, 24, 6, 6)], inits, opset=13)


def assert_int8_matches(qdq: onnx.ModelProto, feeds: dict, target_name: str = "x86") -> float:
    """Within one output quantization step of onnxruntime's exact QDQ reference; returns the share of
    outputs equal to it.

    onnxruntime's fused integer kernels are not the reference: on x86 without VNNI they add
    uint8 x int8 products pairwise in saturating int16 and can be off by several steps.
    """
    got, _ = lower_and_run(qdq, feeds, target_name)
    step = output_step(qdq)
    reference = onnxruntime_qdq(qdq, feeds, optimized=False)
    for g, w in zip(got, reference):
        assert g.shape == w.shape
        assert float(np.abs(g - w).max()) <= step * 1.001, (float(np.abs(g - w).max()), step)
    return float(np.mean(np.isclose(got[0], reference[0], rtol=0, atol=step * 1e-3)))


#: the host's own target (channel quads with vpdpbusd where it has VNNI) and AVX2 (pairs, vpmaddwd)
HOST_AND_AVX2 = ["x86", "x86-64-v3"]


@pytest.mark.parametrize("target_name", HOST_AND_AVX2)
def test_qdq_conv_chain_runs_in_integer_arithmetic_within_one_step(tmp_path, target_name):
    model = residual_conv_net()
    calibration = [{"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(8)]
    qdq = quantize_static(model, calibration, tmp_path)
    integer, floating = integer_kernels(qdq)
    assert len(integer) == 3 and len(floating) == 1  # the depthwise conv stays float (no channel pairs)
    feeds = {"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)}
    # ties in the requantization rounding are the only differences
    assert assert_int8_matches(qdq, feeds, target_name) >= 0.99
    got, rules = lower_and_run(qdq, feeds, target_name)
    conv_rules = sorted(rule for name, rule in rules.items() if "conv2d" in name)
    assert conv_rules == ["DepthwiseConv"] + ["TiledPairs"] * 3  # packed kernels; the depthwise conv its own
    fused = onnxruntime_qdq(qdq, feeds, optimized=True)[0]  # QLinearConv: integer-exact on this graph
    assert float(np.abs(got[0] - fused).max()) <= output_step(qdq) * 1.001


def test_depthwise_convolutions_read_one_byte_inputs(tmp_path):
    """The depthwise conv accumulates in float on the quantized input itself (uint8 after ReLU's zero
    point -128): the layer before it writes one byte per element, not a dequantized float32."""
    model = residual_conv_net()
    calibration = [{"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(8)]
    qdq = quantize_static(model, calibration, tmp_path)
    specs, _ = input_specs(qdq, None, "test")
    prepared = pipeline.prepare(import_relax(qdq, specs, "test"), targets.resolve("x86").tvm_target())
    depthwise = [func.script() for gvar, func in prepared.functions_items()
                 if isinstance(func, tvm.tirx.PrimFunc) and "conv2d" in gvar.name_hint
                 and "pairs" not in gvar.name_hint and "quads" not in gvar.name_hint]
    assert len(depthwise) == 1
    signature = next(line for line in depthwise[0].splitlines() if "def main(" in line)
    assert re.search(r'"(\w+)"\)', signature).group(1) in ("uint8", "int8"), signature
    assert assert_int8_matches(qdq, {"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)}) >= 0.99


def test_graphpress_int4_weights_run_as_int8_kernels_in_both_runtimes(tmp_path):
    """graphpress' 4-bit weights (insert-qdq int4-share=1, read through Cast(to=INT8), no zero points, bias
    scales as a Mul): onnxruntime folds the Cast and runs QLinearConv, TVM widens them and takes its integer
    kernels; both within one output step of the exact QDQ arithmetic."""
    from graphpress.ir import Model
    from graphpress.passes import PassManager
    calibration = [{"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(8)]
    model = Model.from_onnx(residual_conv_net())
    PassManager("insert-qdq(int4-share=1.0)").run(model, calibration=calibration)
    qdq = model.to_onnx()
    casts = [n for n in qdq.graph.node if n.op_type == "Cast"]
    assert len(casts) == 4 and all(n.attribute[0].i == onnx.TensorProto.INT8 for n in casts)
    constants = {t.name for t in qdq.graph.initializer} | {n.output[0] for n in casts}
    weights_and_biases = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert len(weights_and_biases) == 8 and all(len(n.input) == 2 for n in weights_and_biases)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused_ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused_ops.count("QLinearConv") == 4 and "Conv" not in fused_ops and "Cast" not in fused_ops
    integer, floating = integer_kernels(qdq)
    assert len(integer) == 3 and len(floating) == 1  # as with 8-bit weights: the depthwise conv stays float
    assert assert_int8_matches(qdq, {"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)}) >= 0.99


def test_vnni_targets_take_channel_quads(tmp_path):
    """With VNNI, 3x3 (padded with the zero point) and 1x1 convolutions and matmuls use u8 x s8 quads
    (`vpdpbusd`); AVX2 keeps int16 pairs (`vpmaddwd`). Lowered only: the host may lack VNNI."""
    qdq = quantize_static(residual_conv_net(), [{"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)}], tmp_path)
    specs, _ = input_specs(qdq, None, "test")
    scripts = {}
    for name, config in (("vnni", {"kind": "llvm", "mcpu": "znver4"}), ("avx2", {"kind": "llvm", "mcpu": "znver3"})):
        target = targets.resolve(target_json=config).tvm_target()
        scripts[name] = pipeline.lower(import_relax(qdq, specs, "test"), target).script()
    assert scripts["vnni"].count("vpdpbusd") == 3 and "pmadd" not in scripts["vnni"]
    assert scripts["avx2"].count("pmadd.wd") == 3 and "vpdpbusd" not in scripts["avx2"]
    # weights in panels of one instruction's outputs, [O/V, kh, kw, C/g, V, g]: 16 int32 lanes of
    # channel quads on AVX-512, 8 lanes of int16 pairs on AVX2 (the second 3x3 conv, 16 -> 16 channels)
    assert 'T.Buffer((T.int64(1), T.int64(3), T.int64(3), T.int64(4), T.int64(16), T.int64(4)), "int8")' in scripts["vnni"]
    assert 'T.Buffer((T.int64(2), T.int64(3), T.int64(3), T.int64(8), T.int64(8), T.int64(2)), "int16")' in scripts["avx2"]


@pytest.mark.parametrize("target_name", HOST_AND_AVX2)
def test_qdq_matmul_runs_in_integer_arithmetic(tmp_path, target_name):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    model = make_model(nodes, [tensor("x", 1, 10, 32)], [tensor("y", 1, 10, 24)], [weight("w", 32, 24)], opset=13)
    calibration = [{"x": RNG.standard_normal((1, 10, 32)).astype(np.float32)} for _ in range(8)]
    qdq = quantize_static(model, calibration, tmp_path)
    integer, floating = integer_kernels(qdq)
    assert len(integer) == 1 and not floating
    feeds = {"x": RNG.standard_normal((1, 10, 32)).astype(np.float32)}
    assert assert_int8_matches(qdq, feeds, target_name) >= 0.99
    _, rules = lower_and_run(qdq, feeds, target_name)
    assert [r for n, r in rules.items() if "matmul" in n] == ["TiledPairs"]  # packed weights, vpmaddwd


def test_qdq_gemm_with_transposed_weights_runs_in_integer_arithmetic(tmp_path):
    """Gemm(transB=1), the classifier of most CNNs: imported as matmul(x, permute_dims(dequantize(W))),
    per-channel scales along W's first axis. It stayed float (light ResNet-50 int8: 0.5 ms of 8 MB
    float weights for a 2 MB int8 layer)."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", 2, 64)], [tensor("y", 2, 40)], [weight("w", 40, 64), weight("b", 40)], opset=13)
    qdq = quantize_static(model, [{"x": RNG.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)], tmp_path)
    integer, floating = integer_kernels(qdq)
    assert len(integer) == 1 and not floating, (integer, floating)
    assert assert_int8_matches(qdq, {"x": RNG.standard_normal((2, 64)).astype(np.float32)}) >= 0.99


def test_activation_matmuls_run_as_exact_float_sums(tmp_path):
    """Attention's activation x activation matmuls (no constant weight to pack): float32 sums of the
    integer products, exact below 2^24 (here 64 x 255 x 255), so the same integers as the int16 path."""
    from graphpress.backends.cpu import int8

    nodes = [helper.make_node("MatMul", ["a", "b"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    model = make_model(nodes, [tensor("a", 1, 2, 16, 64), tensor("b", 1, 2, 64, 16)], [tensor("y", 1, 2, 16, 16)], [], opset=13)
    def feeds():
        return {"a": RNG.standard_normal((1, 2, 16, 64)).astype(np.float32), "b": RNG.standard_normal((1, 2, 64, 16)).astype(np.float32)}
    qdq = quantize_static(model, [feeds() for _ in range(4)], tmp_path)
    specs, _ = input_specs(qdq, None, "test")
    prepared = pipeline.prepare(import_relax(qdq, specs, "test"), targets.resolve("x86").tvm_target()).script()
    assert "int16" not in prepared  # no widening int16 products
    x = feeds()
    assert assert_int8_matches(qdq, x) >= 0.99
    exact, _ = lower_and_run(qdq, x)
    original = int8._matmul_exact_in_float32
    int8._matmul_exact_in_float32 = lambda *args: False  # the int16 path, for comparison
    try:
        via_int16, _ = lower_and_run(qdq, x)
    finally:
        int8._matmul_exact_in_float32 = original
    np.testing.assert_array_equal(exact[0], via_int16[0])


def test_qdq_matmul_with_odd_columns_is_padded_and_exact(tmp_path):
    """70 columns padded to 80 for the pair kernel, sliced back before the requantization."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [tensor("x", 1, 6, 32)], [tensor("y", 1, 6, 70)], [weight("w", 32, 70)], opset=13)
    qdq = quantize_static(model, [{"x": RNG.standard_normal((1, 6, 32)).astype(np.float32)} for _ in range(4)], tmp_path)
    feeds = {"x": RNG.standard_normal((1, 6, 32)).astype(np.float32)}
    assert assert_int8_matches(qdq, feeds) >= 0.99
    _, rules = lower_and_run(qdq, feeds)
    assert [r for n, r in rules.items() if "matmul" in n] == ["TiledPairs"], rules


@pytest.mark.parametrize("target_name", HOST_AND_AVX2)
def test_qdq_conv_with_narrow_odd_channels_is_padded_to_the_packed_kernel(tmp_path, target_name):
    """51 output channels (a pruned layer): padded to 56 or 64 for the pair/quad kernel, which has no
    partial-vector form; without it the convolution ran as scalar code, ten times slower."""
    model = conv_block(cin=16, cout=51, k=3, hw=8)
    calibration = [{"x": RNG.standard_normal((1, 16, 8, 8)).astype(np.float32)} for _ in range(4)]
    qdq = quantize_static(model, calibration, tmp_path)
    feeds = {"x": RNG.standard_normal((1, 16, 8, 8)).astype(np.float32)}
    assert assert_int8_matches(qdq, feeds, target_name) >= 0.99
    _, rules = lower_and_run(qdq, feeds, target_name)
    assert [r for n, r in rules.items() if "conv2d" in n] == ["TiledPairs"], rules


@pytest.mark.parametrize("target_name", HOST_AND_AVX2)
def test_qdq_conv_with_odd_input_channels_pads_them_to_the_packed_kernel(tmp_path, target_name):
    """A 3-channel RGB stem: input channels padded to 4 with the zero point (zero weights there), so
    it takes the pair/quad kernel instead of float on dequantized inputs (light ResNet-50's 7x7 stem
    1.34 -> 0.68 ms)."""
    model = conv_block(cin=3, cout=32, k=3, stride=2, hw=16)
    calibration = [{"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    qdq = quantize_static(model, calibration, tmp_path)
    integer, floating = integer_kernels(qdq)
    assert len(integer) == 1 and not floating, (integer, floating)
    assert assert_int8_matches(qdq, {"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)}, target_name) >= 0.99


def test_asymmetric_weights_stay_float(tmp_path):
    """A per-channel weight zero point != 0 has no exact form as int16 products here: it stays float."""
    model = conv_block(cin=8, cout=16, k=3, hw=8)
    calibration = [{"x": RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(4)]
    qdq = quantize_static(model, calibration, tmp_path)
    weight_dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w"))
    zero_point = next(i for i in qdq.graph.initializer if i.name == weight_dq.input[2])
    zero_point.CopyFrom(onnx.numpy_helper.from_array(np.ones(16, np.int8), zero_point.name))
    integer, floating = integer_kernels(qdq)
    assert not integer and len(floating) == 1
    assert_int8_matches(qdq, {"x": RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)})


@pytest.mark.skipif(not (SHARED / "models" / "resnet8_cifar10.onnx").is_file(), reason="../shared/models absent")
def test_resnet8_qdq_matches_onnxruntime(tmp_path):
    model = onnx.load(str(SHARED / "models" / "resnet8_cifar10.onnx"))
    calibration = [{"input_1": RNG.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)} for _ in range(8)]
    qdq = quantize_static(model, calibration, tmp_path)
    integer, floating = integer_kernels(qdq)
    assert len(integer) == 10 and not floating  # 9 convolutions (the 3-channel stem padded to 4) and the dense layer
    # Compared up to the average pool's output, every convolution exact and the pool within one step:
    # an exact tie in its requantization (sum / 64 lands on n + 1/2) may round either way in float,
    # which the dense layer spreads to 2 steps of the logits and the softmax to ~20 of its own grid
    # (input seed 8, a noise image on which the two top classes then swap).
    pool = next(n for n in qdq.graph.node if n.op_type == "AveragePool")
    pooled = next(n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    src, head = tmp_path / "qdq.onnx", tmp_path / "to_pool.onnx"
    onnx.save(qdq, str(src))
    onnx.utils.extract_model(str(src), str(head), ["input_1"], [pooled])
    for seed in (0, 8):
        feeds = {"input_1": np.random.default_rng(seed).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)}
        got, _ = lower_and_run(onnx.load(str(head)), feeds)
        want = onnxruntime_qdq(onnx.load(str(head)), feeds, optimized=False)[0]
        steps = np.abs(got[0].astype(np.int32) - want.astype(np.int32))
        assert steps.max() <= 1 and np.mean(steps == 0) >= 0.95, steps.max()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "mobilenet_v2_1.0_224.onnx").is_file(), reason="../shared/models absent")
def test_mobilenet_v2_qdq_matches_onnxruntime(tmp_path):
    """Probabilities within one step of the logits' quantization grid (softmax moves them no further)."""
    model = onnx.load(str(SHARED / "models" / "mobilenet_v2_1.0_224.onnx"))
    calibration = [{"input_f": RNG.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)} for _ in range(4)]
    qdq = quantize_static(model, calibration, tmp_path)
    integer, floating = integer_kernels(qdq)
    assert len(integer) >= 30 and len(floating) <= 18  # depthwise convs (17) and the 3-channel stem stay float
    assert_int8_matches(qdq, {"input_f": RNG.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)})


def test_pair_kernels_fall_back_to_narrower_vectors_that_divide_the_channels():
    from graphpress.backends.cpu.pairs import pair_lanes
    assert pair_lanes(16, 32) == 16      # AVX-512: zmm pairs
    assert pair_lanes(16, 24) == 8       # AVX-512 host, 24 channels: AVX2's ymm form
    assert pair_lanes(8, 24) == 8
    assert pair_lanes(8, 12) is None     # no vector divides 12 channels: the plain tiled schedule
