"""`svd-split` on the real models in ../shared/models, measured on their real data (benchmarks/realdata)."""

import onnx
import pytest

from benchmarks import realdata
from graphpress import ir
from graphpress.passes import PassContext, PassManager

pytestmark = pytest.mark.skipif(not realdata.available(), reason=realdata.skip_reason())


def split(key, pipeline, calibration):
    model = ir.load(realdata.model_path(key))
    ctx = PassContext(calibration=calibration)
    PassManager(pipeline).run(model, ctx)
    onnx.checker.check_model(model.to_onnx())
    return model, ctx.reports["svd-split"]


def test_lenet_whitened_keeps_accuracy_where_plain_svd_loses_it():
    calibration = realdata.calibration_batches("lenet", 50, 25)
    pipeline = "svd-split(target-params=0.1,budget-of=layers,method={})"
    accuracy = {}
    for method in ("plain", "whitened"):
        model, report = split("lenet", pipeline.format(method), calibration)
        assert report["params_after"] <= 0.1 * report["params_before"]
        accuracy[method] = realdata.evaluate("lenet", model, limit=1000)
    float_accuracy = realdata.evaluate("lenet", realdata.model_path("lenet"), limit=1000)
    assert accuracy["whitened"] > accuracy["plain"] + 0.03, accuracy
    assert accuracy["whitened"] > float_accuracy - 0.06, (accuracy, float_accuracy)


@pytest.mark.slow
def test_minilm_quarter_of_matmul_weights_removed():
    """Calibration on held-out STS-B pairs, Spearman on the others (float 0.8188 there). Whitened splitting
    measured 0.8045; with sequential refit of every layer 0.8191 (benchmarks/results/svd_minilm.json)."""
    pairs = realdata.stsb_holdout()
    model, report = split("minilm", "svd-split(target-params=0.75,budget-of=layers,ops=[MatMul],sequential=true,"
                                    "refit-unsplit=true)", realdata.stsb_sentences(pairs))
    assert report["params_after"] <= 0.75 * report["params_before"]
    assert len(report["layers"]) == 36
    float_score = realdata.evaluate("minilm", realdata.model_path("minilm"), skip=pairs)
    assert realdata.evaluate("minilm", model, skip=pairs) >= float_score - 0.005


@pytest.mark.slow
def test_mobilenet_v2_split_stays_close_to_float():
    calibration = realdata.calibration_batches("mobilenet_v2", 50, 10)
    model, report = split("mobilenet_v2", "svd-split(target-params=0.9,budget-of=layers)", calibration)
    assert report["params_after"] <= 0.9 * report["params_before"]
    outputs = ir.compare(ir.load(realdata.model_path("mobilenet_v2")), model, calibration[0])
    assert outputs.max_abs < 0.5, str(outputs)
