"""The real models in ../shared/models and the data that measures them, for benchmarks and tests.

One place knows each model's input preprocessing, its calibration split and its metric (MODELS.md):

    batches = calibration_batches("mobilenet_v2", n=100)          # every 10th ImageNet image from index 5
    top1 = evaluate("mobilenet_v2", "model_int8.onnx")             # on all 1000 images

Calibration and evaluation follow shared/data/README.md: calibration on a fixed subset, the metric on all
samples. MiniLM calibrates on the first sentence of every 13th STS-B test pair (there is no dev split here);
where calibration must not touch the evaluated pairs, `stsb_holdout` sets pairs aside: both their sentences
calibrate (`stsb_sentences`) and `evaluate(..., skip=pairs)` leaves them out of the Spearman.
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
#: per model: (samples, first calibration index, step) of MODELS.md's calibration split
_SPLITS = {"mobilenet_v2": (1000, 5, 10), "mobilenet_v1": (1000, 5, 10), "resnet8": (2000, 1, 20),
           "lenet": (10000, 3, 100), "minilm": (1379, 0, 13)}


def calibration_indices(key: str, n: int = 100) -> np.ndarray:
    """Indices of `n` calibration samples (MODELS.md's split: every `step`-th from `first`). Where that
    split holds fewer than `n`, the standard samples come first, then those shifted by a divisor of the
    step, one shift at a time over the whole range (ResNet-8, n=400: every 5th CIFAR image from index 1;
    ImageNet, n=200: every 10th from 5 and every 10th from 7), so a larger set contains the standard one."""
    if key not in _SPLITS:
        raise KeyError(key)
    total, first, step = _SPLITS[key]
    every = next((d for d in range(step, 0, -1) if step % d == 0 and len(range(first, total, d)) >= n), 1)
    candidates = np.arange(first, total, every)
    shift = (candidates - first) % step
    return np.sort(candidates[np.lexsort((candidates, shift))][:n])


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


def stsb_holdout(every: int = 5) -> np.ndarray:
    """STS-B pairs set aside for calibration (every `every`-th from index 2); evaluate with skip= them."""
    return np.arange(2, len(_stsb()["score"]), every)


def stsb_sentences(pairs: np.ndarray, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """The distinct sentences of these pairs that no other pair contains (so calibration on them shares
    no text with a Spearman that skips these pairs), cut to their attention mask and batched with
    sentences of the same length (padding never reaches the masked-mean embedding, so its activations
    would only blur calibration statistics); the batches in a fixed shuffled order, so that any first
    few mix lengths."""
    data = _stsb()
    others = np.setdiff1d(np.arange(len(data["score"])), pairs)
    taken = {str(text) for side in ("a", "b") for text in data[f"sentence_{side}"][others]}
    by_length: dict[int, list[tuple[str, int]]] = {}
    for i in pairs:
        for side in ("a", "b"):
            text = str(data[f"sentence_{side}"][i])
            if text not in taken:
                taken.add(text)
                by_length.setdefault(int(data[f"attention_mask_{side}"][i].sum()), []).append((side, i))
    batches = []
    for length, members in sorted(by_length.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            ids = np.stack([data[f"input_ids_{side}"][i, :length] for side, i in chunk])
            batches.append(_minilm_feed(ids, np.ones_like(ids)))
    return [batches[i] for i in np.random.default_rng(0).permutation(len(batches))]


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


def evaluate(key: str, model, limit: int | None = None, batch_size: int = 50, skip: np.ndarray | None = None) -> float:
    """The model's metric on the real evaluation data: top-1 for image models, Spearman for MiniLM.

    `model` is a path, ModelProto, graphpress Model, or a runner `f(inputs) -> first output`. `skip`:
    sample indices left out (calibration samples, e.g. `calibration_indices`; STS-B pairs for MiniLM,
    see `stsb_holdout`).
    """
    run = model if callable(model) else ort_runner(model)
    if key == "minilm":
        return _spearman(run, limit, batch_size, skip)
    inputs, labels = _inputs_and_labels(key)
    count = len(labels) if limit is None else min(limit, len(labels))
    keep = np.setdiff1d(np.arange(count), skip if skip is not None else [])
    predictions = []
    for start in range(0, len(keep), batch_size):
        rows = keep[start:start + batch_size]
        out = run({name: value[rows] for name, value in inputs.items()})
        predictions.append(np.argmax(out.reshape(len(rows), -1), axis=1))
    predicted = np.concatenate(predictions)
    if key in ("mobilenet_v2", "mobilenet_v1"):
        predicted = predicted - 1  # index 0 is "background"
    return float(np.mean(predicted == labels[keep]))


def _spearman(run: Runner, limit: int | None, batch_size: int, skip: np.ndarray | None = None) -> float:
    """Spearman of the pairs' embedding cosines with the gold scores. Sentences run in batches of similar
    length cut to their longest mask (padding is masked out, so only rounding differs from full padding)."""
    from scipy.stats import spearmanr
    data = _stsb()
    count = len(data["score"]) if limit is None else min(limit, len(data["score"]))
    keep = np.setdiff1d(np.arange(count), skip if skip is not None else [])
    embeddings = {}
    for side in ("a", "b"):
        ids, mask = data[f"input_ids_{side}"][keep], data[f"attention_mask_{side}"][keep]
        lengths = mask.sum(1)
        pooled = np.zeros((len(keep), 384), dtype=np.float32)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            cut = int(lengths[rows].max())
            hidden = run(_minilm_feed(ids[rows, :cut], mask[rows, :cut]))
            weights = mask[rows, :cut, None].astype(np.float32)
            pooled[rows] = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        embeddings[side] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cosine = np.sum(embeddings["a"] * embeddings["b"], axis=1)
    return float(spearmanr(cosine, data["score"][keep]).statistic)


def machine() -> str:
    """The CPU model and core count, for benchmark reports."""
    from graphpress.machine import describe
    return describe()
