"""The embedded example (graphpress/examples): the shipped digits CNN, its data, its trainer and exporter."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphpress import ir
from graphpress.errors import GraphpressError
from graphpress.examples import (DATA_FILE, MODEL_FILE, example_data, example_model_path, evaluate_top1,
                                 make_digits_cnn)
from graphpress.examples.make_digits_cnn import DigitsCNN, export
from graphpress.examples.numpy_cnn import softmax_cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def stated_top1() -> float:
    """The held-out top-1 the generator's docstring states."""
    return float(re.search(r"top-1 (0\.\d+)\s+\((\d+)/500\)", make_digits_cnn.__doc__).group(1))


def architecture(model: onnx.ModelProto) -> tuple:
    """What must not change between the generator and the shipped file: nodes, weights' names and shapes."""
    return ([(n.op_type, n.name, tuple(n.input)) for n in model.graph.node],
            sorted((t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer),
            [(v.name, str(v.type)) for v in (*model.graph.input, *model.graph.output)])


def untrained_net(seed: int = 0) -> DigitsCNN:
    """A DigitsCNN with random weights and non-trivial BatchNormalization statistics."""
    rng = np.random.default_rng(seed)
    net = DigitsCNN(rng)
    for bn in (net.bn1, net.bn2, net.bn3):
        channels = len(bn.running_mean)
        bn.running_mean = rng.normal(0, 0.5, channels).astype(np.float32)
        bn.running_var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        bn.params["weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        bn.params["bias"] = rng.normal(0, 0.2, channels).astype(np.float32)
    return net


def test_shipped_model_is_valid_onnx_laid_out_like_an_exporter_writes_it():
    model = onnx.load(example_model_path())
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 3 and ops.count("Conv") == 3 and ops.count("Gemm") == 2
    for op in ("Dropout", "Add", "MaxPool", "GlobalAveragePool", "Shape", "Gather", "Unsqueeze", "Concat",
               "Reshape"):
        assert op in ops, op
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == \
        ["N", 1, 16, 16]
    assert out.name == "logits" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
    sizes = example_model_path().stat().st_size + (example_model_path().parent / DATA_FILE).stat().st_size
    assert sizes < 512 * 1024


def test_shipped_model_reaches_the_stated_held_out_accuracy():
    top1 = evaluate_top1(example_model_path())
    print(f"digits CNN held-out top-1 in onnxruntime: {top1:.4f} (stated {stated_top1():.4f})")
    assert top1 >= 0.95
    assert abs(top1 - stated_top1()) <= 1 / 500  # one borderline image may flip with another onnxruntime build


def test_evaluate_top1_takes_a_path_a_model_or_a_runner():
    path = example_model_path()
    by_path = evaluate_top1(path)
    assert evaluate_top1(ir.load(path)) == by_path
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert evaluate_top1(lambda feed: sess.run(None, feed)[0]) == by_path
    _, _, labels = example_data()
    always_seven = evaluate_top1(lambda feed: np.eye(10)[np.full(len(feed["input"]), 7)])
    assert always_seven == pytest.approx(np.mean(labels == 7)) and always_seven < 0.2
    with pytest.raises(GraphpressError, match="evaluate_top1 needs"):
        evaluate_top1(42)


def test_example_data_is_a_disjoint_calibration_and_held_out_split():
    calib, eval_inputs, labels = example_data(batch_size=16)
    assert len(calib) == 8 and all(b["input"].shape == (16, 1, 16, 16) for b in calib)
    assert eval_inputs["input"].shape == (500, 1, 16, 16) and eval_inputs["input"].dtype == np.float32
    assert labels.shape == (500,) and set(labels.tolist()) == set(range(10))
    assert -1 <= eval_inputs["input"].min() and eval_inputs["input"].max() <= 1
    with np.load(example_model_path().parent / DATA_FILE) as data:
        calib_index, eval_index = data["calib_index"], data["eval_index"]
    assert not set(calib_index.tolist()) & set(eval_index.tolist())
    train_index, expected_calib, expected_eval = make_digits_cnn.split(1797)
    assert np.array_equal(calib_index, expected_calib) and np.array_equal(eval_index, expected_eval)
    assert not set(train_index.tolist()) & set(eval_index.tolist())


def test_shipped_data_is_sklearn_load_digits_at_the_stated_indices():
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (the dev extra) checks the data's origin")
    digits = datasets.load_digits()
    with np.load(example_model_path().parent / DATA_FILE) as data:
        for part in ("calib", "eval"):
            index = data[f"{part}_index"]
            assert np.array_equal(data[f"{part}_images"], digits.images[index].astype(np.uint8))
            assert np.array_equal(data[f"{part}_labels"], digits.target[index])


def test_exported_onnx_computes_what_the_numpy_network_computes():
    net = untrained_net()
    x = np.random.default_rng(1).uniform(-1, 1, (5, 1, 16, 16)).astype(np.float32)
    expected = net.forward(x, train=False)
    (actual,) = ort.InferenceSession(export(net).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_generator_architecture_matches_the_shipped_model():
    assert architecture(export(untrained_net())) == architecture(onnx.load(example_model_path()))


def test_numpy_trainer_gradients_match_finite_differences():
    """Backpropagation through every layer (in float64) agrees with central differences of the loss."""
    rng = np.random.default_rng(2)
    net = untrained_net(3)
    net.dropout.rate = 0.0
    for layer in net.layers():
        layer.params.update({name: p.astype(np.float64) for name, p in layer.params.items()})
    x = rng.uniform(-1, 1, (4, 1, 16, 16))
    y = np.array([0, 3, 5, 9])
    _, grad = softmax_cross_entropy(net.forward(x, train=True), y)
    net.backward(grad)
    for layer in net.layers():
        for name, param in layer.params.items():
            direction = rng.standard_normal(param.shape)
            direction *= max(float(np.linalg.norm(param)), 1.0) / np.linalg.norm(direction)
            analytic = float(np.sum(layer.grads[name] * direction))
            original, step = param.copy(), 1e-6
            losses = []
            for sign in (1, -1):
                param[...] = original + sign * step * direction
                losses.append(softmax_cross_entropy(net.forward(x, train=True), y)[0])
            param[...] = original
            numeric = (losses[0] - losses[1]) / (2 * step)
            assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-7), (type(layer).__name__, name)


@pytest.mark.slow
def test_generator_reproduces_the_shipped_files(tmp_path):
    pytest.importorskip("sklearn", reason="the generator needs scikit-learn (the dev extra)")
    numbers = make_digits_cnn.generate(tmp_path, progress=False)
    print(f"regenerated: {numbers}")
    assert architecture(onnx.load(tmp_path / MODEL_FILE)) == architecture(onnx.load(example_model_path()))
    with np.load(tmp_path / DATA_FILE) as fresh, np.load(example_model_path().parent / DATA_FILE) as shipped:
        assert sorted(fresh.files) == sorted(shipped.files)
        for key in fresh.files:
            assert np.array_equal(fresh[key], shipped[key]), key
    assert numbers["onnx_top1"] >= 0.95 and abs(numbers["onnx_top1"] - numbers["numpy_top1"]) <= 1 / 500


@pytest.mark.slow
def test_wheel_ships_the_example_files(tmp_path):
    """`pip install .` gets the model and data: build the wheel (as pip does, isolated) from a copy of the tree."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "graphpress", source / "graphpress", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                   check=True)
    (wheel,) = tmp_path.glob("graphpress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert f"graphpress/examples/{MODEL_FILE}" in names and f"graphpress/examples/{DATA_FILE}" in names
