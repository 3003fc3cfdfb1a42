"""Calibration data for the CLI: .npz, directories of .npy and of images; checks and clear errors."""

import argparse

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

from graphpress.calibration import (ImagePreprocess, add_calibration_options, calibration_from_args,
                                    load_calibration)
from graphpress.errors import GraphpressError
from graphpress.ir import load
from graphpress.passes import PassManager


def _model(inputs):
    """A model whose inputs are `inputs` = [(name, elem type, shape)], each feeding an Identity output."""
    values = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    graph = helper.make_graph(nodes, "g", values, outputs)
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


TEXT = _model([("input_ids", TensorProto.INT64, ["b", 6]), ("mask", TensorProto.INT64, ["b", 6])])
IMAGE_NHWC = _model([("image", TensorProto.FLOAT, ["n", 8, 8, 3])])


def test_npz_batches_are_checked_lazy_and_reiterable(tmp_path):
    ids, mask = np.arange(30).reshape(5, 6), np.ones((5, 6), np.int32)
    np.savez(tmp_path / "c.npz", input_ids=ids, mask=mask)
    data = load_calibration(tmp_path / "c.npz", TEXT, batch_size=2)
    batches = list(data)
    assert len(data) == 3 and [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[2]["mask"].dtype == np.int64  # cast to the model's type
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in data]), ids)  # iterate again
    assert len(list(load_calibration(tmp_path / "c.npz", TEXT, batch_size=2, limit=3))) == 2


@pytest.mark.parametrize("arrays,message", [
    ({"input_ids": np.zeros((2, 6))}, "c.npz: no array for model input 'mask'"),
    ({"input_ids": np.zeros((2, 6), int), "mask": np.zeros((2, 6), int), "x": np.zeros(2)}, "'x' is not a model input"),
    ({"input_ids": np.zeros((2, 5), int), "mask": np.zeros((2, 6), int)}, r"c.npz\[input_ids\]: samples of shape 5"),
    ({"input_ids": np.zeros((2, 6)), "mask": np.zeros((2, 6), int)}, "dtype float64 cannot feed input 'input_ids'"),
    ({"input_ids": np.zeros((2, 6), int), "mask": np.zeros((3, 6), int)}, "different numbers of samples"),
])
def test_npz_mismatches_name_the_file_and_the_problem(tmp_path, arrays, message):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(GraphpressError, match=message):
        load_calibration(tmp_path / "c.npz", TEXT)


def test_npy_directory_is_memory_mapped_and_names_are_sanitized(tmp_path):
    model = _model([("encoder/x:0", TensorProto.FLOAT, [None, 4])])
    np.save(tmp_path / "encoder_x_0.npy", np.random.default_rng(0).standard_normal((7, 4)))
    data = load_calibration(tmp_path, model, batch_size=4)
    first = next(iter(data))
    assert first["encoder/x:0"].shape == (4, 4) and first["encoder/x:0"].dtype == np.float32
    (tmp_path / "encoder_x_0.npy").rename(tmp_path / "other.npy")
    with pytest.raises(GraphpressError, match="no encoder_x_0.npy for model input 'encoder/x:0'.*other.npy"):
        load_calibration(tmp_path, model)


def _images(directory, sizes, mode="RGB"):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(directory / f"img{i}.png")


def test_images_are_resized_laid_out_and_scaled(tmp_path):
    _images(tmp_path, [(10, 12), (8, 8), (20, 5)])
    (batch,) = load_calibration(tmp_path, IMAGE_NHWC, batch_size=3, preprocess=ImagePreprocess(scale="symmetric"))
    x = batch["image"]
    assert x.shape == (3, 8, 8, 3) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    gray = _model([("digits", TensorProto.FLOAT, [None, 1, 6, 6])])
    pre = ImagePreprocess(scale="unit", mean=(0.5,), std=(0.25,))
    (batch,) = load_calibration(tmp_path, gray, batch_size=3, preprocess=pre)
    assert batch["digits"].shape == (3, 1, 6, 6)
    assert batch["digits"].min() >= -2.0 and batch["digits"].max() <= 2.0
    raw = next(iter(load_calibration(tmp_path, IMAGE_NHWC, preprocess=ImagePreprocess(scale="raw"))))
    assert raw["image"].max() > 200  # 0..255 kept
    static = _model([("image", TensorProto.FLOAT, [2, 8, 8, 3])])
    data = load_calibration(tmp_path, static, batch_size=5)
    assert len(data) == 1 and next(iter(data))["image"].shape == (2, 8, 8, 3)  # 3rd image: partial batch


def test_image_errors_are_clear(tmp_path):
    _images(tmp_path, [(8, 8)])
    ambiguous = _model([("x", TensorProto.FLOAT, [None, 4, 5, 6])])
    with pytest.raises(GraphpressError, match="NCHW or NHWC; give --calib-layout"):
        load_calibration(tmp_path, ambiguous)
    with pytest.raises(GraphpressError, match="only a model with one 4-D input"):
        load_calibration(tmp_path, TEXT)
    dynamic = _model([("x", TensorProto.FLOAT, [None, 3, "h", "w"])])
    with pytest.raises(GraphpressError, match="--calib-size"):
        load_calibration(tmp_path, dynamic)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(GraphpressError, match="broken.jpg: not a readable image"):
        list(load_calibration(tmp_path, IMAGE_NHWC))
    with pytest.raises(GraphpressError, match="no such calibration file"):
        load_calibration(tmp_path / "missing.npz", IMAGE_NHWC)
    with pytest.raises(GraphpressError, match="must be .npz"):
        load_calibration(tmp_path / "img0.png", IMAGE_NHWC)


def test_cli_options_build_the_calibration(tmp_path):
    _images(tmp_path, [(16, 16), (9, 9)])
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib")
    add_calibration_options(parser)
    args = parser.parse_args(["--calib", str(tmp_path), "--calib-size", "4x4", "--calib-layout", "nchw",
                              "--calib-scale", "imagenet", "--calib-batch-size", "1"])
    model = _model([("x", TensorProto.FLOAT, [None, 3, None, None])])
    data = calibration_from_args(args, model)
    assert len(data) == 2 and next(iter(data))["x"].shape == (1, 3, 4, 4)
    assert calibration_from_args(parser.parse_args([]), model) is None
    with pytest.raises(GraphpressError, match="--calib-size 'big'"):
        calibration_from_args(parser.parse_args(["--calib", str(tmp_path), "--calib-size", "big"]), model)
    with pytest.raises(GraphpressError, match="--calib-mean has 2 values"):
        list(calibration_from_args(parser.parse_args(["--calib", str(tmp_path), "--calib-mean", "1,2",
                                                      "--calib-layout", "nchw", "--calib-size", "4"]), model))


def test_insert_qdq_calibrates_from_a_loaded_npz(tmp_path):
    from test_qdq import conv_net
    model = conv_net()
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32))
    manager = PassManager("insert-qdq(method=percentile)")
    data = load_calibration(tmp_path / "c.npz", model, batch_size=4)
    assert len(data) == 3  # the model's static batch of 2 wins over batch_size
    manager.run(model, calibration=data)
    assert manager.records[-1].changed and any(n.op == "QuantizeLinear" for n in model.nodes())
