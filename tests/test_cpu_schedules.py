"""graphpress' CPU lowering (layout, fusion, schedules) vs onnxruntime, op by op and on a real model.

Every graph is compiled through `graphpress.backends.cpu.lower` and compared with onnxruntime within
1e-4 relative; each test also checks which schedule rule took the function, so a rule that silently
stops applying (and leaves the slow unscheduled loop nest) fails a test instead of a benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from graphpress.backends import targets  # noqa: E402
from graphpress.backends.cpu import pipeline  # noqa: E402
from graphpress.backends.cpu.schedules import RULES  # noqa: E402
from graphpress.backends.tvm_compile import import_relax, input_specs  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
RNG = np.random.default_rng(0)


def weight(name, *shape, scale=0.2):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def make_model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tensor(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def lower_and_run(model: onnx.ModelProto, feeds: dict, target_name: str = "x86"):
    """Import, lower with the CPU pipeline, build and run; returns (outputs, {func name: rule name})."""
    from tvm import relax

    specs, _ = input_specs(model, None, "test")
    mod = import_relax(model, specs, "test")
    target = targets.resolve(target_name).tvm_target()
    with target:
        fused = pipeline.prepare(mod, target)
    rules = {gv.name_hint: _rule_for(func, target) for gv, func in fused.functions_items()
             if isinstance(func, tvm.tirx.PrimFunc)}
    executable = tvm.compile(pipeline.lower(mod, target), target=target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(feeds[s.name]) for s in specs])
    result = [result] if hasattr(result, "numpy") else list(result)
    return [r.numpy() for r in result], rules


def _rule_for(func, target) -> str | None:
    with target:
        for rule in RULES:
            if rule.apply(func, target, False) is not None:
                return type(rule).__name__
    return None


def onnxruntime_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_matches_onnxruntime(model, feeds, rtol=1e-4, target_name="x86"):
    got, rules = lower_and_run(model, feeds, target_name)
    want = onnxruntime_run(model, feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = max(float(np.abs(w).max()), 1e-6)
        assert float(np.abs(g - w).max()) <= rtol * scale, f"max error {np.abs(g - w).max()} vs scale {scale}"
    return rules


def conv_block(cin=16, cout=32, k=3, stride=1, group=1, hw=14, residual=False, act="Relu"):
    """Conv(+bias) -> activation (-> + input): the chain FuseOps turns into one function."""
    pad = k // 2
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[pad] * 4, group=group)]
    inits = [weight("w", cout, cin // group, k, k), weight("b", cout)]
    last = "c"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", [last], ["a"]))
        last = "a"
    elif act == "Clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["a"]))
        last = "a"
    if residual:
        nodes.append(helper.make_node("Add", [last, "x"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    out_hw = (hw + 2 * pad - k) // stride + 1
    return make_model(nodes, [tensor("x", 1, cin, hw, hw)], [tensor("y", 1, cout, out_hw, out_hw)], inits)


@pytest.mark.parametrize("kwargs", [
    dict(cin=16, cout=32, k=3),                              # regular 3x3, two vectors of channels
    dict(cin=16, cout=16, k=3, residual=True),               # + residual add in the epilogue
    dict(cin=32, cout=32, k=3, stride=2, group=32, act="Clip"),  # depthwise, stride 2, ReLU6
    dict(cin=24, cout=40, k=1, hw=7, act=None),              # 1x1 on a 7x7 map: pixels fused into rows
    dict(cin=3, cout=10, k=3, hw=9),                         # channels no vector divides (10)
    dict(cin=16, cout=48, k=1, hw=10, act=None),             # fused pixels: a tile must not straddle image rows
    dict(cin=96, cout=24, k=1, hw=8, act=None),              # 24 channels: 8-lane vectors on AVX-512 too
], ids=["conv3x3", "residual", "depthwise-s2-relu6", "pointwise-7x7", "odd-channels", "pointwise-10x10",
        "pointwise-24"])
def test_convolutions_match_onnxruntime_and_use_the_register_tile(kwargs):
    model = conv_block(**kwargs)
    x = RNG.standard_normal((1, kwargs["cin"], kwargs.get("hw", 14), kwargs.get("hw", 14))).astype(np.float32)
    rules = assert_matches_onnxruntime(model, {"x": x})
    conv_funcs = [name for name in rules if "conv2d" in name]
    assert len(conv_funcs) == 1, rules  # conv, bias, activation and residual fused into one function
    assert rules[conv_funcs[0]] == ("DepthwiseConv" if kwargs.get("group", 1) > 1 else "TiledReduction")


def test_matmul_gemm_pool_softmax_match_onnxruntime():
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "w2"], ["m"]),
        helper.make_node("Softmax", ["m"], ["y"], axis=-1),
    ]
    model = make_model(nodes, [tensor("x", 1, 64, 8, 8)], [tensor("y", 1, 1001)],
                       [weight("w1", 100, 64), weight("b1", 100), weight("w2", 100, 1001)])
    x = RNG.standard_normal((1, 64, 8, 8)).astype(np.float32)
    rules = assert_matches_onnxruntime(model, {"x": x})
    assert None not in rules.values(), rules
    assert [r for n, r in rules.items() if "matmul" in n] == ["TiledReduction", "TiledReduction"], rules


def test_batched_matmul_layernorm_softmax_match_onnxruntime():
    """The transformer pieces: [1, seq, d] x [d, d] matmuls, attention scores, softmax, layer norm."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["a"], axis=-1),
        helper.make_node("MatMul", ["a", "x"], ["o"]),
        helper.make_node("LayerNormalization", ["o", "gamma", "beta"], ["y"], axis=-1),
    ]
    inits = [weight("wq", 48, 48), numpy_helper.from_array(np.ones(48, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(48, np.float32), "beta")]
    model = make_model(nodes, [tensor("x", 1, 20, 48)], [tensor("y", 1, 20, 48)], inits)
    x = RNG.standard_normal((1, 20, 48)).astype(np.float32)
    rules = assert_matches_onnxruntime(model, {"x": x})
    assert None not in rules.values(), rules


@pytest.mark.parametrize("row", [64, 256])
def test_softmax_rows_reduce_in_vector_partials(row):
    """[1, 4, 32, row] attention scores: the row max and sum each run as one vector of partial results
    (blocks `*_rf`, vectorized), then across its lanes; one scalar accumulator was a chain of
    dependent operations (MiniLM float 23 -> 19 ms). 256 = 16 x 16: the partials' reduction loop has
    as many iterations as the vector has lanes."""
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [tensor("x", 1, 4, 32, row)],
                       [tensor("y", 1, 4, 32, row)], [])
    x = (RNG.standard_normal((1, 4, 32, row)) * 4).astype(np.float32)
    rules = assert_matches_onnxruntime(model, {"x": x})
    assert list(rules.values()) == ["RowReduction"], rules
    specs, _ = input_specs(model, None, "test")
    script = pipeline.lower(import_relax(model, specs, "test"), targets.resolve("x86").tvm_target()).script()
    assert script.count("_rf\")") == 2, script
    lanes = 16 if "T.vectorized(T.int64(16))" in script else 8
    for block in ("T_softmax_maxelem_rf", "T_softmax_expsum_rf"):
        header = script[:script.index(f'T.sblock("{block}")')].rsplit("for ", 2)
        assert f"T.vectorized(T.int64({lanes}))" in header[-1], header[-1]


