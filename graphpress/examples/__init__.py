"""The embedded example graphpress's demo runs on: a small CNN trained on real handwritten digits.

Shipped with the package, so the demo needs no network and no ../shared:

- `digits_cnn.onnx`: a 16x16 digit classifier (Conv+BatchNormalization+Relu blocks, a residual Add, a
  Shape->Gather->Unsqueeze->Concat->Reshape flatten, Dropout, two Gemm), exported the way framework
  exporters write models, so every graphpress pass has work on it. Input `input` [N,1,16,16] float32,
  output `logits` [N,10].
- `digits.npz`: its data, the UCI "Optical Recognition of Handwritten Digits" test set as scikit-learn ships
  it (`sklearn.datasets.load_digits`, 1797 images of 8x8 pixels valued 0..16, CC BY 4.0), split by a fixed
  seed into 500 held-out evaluation images (never seen in training) and 1297 training images, of which 128
  are shipped as the calibration subset.

Both files are written by `python -m graphpress.examples.make_digits_cnn`, which documents the training.

    calib, eval_inputs, eval_labels = example_data()
    top1 = evaluate_top1(example_model_path())        # 0.986 on the 500 held-out images (see the generator)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GraphpressError

EXAMPLES_DIR = Path(__file__).resolve().parent
MODEL_FILE = "digits_cnn.onnx"
DATA_FILE = "digits.npz"
INPUT_NAME = "input"

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def preprocess(images: np.ndarray) -> np.ndarray:
    """8x8 digit images with pixels 0..16 -> the model's input: [N, 1, 16, 16] float32 in [-1, 1].

    Each pixel is repeated 2x2 (nearest-neighbour upsampling) so the convolutions have room to work.
    """
    scaled = np.asarray(images, np.float32) / 8.0 - 1.0
    return scaled.repeat(2, axis=1).repeat(2, axis=2)[:, None]


def example_model_path() -> Path:
    """The shipped example model, `digits_cnn.onnx`."""
    return _shipped(MODEL_FILE)


def example_data(batch_size: int = 16, directory: Path | None = None
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray], np.ndarray]:
    """The shipped data: (calibration batches, held-out evaluation inputs, their labels).

    Calibration is 128 training images in batches of `batch_size` ({"input": [B,1,16,16]} dicts); the
    evaluation inputs are all 500 held-out images at once. `directory` reads a regenerated copy instead.
    """
    with np.load(_shipped(DATA_FILE, directory)) as data:
        calib = preprocess(data["calib_images"])
        eval_inputs = {INPUT_NAME: preprocess(data["eval_images"])}
        eval_labels = data["eval_labels"].astype(np.int64)
    batches = [{INPUT_NAME: calib[i:i + batch_size]} for i in range(0, len(calib), batch_size)]
    return batches, eval_inputs, eval_labels


def evaluate_top1(runner_or_model, directory: Path | None = None) -> float:
    """Top-1 accuracy on the 500 held-out digits (of the shipped data, or of `directory`'s copy).

    `runner_or_model` is a path, an `onnx.ModelProto`, a graphpress `Model`, a runnable (`.run(inputs)`
    returning the output dict, as `graphpress compress --eval` passes it), or a function taking the input
    dict and returning the logits.
    """
    if hasattr(runner_or_model, "run") and not isinstance(runner_or_model, (str, Path)):
        run = lambda feed: next(iter(runner_or_model.run(feed).values()))  # noqa: E731
    elif callable(runner_or_model):
        run = runner_or_model
    else:
        run = _ort_runner(runner_or_model)
    _, eval_inputs, labels = example_data(directory=directory)
    logits = np.asarray(run(eval_inputs))
    return float(np.mean(logits.reshape(len(labels), -1).argmax(1) == labels))


def _ort_runner(model) -> Runner:
    """Run a path / ModelProto / graphpress Model in onnxruntime; returns the first output."""
    import onnx

    from ..ir import Model, session
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    if not isinstance(model, (Model, onnx.ModelProto)):
        raise GraphpressError(f"evaluate_top1 needs a model path, ModelProto, Model or runner, "
                              f"got {type(model).__name__}")
    sess = session(model, optimize=True)
    return lambda feed: sess.run(None, feed)[0]


def _shipped(name: str, directory: Path | None = None) -> Path:
    path = (directory or EXAMPLES_DIR) / name
    if not path.is_file():
        raise GraphpressError(f"{path} is missing; regenerate it with `python -m graphpress.examples.make_digits_cnn`")
    return path
