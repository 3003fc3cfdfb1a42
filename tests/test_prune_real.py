"""prune-channels on real architectures: the onnx wheel's `data/light` models (weights materialized by
`fold`) and the trained models in ../shared/models. At 30% every one must stay a valid graph that runs
with the same output shapes, and its MACs must fall by what the prunable groups allow."""

from pathlib import Path

import numpy as np
import onnx
import pytest

import graphpress.ir as ir
from benchmarks import realdata
from graphpress.ir.cost import macs
from graphpress.passes import PassContext, PassManager

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def load_light(name: str) -> ir.Model:
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx wheel")
    proto = onnx.load(path)
    # IR 3 lists initializers as graph inputs; once they become plain initializers the model must say IR >= 4
    proto.ir_version = max(proto.ir_version, 4)
    model = ir.load(proto)
    PassManager("fold").run(model)
    return model


def prune_and_check(model: ir.Model, pipeline: str, calibration=None):
    """Prune a copy; the result must pass the full onnx checker and run with unchanged output shapes."""
    ctx = PassContext(calibration=calibration)
    pruned = PassManager(pipeline).run(model.copy(), ctx)
    onnx.checker.check_model(pruned.to_onnx(), full_check=True)
    inputs = ir.random_inputs(model) if calibration is None else calibration[0]
    before, after = ir.run(model, inputs), ir.run(pruned, inputs)
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert all(np.isfinite(v).all() for v in after.values())
    return pruned, ctx.reports["prune-channels"]


# MACs kept at ratio 0.3: about 0.7^2 for layers pruned on both sides, more where groups are frozen
LIGHT_CASES = {
    "squeezenet": 0.62, "resnet50": 0.55, "inception_v1": 0.65,
    "inception_v2": 0.55, "densenet121": 0.55, "vgg19": 0.55,
    "bvlc_alexnet": 0.95, "zfnet512": 0.75,  # LRN (channel-window normalization) freezes the first layers
}
SLOW_LIGHT = {"resnet50", "inception_v2", "densenet121", "vgg19", "bvlc_alexnet", "zfnet512"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_LIGHT else n
                                  for n in LIGHT_CASES])
def test_light_architectures_prune_at_30_percent(name):
    model = load_light(name)
    pruned, report = prune_and_check(model, "prune-channels(ratio=0.3)")
    kept = macs(pruned).total / macs(model).total
    assert kept <= LIGHT_CASES[name], f"{name}: {kept:.3f} of the MACs kept"
    assert report.macs_after == macs(pruned).total
    assert all(g.frozen for g in report.groups if g.channels_after == g.channels_before and g.channels_before > 3)


def test_shufflenet_channel_shuffle_freezes_with_reasons():
    """ShuffleNet's grouped 1x1 convs read shuffled channels: no group can be pruned (reported), and the
    pass must leave the model valid and unchanged."""
    model = load_light("shufflenet")
    pruned, report = prune_and_check(model, "prune-channels(ratio=0.3)")
    assert macs(pruned).total == macs(model).total
    assert report.groups and all(g.frozen for g in report.groups)
    reasons = " ".join(g.frozen for g in report.groups)
    assert "grouped Conv" in reasons or "depthwise Conv" in reasons


needs_shared = pytest.mark.skipif(not realdata.available(), reason=realdata.skip_reason())


@needs_shared
@pytest.mark.parametrize("key,most", [("lenet", 0.6), ("resnet8", 0.6),
                                      pytest.param("mobilenet_v2", 0.6, marks=pytest.mark.slow),
                                      pytest.param("mobilenet_v1", 0.6, marks=pytest.mark.slow)])
def test_shared_models_prune_at_30_percent(key, most):
    model = ir.load(realdata.model_path(key))
    calibration = realdata.calibration_batches(key, n=8, batch_size=4)
    pruned, report = prune_and_check(model, "prune-channels(ratio=0.3)", calibration)
    assert macs(pruned).total <= most * macs(model).total
    assert report.reconstruction and all(f.error_after <= f.error_before for f in report.reconstruction)


@needs_shared
def test_resnet8_nhwc_groups_reach_the_dense_layer():
    """The TF-converted ResNet-8 (NHWC input, one Transpose, flatten into MatMul): the last stage's
    residual group must be prunable through the Reshape into the classifier."""
    model = ir.load(realdata.model_path("resnet8"))
    pruned, report = prune_and_check(model, "prune-channels(ratio=0.3,reconstruct=false)")
    dense = next(n for n in pruned.graph.nodes if n.op == "MatMul")
    assert pruned.constant_value(dense.inputs[1]).shape[0] < 64
    assert [g.name for g in report.groups if g.frozen] == ["model/dense/MatMul;model/dense/BiasAdd"]


@needs_shared
@pytest.mark.parametrize("key,target", [("resnet8", 0.7), pytest.param("mobilenet_v2", 0.8, marks=pytest.mark.slow)])
def test_scope_blocks_keeps_residual_streams_and_bottlenecks_whole(key, target):
    """scope=blocks under a MACs target: only layers whose outputs pass an activation inside a block lose
    channels (ResNet-8's first conv of each block, MobileNetV2's expand convs and its last 1x1); every
    layer feeding a residual Add or a linear bottleneck keeps its width."""
    model = ir.load(realdata.model_path(key))
    pruned, report = prune_and_check(model, f"prune-channels(target-macs={target},scope=blocks,reconstruct=false)")
    assert macs(pruned).total <= target * macs(model).total
    widths = {n.name: pruned.constant_value(n.inputs[1]).shape[0] for n in pruned.graph.nodes if n.op == "Conv"}
    original = {n.name: model.constant_value(n.inputs[1]).shape[0] for n in model.graph.nodes if n.op == "Conv"}
    linear = [name for name in original if "Relu" not in name and "Conv2d_1c" not in name]  # TF names tell
    assert linear and all(widths[name] == original[name] for name in linear)
    assert any(widths[name] < original[name] for name in original if name not in linear)
    frozen = " ".join(g.frozen or "" for g in report.groups)
    assert "residual stream" in frozen