def test_long_reduction_matmul_splits_the_reduction():
    """128 rows x K=1536 (MiniLM's FFN) overflows L2: the reduction is blocked, the epilogue separate."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [tensor("x", 1, 128, 1536)], [tensor("y", 1, 128, 48)],
                       [weight("w", 1536, 48, scale=0.05), weight("b", 48)])
    x = RNG.standard_normal((1, 128, 1536)).astype(np.float32)
    rules = assert_matches_onnxruntime(model, {"x": x})
    assert list(rules.values()) == ["TiledReduction"]
    specs, _ = input_specs(model, None, "test")
    target = targets.resolve("x86").tvm_target()
    script = pipeline.lower(import_relax(model, specs, "test"), target).script()
    assert "T.int64(256)" in script  # the reduction block length


def test_reduction_blocks_over_large_weights_stream_every_pixel_past_each_weight_block():
    """4 MB of weights (past `LARGE_WEIGHT_BYTES`) on 256 rows x K=1024 (blocked reduction): the
    weight block loop goes outside the rows, accumulating in the output across reduction blocks."""
    from graphpress.backends.cpu.schedules.tiled import LARGE_WEIGHT_BYTES

    assert 1024 * 1024 * 4 >= LARGE_WEIGHT_BYTES
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    model = make_model(nodes, [tensor("x", 1, 256, 1024)], [tensor("y", 1, 256, 1024)], [weight("w", 1024, 1024, scale=0.03)])
    rules = assert_matches_onnxruntime(model, {"x": RNG.standard_normal((1, 256, 1024)).astype(np.float32)})
    assert [r for n, r in rules.items() if "matmul" in n] == ["TiledReduction"], rules


def test_aarch64_target_lowers_with_neon_vectors():
    """Schedules are parameterized by the target: NEON (4 lanes) lowers and builds for aarch64."""
    from tvm import relax

    model = conv_block(cin=8, cout=12, k=3, hw=6)
    specs, _ = input_specs(model, None, "test")
    target = targets.resolve("aarch64").tvm_target()
    lowered = pipeline.lower(import_relax(model, specs, "test"), target)
    scheduled = [f for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert scheduled and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in scheduled)
    assert "T.vectorized(T.int64(4))" in lowered.script()  # one NEON vector of 12 % 8 != 0 channels
    relax.build(lowered, target=target)


def test_onnx_sum_keeps_the_channels_last_layout():
    """TVM imports Sum as stack + sum (rank 5), on which its layout conversion gave up for the whole
    module (light ResNet-50: NCHW convolutions, 30x slower); as Adds it converts and fuses."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Conv", ["x", "w2"], ["b"], kernel_shape=[1, 1]),
             helper.make_node("Sum", ["a", "b", "x"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    model = make_model(nodes, [tensor("x", 1, 16, 8, 8)], [tensor("y", 1, 16, 8, 8)],
                       [weight("w1", 16, 16, 3, 3), weight("w2", 16, 16, 1, 1)])
    rules = assert_matches_onnxruntime(model, {"x": RNG.standard_normal((1, 16, 8, 8)).astype(np.float32)})
    assert sorted(r for n, r in rules.items() if "conv2d" in n) == ["TiledReduction"] * 2, rules
    specs, _ = input_specs(model, None, "test")
    prepared = pipeline.prepare(import_relax(model, specs, "test"), targets.resolve("x86").tvm_target())
    assert "NCHW" not in prepared.script() and "stack" not in prepared.script()


@pytest.mark.parametrize("op", ["conv", "matmul"])
def test_odd_output_channels_are_padded_to_whole_vectors(op):
    """70 output channels (no 4-lane vector divides them): computed as 80, sliced back, fused."""
    if op == "conv":
        model = conv_block(cin=16, cout=70, k=1, hw=6)
        feeds = {"x": RNG.standard_normal((1, 16, 6, 6)).astype(np.float32)}
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
        model = make_model(nodes, [tensor("x", 1, 5, 32)], [tensor("y", 1, 5, 70)], [weight("w", 32, 70), weight("b", 70)])
        feeds = {"x": RNG.standard_normal((1, 5, 32)).astype(np.float32)}
    rules = assert_matches_onnxruntime(model, feeds)
    fused = [name for name in rules if "conv2d" in name or "matmul" in name]
    assert len(fused) == 1 and "strided_slice" in fused[0] and rules[fused[0]] == "TiledReduction", rules
    specs, _ = input_specs(model, None, "test")
    script = pipeline.prepare(import_relax(model, specs, "test"), targets.resolve("x86").tvm_target()).script()
    assert "T.int64(80)" in script


def test_avx512_tiles_take_half_vectors_when_whole_ones_do_not_divide_the_channels():
    """24 output channels on AVX-512: three 8-lane vectors, not one 24-lane vector (which LLVM split
    and spilled: MobileNetV2's 24-channel projections ran 5x slower than on AVX2)."""
    from graphpress.backends.cpu.schedules.tiled import channel_lanes

    assert [channel_lanes(c, 16) for c in (32, 24, 40, 12, 10)] == [16, 8, 8, 4, 16]
    assert [channel_lanes(c, 8) for c in (24, 12, 10)] == [8, 4, 8]
    model = conv_block(cin=96, cout=24, k=1, hw=8, act=None)
    specs, _ = input_specs(model, None, "test")
    target = targets.resolve(target_json={"kind": "llvm", "mcpu": "znver4"}).tvm_target()
    script = pipeline.lower(import_relax(model, specs, "test"), target).script()
    assert "T.vectorized(T.int64(8))" in script and "T.vectorized(T.int64(24))" not in script


def _panel_cases():
    """(model, input shape, the packed weight's shape) per kind of layer that takes panels on AVX-512."""
    gemm = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [tensor("x", 3, 40)],
                      [tensor("y", 3, 64)], [weight("w", 64, 40), weight("b", 64)])
    matmul = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", 1, 9, 24)],
                        [tensor("y", 1, 9, 48)], [weight("w", 24, 48)])
    return {
        "pointwise-7x7": (conv_block(cin=64, cout=64, k=1, hw=7, act=None), (1, 64, 7, 7), (4, 1, 1, 64, 16)),
        "conv3x3-s2": (conv_block(cin=16, cout=32, k=3, stride=2, hw=9), (1, 16, 9, 9), (2, 3, 3, 16, 16)),
        "conv3x3-24": (conv_block(cin=8, cout=24, k=3, hw=6), (1, 8, 6, 6), (3, 3, 3, 8, 8)),
        "gemm-transB": (gemm, (3, 40), (4, 40, 16)),
        "matmul-3d": (matmul, (1, 9, 24), (3, 24, 16)),
    }


