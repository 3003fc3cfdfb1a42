"""insert-qdq on the real models of ../shared/models with their real data (MODELS.md)."""

import pytest

from benchmarks import realdata
from graphpress.ir import load, model_size_bytes
from graphpress.passes import PassManager

pytestmark = pytest.mark.skipif(not realdata.available(), reason=realdata.skip_reason())


def _quantize(key, pipeline, samples, batch_size=10):
    model = load(realdata.model_path(key))
    quantized = PassManager(pipeline).run(model.copy(),
                                          calibration=realdata.calibration_batches(key, samples, batch_size))
    return model, quantized


def test_resnet8_int8_keeps_accuracy_and_shrinks():
    model, quantized = _quantize("resnet8", "insert-qdq", samples=40)
    float_top1 = realdata.evaluate("resnet8", model, limit=600)
    int8_top1 = realdata.evaluate("resnet8", quantized, limit=600)  # onnxruntime with its int8 kernels
    assert int8_top1 >= float_top1 - 0.02
    assert model_size_bytes(model) / model_size_bytes(quantized) > 2.8  # 78k params: names weigh in


def test_lenet_opset11_int8_keeps_accuracy():
    model, quantized = _quantize("lenet", "insert-qdq(method=percentile)", samples=40)
    assert quantized.opset == 13
    assert realdata.evaluate("lenet", quantized, limit=1000) >= realdata.evaluate("lenet", model, limit=1000) - 0.01
    assert model_size_bytes(model) / model_size_bytes(quantized) > 3.5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["minmax", "entropy", "mse", "percentile"])
def test_mobilenet_v2_int8_matches_float_in_reference_execution(method):
    import onnxruntime as ort
    model, quantized = _quantize("mobilenet_v2", f"insert-qdq(method={method})", samples=100)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact QDQ semantics
    sess = ort.InferenceSession(quantized.to_onnx().SerializeToString(), options)
    top1 = realdata.evaluate("mobilenet_v2", lambda feed: sess.run(None, feed)[0])
    assert top1 >= 0.85
    assert model_size_bytes(model) / model_size_bytes(quantized) >= 3.5


MINILM_RECIPE = "smooth-quant(alpha=0.75),insert-qdq(ops=[MatMul,Gather],outputs=false,activation-matmul=false)"


@pytest.mark.slow
def test_minilm_static_int8_recipe_keeps_spearman():
    model, quantized = _quantize("minilm", MINILM_RECIPE, samples=100)
    assert model_size_bytes(model) / model_size_bytes(quantized) >= 3.5
    float_score = realdata.evaluate("minilm", model, limit=300)
    assert realdata.evaluate("minilm", quantized, limit=300) >= float_score - 0.005
