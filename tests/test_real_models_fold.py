"""`fold` on real models: the shared trained models (on real inputs) and the onnx wheel's `data/light`
architectures (weights made by ConstantOfShape, which fold must materialize) keep their outputs within
1e-4 relative of the original."""

from pathlib import Path

import numpy as np
import onnx
import pytest

import graphpress.ir as ir
from benchmarks import realdata
from graphpress.passes import PassManager

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
RTOL = 1e-4
#: node counts before and after onnxslim, measured here (benchmarks/results/fold.json)
SLIM_NODES = {"minilm": (669, 365), "mobilenet_v2": (103, 102)}


def fold_and_compare(model: ir.Model, inputs: list[dict[str, np.ndarray]]) -> ir.Model:
    original = model.copy()
    PassManager("fold").run(model)
    for feed in inputs:
        comparison = ir.compare(original, model, inputs=feed)
        assert comparison.within(RTOL), str(comparison)
    assert len(model.graph.nodes) <= len(original.graph.nodes)
    return model


@pytest.mark.skipif(not realdata.available(), reason=realdata.skip_reason())
@pytest.mark.parametrize("key", ["lenet", "resnet8", pytest.param("mobilenet_v1", marks=pytest.mark.slow),
                                 "mobilenet_v2", "minilm"])
def test_fold_keeps_shared_models_outputs_on_real_inputs(key):
    model = ir.load(realdata.model_path(key))
    before = len(model.graph.nodes)
    folded = fold_and_compare(model, realdata.calibration_batches(key, n=8, batch_size=4))
    if key in SLIM_NODES:  # no more nodes than onnxslim leaves
        original, slim = SLIM_NODES[key]
        assert before == original and len(folded.graph.nodes) <= slim


SMALL_LIGHT = ["resnet50", "inception_v2", "shufflenet", "squeezenet"]
BIG_LIGHT = ["inception_v1", "densenet121",
             "vgg19", "bvlc_alexnet", "zfnet512"]  # the last three: 240-550 MB of weights once materialized


def light_case(name: str):
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx wheel")
    model = ir.load(path)
    inputs = [ir.random_inputs(model, seed=seed) for seed in (0, 1)]
    folded = fold_and_compare(model, inputs)
    assert not list(folded.nodes(op="ConstantOfShape")), "fold left weights un-materialized"
    assert not list(folded.nodes(op="BatchNormalization")) or name == "densenet121"


@pytest.mark.parametrize("name", SMALL_LIGHT)
def test_fold_materializes_light_architectures(name):
    light_case(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG_LIGHT)
def test_fold_materializes_big_light_architectures(name):
    light_case(name)
