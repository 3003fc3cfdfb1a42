"""The real models in ../shared/models and the data that measures them, for benchmarks and tests.

One place knows each model's input preprocessing, its calibration split and its metric (MODELS.md):

    batches = calibration_batches("mobilenet_v2", n=100)          # every 10th ImageNet image from index 5
    top1 = evaluate("mobilenet_v2", "model_int8.onnx")             # on all 1000 images

Calibration and evaluation follow shared/data/README.md: calibration on a fixed subset, the metric on all
samples. MiniLM calibrates on the first sentence of every 13th STS-B test pair (there is no dev split here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@dataclass(frozen=True)
class RealModel:
    key: str
    file: str
    metric: str
    float_metric: float  # as stated in MODELS.md


MODELS = {
    "mobilenet_v2": RealModel("mobilenet_v2", "mobilenet_v2_1.0_224.onnx", "top-1", 0.871),
    "mobilenet_v1": RealModel("mobilenet_v1", "mobilenet_v1_0.25_128.onnx", "top-1", 0.424),
    "resnet8": RealModel("resnet8", "resnet8_cifar10.onnx", "top-1", 0.764),
    "lenet": RealModel("lenet", "lenet_mnist.onnx", "accuracy", 0.9787),
    "minilm": RealModel("minilm", "minilm_l6_v2.onnx", "spearman", 0.8203),
}


def available() -> bool:
    """True when ../shared (models and data) sits beside the project."""
    return (SHARED / "models").is_dir() and (SHARED / "data").is_dir()


def skip_reason() -> str:
    return f"real models not found at {SHARED} (clone the project beside shared/ to run this)"


def model_path(key: str) -> Path:
    return SHARED / "models" / MODELS[key].file


# ---- raw data ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _imagenet() -> tuple[np.ndarray, np.ndarray]:
    """The 1000 ImageNet samples as uint8 [1000,224,224,3] and their class indices."""
    from PIL import Image
    files = sorted((SHARED / "data" / "imagenet224").glob("*.jpg"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([int(f.name[:4]) for f in files])
    return images, labels


@functools.lru_cache(maxsize=None)
def _imagenet128() -> np.ndarray:
    from PIL import Image
    images, _ = _imagenet()
    return np.stack([np.asarray(Image.fromarray(im).resize((128, 128), Image.BILINEAR)) for im in images])


@functools.lru_cache(maxsize=None)
def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(SHARED / "data" / name) as data:
        return {k: data[k] for k in data.files}


def _inputs_and_labels(key: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All evaluation inputs (preprocessed, float32) and labels for an image model."""
    if key == "mobilenet_v2":
        images, labels = _imagenet()
        return {"input_f": (images.astype(np.float32) / 127.5 - 1)}, labels
    if key == "mobilenet_v1":
        _, labels = _imagenet()
        return {_input_name(key): (_imagenet128().astype(np.float32) / 127.5 - 1)}, labels
    if key == "resnet8":
        data = _npz("cifar10_test_2000.npz")
        return {"input_1": data["images"].astype(np.float32)}, data["labels"]
    if key == "lenet":
        data = _npz("mnist_t10k.npz")
        x = ((data["images"].astype(np.float32) / 255 - 0.1307) / 0.3081)[:, None]
        return {"input": x}, data["labels"]
    raise KeyError(key)


@functools.lru_cache(maxsize=None)
def _input_name(key: str) -> str:
    import onnx
    proto = onnx.load(model_path(key), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return next(i.name for i in proto.graph.input if i.name not in inits)


def _stsb() -> dict[str, np.ndarray]:
    return _npz("stsb_test_tokenized.npz")


def _minilm_feed(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


# ---- calibration --------------------------------------------------------------------------------------
def calibration_indices(key: str, n: int = 100) -> np.ndarray:
    """Indices of the calibration samples (MODELS.md's split)."""
    if key in ("mobilenet_v2", "mobilenet_v1"):
        return np.arange(5, 1000, 10)[:n]
    if key == "resnet8":
        return np.arange(1, 2000, 20)[:n]
    if key == "lenet":
        return np.arange(3, 10000, 100)[:n]
    if key == "minilm":
        return np.arange(0, 1379, 13)[:n]
    raise KeyError(key)


def calibration_batches(key: str, n: int = 100, batch_size: int = 1) -> list[dict[str, np.ndarray]]:
    """`n` calibration samples in batches of `batch_size`, as model input dicts."""
    idx = calibration_indices(key, n)
    if key == "minilm":
        data = _stsb()
        full = _minilm_feed(data["input_ids_a"][idx], data["attention_mask_a"][idx])
    else:
        inputs, _ = _inputs_and_labels(key)
        full = {name: value[idx] for name, value in inputs.items()}
    return [{name: value[i:i + batch_size] for name, value in full.items()} for i in range(0, len(idx), batch_size)]


# ---- evaluation ----------------------------------------------------------------------------------------
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def ort_runner(model, threads: int = 0) -> Runner:
    """A function running `model` (path, ModelProto or graphpress Model) in onnxruntime; returns output 0."""
    import onnxruntime as ort
    from graphpress.ir import Model
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if isinstance(model, Model):
        model = model.to_onnx()
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return lambda feed: sess.run(None, feed)[0]


def evaluate(key: str, model, limit: int | None = None, batch_size: int = 50) -> float:
    """The model's metric on the real evaluation data: top-1 for image models, Spearman for MiniLM.

    `model` is a path, ModelProto, graphpress Model, or a runner `f(inputs) -> first output`.
    """
    run = model if callable(model) else ort_runner(model)
    if key == "minilm":
        return _spearman(run, limit, batch_size)
    inputs, labels = _inputs_and_labels(key)
    count = len(labels) if limit is None else min(limit, len(labels))
    predictions = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        out = run({name: value[start:stop] for name, value in inputs.items()})
        predictions.append(np.argmax(out.reshape(stop - start, -1), axis=1))
    predicted = np.concatenate(predictions)
    if key in ("mobilenet_v2", "mobilenet_v1"):
        predicted = predicted - 1  # index 0 is "background"
    return float(np.mean(predicted == labels[:count]))


def _spearman(run: Runner, limit: int | None, batch_size: int) -> float:
    from scipy.stats import spearmanr
    data = _stsb()
    count = len(data["score"]) if limit is None else min(limit, len(data["score"]))
    embeddings = {}
    for side in ("a", "b"):
        parts = []
        for start in range(0, count, batch_size):
            ids = data[f"input_ids_{side}"][start:start + batch_size][:count - start]
            mask = data[f"attention_mask_{side}"][start:start + batch_size][:count - start]
            hidden = run(_minilm_feed(ids, mask))
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
            parts.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        embeddings[side] = np.concatenate(parts)
    cosine = np.sum(embeddings["a"] * embeddings["b"], axis=1)
    return float(spearmanr(cosine, data["score"][:count]).statistic)



def machine() -> str:
    """The CPU model and core count, for benchmark reports."""
    from graphpress.machine import describe
    return describe()