@pytest.mark.parametrize("case", ["pointwise-7x7", "conv3x3-s2", "conv3x3-24", "gemm-transB", "matmul-3d"])
def test_constant_weights_are_read_from_panels(case):
    """Float convolutions and weight matmuls read [O/V, ..., V] weight panels, V the tile's vector
    (16 lanes on AVX-512, 8 for 24 channels), still fused with their epilogue and register-tiled;
    results as onnxruntime's."""
    model, shape, panels = _panel_cases()[case]
    target = targets.resolve(target_json={"kind": "llvm", "mcpu": "skylake-avx512"}).tvm_target()
    specs, _ = input_specs(model, None, "test")
    script = pipeline.prepare(import_relax(model, specs, "test"), target).script()
    printed = ", ".join(f"T.int64({d})" for d in panels)
    assert f"T.Buffer(({printed}), \"float32\")" in script, script
    rules = assert_matches_onnxruntime(model, {"x": RNG.standard_normal(shape).astype(np.float32)})
    assert [r for n, r in rules.items() if "panels" in n] == ["TiledReduction"], rules


def test_panels_hold_each_output_channel_at_its_block_and_lane():
    from graphpress.backends.cpu.panels import to_panels

    w = RNG.standard_normal((3, 3, 5, 32)).astype(np.float32)
    p = to_panels(w, 8)
    assert p.shape == (4, 3, 3, 5, 8) and p.flags.c_contiguous
    for o in range(32):
        np.testing.assert_array_equal(p[o // 8, ..., o % 8], w[..., o])


@pytest.mark.skipif(not (SHARED / "models" / "resnet8_cifar10.onnx").is_file(), reason="../shared/models absent")
def test_resnet8_matches_onnxruntime():
    model = onnx.load(str(SHARED / "models" / "resnet8_cifar10.onnx"))
    x = RNG.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    rules = assert_matches_onnxruntime(model, {"input_1": x})
    assert None not in rules.values(), rules
    assert sum(r == "TiledReduction" for r in rules.values()) >= 10  # 9 convs + the dense layer


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "mobilenet_v2_1.0_224.onnx").is_file(), reason="../shared/models absent")
def test_mobilenet_v2_matches_onnxruntime():
    model = onnx.load(str(SHARED / "models" / "mobilenet_v2_1.0_224.onnx"))
    x = RNG.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    rules = assert_matches_onnxruntime(model, {"input_f": x})
    assert None not in rules.values(), rules


