"""The depthwise schedule (`schedules.depthwise.DepthwiseConv`) on float and QDQ int8 graphs.

The rule only reorganizes the computation: for int8 models its float32 sums are of exact integer
products (|q - zero point| <= 255 times |weight| <= 128, nine taps: below 2^24), so its outputs must
be bit-identical to the generic register tile's (`TiledReduction`, the schedule without the rule),
and within one output step of onnxruntime's exact QDQ reference. Float graphs are compared with
onnxruntime. Each test also checks which rule took the depthwise function, so a rule that silently
stops applying fails here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

from graphpress.backends import targets  # noqa: E402
from graphpress.backends.cpu import pipeline, schedules  # noqa: E402
from graphpress.backends.cpu.schedules.depthwise import DepthwiseConv, block_rows, register_tile  # noqa: E402
from graphpress.backends.tvm_compile import import_relax, input_specs  # noqa: E402
import test_backend_cross as cross  # noqa: E402
from test_cpu_int8 import SHARED, onnxruntime_qdq, output_step, quantize_static  # noqa: E402
from test_cpu_schedules import assert_matches_onnxruntime, lower_and_run, make_model, tensor, weight  # noqa: E402

RNG = np.random.default_rng(3)
qemu_runtime = cross.qemu_runtime  # the fixture, for the aarch64 test


def depthwise_net(channels=48, size=14, stride=1, pads=1, batch=1, relu6=True):
    """1x1 conv (+ReLU6) -> 3x3 depthwise conv (+ReLU6) -> 1x1 conv: a MobileNetV2 block."""
    out = (size + 2 * pads - 3) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"], kernel_shape=[1, 1])]
    if relu6:
        nodes.append(helper.make_node("Clip", ["e", "lo", "hi"], ["er"]))
    nodes += [helper.make_node("Conv", ["er" if relu6 else "e", "wd", "bd"], ["d"], kernel_shape=[3, 3],
                               pads=[pads] * 4, strides=[stride] * 2, group=channels),
              helper.make_node("Clip", ["d", "lo", "hi"], ["dr"]),
              helper.make_node("Conv", ["dr", "wp", "bp"], ["y"], kernel_shape=[1, 1])]
    inits = [weight("we", channels, 8, 1, 1), weight("be", channels), weight("wd", channels, 1, 3, 3, scale=0.5),
             weight("bd", channels), weight("wp", 16, channels, 1, 1), weight("bp", 16),
             onnx.numpy_helper.from_array(np.array(0, np.float32), "lo"),
             onnx.numpy_helper.from_array(np.array(6, np.float32), "hi")]
    return make_model(nodes, [tensor("x", batch, 8, size, size)], [tensor("y", batch, 16, out, out)], inits, opset=13)


def without_depthwise_rule(monkeypatch):
    monkeypatch.setattr(schedules, "RULES", tuple(r for r in schedules.RULES if not isinstance(r, DepthwiseConv)))


def depthwise_rules(model, target_name: str = "x86") -> list[str]:
    """The rule that schedules each depthwise function (grouped conv2d, float weights) of `model`."""
    specs, _ = input_specs(model, None, "test")
    target = targets.resolve(target_name).tvm_target()
    prepared = pipeline.prepare(import_relax(model, specs, "test"), target)
    names = []
    with target:
        for gvar, func in prepared.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and "group_conv2d" in func.script():
                names.append(next(type(r).__name__ for r in schedules.RULES
                                  if r.apply(func, target, False) is not None))
    return names


@pytest.mark.parametrize("stride,pads,target_name", [(1, 1, "x86"), (1, 0, "x86"), (2, 1, "x86"), (1, 1, "x86-64-v3")])
@pytest.mark.parametrize("activation", ["int8", "uint8"])
def test_qdq_depthwise_is_bit_identical_to_the_generic_tile(tmp_path, monkeypatch, stride, pads, target_name,
                                                            activation):
    """Padding (or none), stride 1 and 2, int8
    activations after ReLU6 (the depthwise input arrives as uint8) and uint8 ones with a zero point
    (as int16), per-channel weights; AVX-512 (this host) and AVX2."""
    model = depthwise_net(stride=stride, pads=pads, relu6=activation == "int8")
    calibration = [{"x": RNG.standard_normal((1, 8, 14, 14)).astype(np.float32)} for _ in range(8)]
    qdq = quantize_static(model, calibration, tmp_path, activation=activation)
    assert depthwise_rules(qdq, target_name) == ["DepthwiseConv"]
    feeds = {"x": RNG.standard_normal((1, 8, 14, 14)).astype(np.float32)}
    got, _ = lower_and_run(qdq, feeds, target_name)
    reference = onnxruntime_qdq(qdq, feeds, optimized=False)[0]
    assert float(np.abs(got[0] - reference).max()) <= output_step(qdq) * 1.001
    without_depthwise_rule(monkeypatch)
    generic, _ = lower_and_run(qdq, feeds, target_name)
    np.testing.assert_array_equal(got[0], generic[0])


@pytest.mark.parametrize("channels,size,batch,target_name", [(48, 14, 1, "x86"), (32, 28, 2, "x86"), (24, 7, 1, "x86"),
                                                             (48, 14, 1, "x86-64-v3"), (24, 28, 1, "x86-64-v3")])
def test_float_depthwise_matches_onnxruntime(channels, size, batch, target_name):
    """AVX-512 (this host) and AVX2 (16 registers: narrower tiles)."""
    model = depthwise_net(channels=channels, size=size, batch=batch)
    assert depthwise_rules(model, target_name) == ["DepthwiseConv"]
    assert_matches_onnxruntime(model, {"x": RNG.standard_normal((batch, 8, size, size)).astype(np.float32)},
                               target_name=target_name)


def test_register_tile_leaves_room_for_a_kernel_row():
    # AVX-512 (16 lanes, 30 registers): vectors x (pixels + 3 weights + 1 load) <= 30, pixels divide the width
    assert register_tile(192, 28, 16, 30, 3) == (32, 7)  # 14 accumulators either way: the wider channel block
    assert register_tile(32, 112, 16, 30, 3) == (32, 8)
    assert register_tile(960, 7, 16, 30, 3) == (32, 7)  # 3 vectors x (7 + 4) = 33 registers: too many
    assert register_tile(24, 14, 8, 14, 3) == (8, 7)  # AVX2 (8 lanes, 14 registers): 3 x 8 = 24 does not fit
    assert block_rows(28, 16 * 16 * 4, 3) == 14  # 16 input rows of 16 pixels x 16 channels: 16 KB
    assert block_rows(7, 100_000, 3) == 1


@pytest.mark.cross
def test_depthwise_graphs_under_qemu_match_x86(qemu_runtime, tmp_path):
    """The rule on NEON (4 lanes): float and int8 depthwise artifacts give the x86 outputs under qemu."""
    model = depthwise_net()
    calibration = [{"x": RNG.standard_normal((1, 8, 14, 14)).astype(np.float32)} for _ in range(4)]
    for name, proto in (("float", model), ("int8", quantize_static(model, calibration, tmp_path))):
        cross._compare_with_x86(proto, tmp_path / name, "aarch64")


def qdq_depthwise(kernel: int, weights: np.ndarray, channels=16, size=24):
    """uint8 input (zero point 0) -> DequantizeLinear -> depthwise conv (kernel x kernel, 'same'
    padding) with per-channel int8 weights `weights` [channels, 1, kernel, kernel]."""
    pad = kernel // 2
    inits = [onnx.numpy_helper.from_array(np.array(0.02, np.float32), "sx"),
             onnx.numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             onnx.numpy_helper.from_array(weights.astype(np.int8), "wq"),
             onnx.numpy_helper.from_array(RNG.uniform(0.001, 0.01, channels).astype(np.float32), "sw"),
             onnx.numpy_helper.from_array(np.zeros(channels, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], kernel_shape=[kernel, kernel], pads=[pad] * 4,
                              group=channels)]
    shape = (1, channels, size, size)
    return make_model(nodes, [tensor("x", *shape)], [tensor("y", *shape)], inits, opset=13)


@pytest.mark.parametrize("kernel,full_range,exact", [(3, True, True), (23, False, True), (23, True, False)])
def test_depthwise_float_accumulation_only_where_exact(caplog, kernel, full_range, exact):
    """int8 depthwise convolutions accumulate integer products in float32 only while every partial sum
    is at most 2^24 (255 x 128 x 529 taps of a full-range 23x23 kernel is not); otherwise float
    arithmetic on the dequantized values. Both match onnxruntime's QDQ reference."""
    import logging

    shape = (16, 1, kernel, kernel)
    weights = RNG.choice([-128, 127], shape) if full_range else RNG.integers(-20, 21, shape)
    model = qdq_depthwise(kernel, weights)
    # inputs on the quantization grid: the QuantizeLinear rounds no tie, which TVM's x * (1 / scale) and
    # onnxruntime's x / scale could break differently (one step moves a whole 23x23 window of outputs)
    feeds = {"x": (RNG.integers(0, 256, (1, 16, 24, 24)) * np.float32(0.02)).astype(np.float32)}
    with caplog.at_level(logging.DEBUG, logger="graphpress.backends.cpu.int8"):
        got, _ = lower_and_run(model, feeds)
    assert ("may exceed 2^24" in caplog.text) is not exact
    want = onnxruntime_qdq(model, feeds, optimized=False)[0]
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "mobilenet_v2_1.0_224.onnx").is_file(), reason="../shared/models absent")
def test_mobilenet_v2_int8_depthwise_layers_are_bit_identical_to_the_generic_tile(tmp_path, monkeypatch):
    """The real model (onnxruntime's QDQ quantization): all seventeen depthwise layers take the rule, and
    the whole int8 network's output equals the one built without it, bit for bit."""
    model = onnx.load(str(SHARED / "models" / "mobilenet_v2_1.0_224.onnx"))
    calibration = [{"input_f": RNG.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)} for _ in range(4)]
    qdq = quantize_static(model, calibration, tmp_path)
    rules = depthwise_rules(qdq)  # layers of equal shapes share a function: 10 functions for 17 layers
    assert rules == ["DepthwiseConv"] * 10, rules
    feeds = {"input_f": RNG.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)}
    got, _ = lower_and_run(qdq, feeds)
    without_depthwise_rule(monkeypatch)
    generic, _ = lower_and_run(qdq, feeds)
    np.testing.assert_array_equal(got[0], generic[0])