@pytest.mark.parametrize("fused", [(3, 8, 8), (1, 14, 14), (2, 7, 7), (4, 28, 28)])
@pytest.mark.parametrize("lanes, accumulators", [(8, 16), (16, 32), (4, 32)])
def test_register_tiles_never_straddle_rows_or_images(fused, lanes, accumulators):
    """A fused [batch, height, width] tile that straddled images computed the epilogue on a bounding
    box holding pixels of other tiles (AVX-512, batch 3: 24-pixel tiles over 64-pixel images)."""
    from graphpress.backends.cpu.schedules.tiled import register_tile
    pixels = int(np.prod(fused))
    _, rows = register_tile(8, pixels, lanes, accumulators, fused)
    for trailing in (fused[-1], fused[-1] * fused[-2], pixels):
        assert trailing % rows == 0 or rows % trailing == 0, (rows, trailing)


def test_large_elementwise_loops_parallelize_only_an_outer_prefix():
    """A [32, 16, 32, 32] element-wise function: the parallel loop covers the outer axes up to 64
    chunks; fusing every axis cost a div/mod per vector (ResNet-8 int8 at batch 32: 2.7 -> 6.0 ms)."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    from graphpress.backends.cpu.schedules.common import PARALLEL_MIN_CHUNKS
    from graphpress.backends.cpu.schedules.injective import schedule_injective

    shape = (32, 16, 32, 32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
    model = make_model(nodes, [tensor("x", *shape)], [tensor("y", *shape)], [])
    x = RNG.standard_normal(shape).astype(np.float32)
    assert_matches_onnxruntime(model, {"x": x})
    prepared = pipeline.prepare(import_relax(model, input_specs(model, None, "test")[0], "test"),
                                targets.resolve("x86").tvm_target())
    func = next(f for _, f in prepared.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    sch = tvm.s_tir.Schedule(func)
    block = normalize_prim_func(sch)[-1].block_rv
    schedule_injective(sch, block, 16)
    loops = [sch.get(loop) for loop in sch.get_loops(block)]
    kinds = [loop.kind for loop in loops]
    parallel = [int(loop.extent) for loop in loops if loop.kind == tvm.tirx.ForKind.PARALLEL]
    assert len(parallel) == 1 and PARALLEL_MIN_CHUNKS <= parallel[0] <= 32 * 16, (parallel, kinds)
    assert kinds[-1] == tvm.tirx.ForKind.VECTORIZED and len(loops) > 2, kinds
