"""Train the embedded example CNN on real handwritten digits and write `digits_cnn.onnx` and `digits.npz`.

    python -m graphpress.examples.make_digits_cnn [--out DIR]     # needs scikit-learn (the `dev` extra)

Data: the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998;
https://archive.ics.uci.edu/dataset/80, licence CC BY 4.0) in the copy scikit-learn ships inside its wheel,
`sklearn.datasets.load_digits()`: 1797 real handwritten digits, 8x8 pixels valued 0..16, classes 0-9. No
network is used. A fixed permutation (seed 0) holds out 500 images for evaluation; the other 1297 train the
model, and 128 of those are shipped as the calibration subset. `digits.npz` stores the calibration and
evaluation images as uint8 with their labels and their indices into `load_digits()`.

Model: the 8x8 images are upsampled to 16x16 (`graphpress.examples.preprocess`) and classified by

    Conv(1->32)+bias, BN, Relu | Conv(32->64), BN, Relu | MaxPool 2x2 | Conv(64->64), BN, Add(skip), Relu
    | GlobalAveragePool | flatten | Gemm(64->128), Relu, Dropout(0.2) | Gemm(128->10)

trained in plain numpy (`numpy_cnn`: im2col convolutions, batch normalization, AdamW with a cosine learning
rate) for 12 epochs with a fixed seed. Measured on the 500 held-out images with onnxruntime: top-1 0.986
(493/500), the same as the numpy network. Training took 517 s wall-clock (about 155 s of CPU time) on a
2-core machine shared with a load of 16; a rerun gave 549 s wall, 155 s CPU and top-1 0.986 again. Float
sums in BLAS may differ across machines, so a rerun reproduces the architecture, the split and the data
exactly and the accuracy closely (the slow test checks >= 0.95).

The ONNX file is written as framework exporters write models (opset 17): BatchNormalization left unfused,
a Dropout node, the flatten as a Shape->Gather->Unsqueeze->Concat->Reshape subgraph with Constant nodes, a
symbolic batch dim `N`, PyTorch-style node and initializer names, float32 weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import DATA_FILE, EXAMPLES_DIR, INPUT_NAME, MODEL_FILE, evaluate_top1, preprocess
from .numpy_cnn import (Adam, BatchNorm2d, Conv3x3, Dropout, GlobalAvgPool, Layer, Linear, MaxPool2x2, ReLU,
                        softmax_cross_entropy)

SEED = 0
EVAL_COUNT = 500
CALIB_COUNT = 128
EPOCHS = 12
BATCH = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
OPSET = 17


class DigitsCNN:
    """The example network: forward/backward over the layers, wired with the residual connection."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.conv1, self.bn1, self.relu1 = Conv3x3(rng, 1, 32, bias=True), BatchNorm2d(32), ReLU()
        self.conv2, self.bn2, self.relu2 = Conv3x3(rng, 32, 64, bias=False), BatchNorm2d(64), ReLU()
        self.pool = MaxPool2x2()
        self.conv3, self.bn3, self.relu3 = Conv3x3(rng, 64, 64, bias=False), BatchNorm2d(64), ReLU()
        self.gap = GlobalAvgPool()
        self.fc1, self.relu4, self.dropout = Linear(rng, 64, 128), ReLU(), Dropout(rng, 0.2)
        self.fc2 = Linear(rng, 128, 10)
        self.stem = [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2, self.relu2, self.pool]
        self.residual = [self.conv3, self.bn3]
        self.head = [self.gap, self.fc1, self.relu4, self.dropout, self.fc2]

    def layers(self) -> list[Layer]:
        return self.stem + self.residual + [self.relu3] + self.head

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        x = _forward(self.stem, x, train)
        x = self.relu3.forward(_forward(self.residual, x, train) + x, train)
        return _forward(self.head, x, train)

    def backward(self, grad: np.ndarray) -> None:
        grad = self.relu3.backward(_backward(self.head, grad))
        _backward(self.stem, _backward(self.residual, grad) + grad)


def _forward(layers: list[Layer], x: np.ndarray, train: bool) -> np.ndarray:
    for layer in layers:
        x = layer.forward(x, train)
    return x


def _backward(layers: list[Layer], grad: np.ndarray) -> np.ndarray:
    for layer in reversed(layers):
        grad = layer.backward(grad)
    return grad


# ---- data ------------------------------------------------------------------------------------------
def split(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, calibration, evaluation) indices into load_digits(): evaluation is held out of training."""
    order = np.random.default_rng(SEED).permutation(count)
    evaluation, train = np.sort(order[:EVAL_COUNT]), order[EVAL_COUNT:]
    return np.sort(train), np.sort(train[:CALIB_COUNT]), evaluation


# ---- training --------------------------------------------------------------------------------------
def train(x: np.ndarray, y: np.ndarray, epochs: int = EPOCHS, progress: bool = True) -> DigitsCNN:
    """Train a DigitsCNN on preprocessed images `x` and labels `y` (fixed seed, cosine learning rate)."""
    from tqdm import tqdm
    rng = np.random.default_rng(SEED)
    net = DigitsCNN(rng)
    optimizer = Adam(net.layers(), weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(x) // BATCH)
    total = epochs * steps_per_epoch
    bar = tqdm(total=total, desc="training digits CNN", disable=not progress)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            loss, grad = softmax_cross_entropy(net.forward(x[batch], train=True), y[batch])
            net.backward(grad)
            optimizer.step(LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * optimizer.steps / total)))
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()
    bar.close()
    return net


# ---- ONNX export -----------------------------------------------------------------------------------
def export(net: DigitsCNN) -> onnx.ModelProto:
    """The trained network as an ONNX model, laid out as a framework exporter would write it."""
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weights(prefix: str, layer: Layer) -> list[str]:
        names = []
        arrays = dict(layer.params)
        if isinstance(layer, BatchNorm2d):
            arrays.update(running_mean=layer.running_mean, running_var=layer.running_var)
        for key, value in arrays.items():
            names.append(f"{prefix}.{key}")
            initializers.append(numpy_helper.from_array(value.astype(np.float32), names[-1]))
        return names

    def node(op: str, name: str, inputs: list[str], **attrs) -> str:
        output = f"{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def constant(name: str, value: np.ndarray) -> str:
        return node("Constant", name, [], value=numpy_helper.from_array(value, f"{name}_value"))

    def conv_bn(x: str, index: int, conv: Conv3x3, bn: BatchNorm2d) -> str:
        x = node("Conv", f"/conv{index}/Conv", [x, *weights(f"conv{index}", conv)],
                 kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1)
        return node("BatchNormalization", f"/bn{index}/BatchNormalization", [x, *weights(f"bn{index}", bn)],
                    epsilon=bn.eps, momentum=1 - bn.momentum)

    x = node("Relu", "/relu1/Relu", [conv_bn(INPUT_NAME, 1, net.conv1, net.bn1)])
    x = node("Relu", "/relu2/Relu", [conv_bn(x, 2, net.conv2, net.bn2)])
    skip = node("MaxPool", "/pool/MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    x = node("Add", "/Add", [conv_bn(skip, 3, net.conv3, net.bn3), skip])
    x = node("Relu", "/relu3/Relu", [x])
    pooled = node("GlobalAveragePool", "/gap/GlobalAveragePool", [x])
    batch = node("Gather", "/Gather", [node("Shape", "/Shape", [pooled]), constant("/Constant", np.array(0))],
                 axis=0)
    batch = node("Unsqueeze", "/Unsqueeze", [batch, constant("/Constant_1", np.array([0]))])
    shape = node("Concat", "/Concat", [batch, constant("/Constant_2", np.array([-1]))], axis=0)
    x = node("Reshape", "/Reshape", [pooled, shape])
    x = node("Gemm", "/fc1/Gemm", [x, *weights("fc1", net.fc1)], alpha=1.0, beta=1.0, transB=1)
    x = node("Relu", "/relu4/Relu", [x])
    x = node("Dropout", "/dropout/Dropout", [x])
    nodes.append(helper.make_node("Gemm", [x, *weights("fc2", net.fc2)], ["logits"], name="/fc2/Gemm",
                                  alpha=1.0, beta=1.0, transB=1))

    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="graphpress.examples.make_digits_cnn", producer_version="1")
    model.ir_version = 8  # the IR version of opset 17, so older onnxruntime releases load it too
    model.doc_string = ("Digit classifier trained on sklearn load_digits (UCI optical digits, CC BY 4.0); "
                        "input: 8x8 pixels 0..16 upsampled 2x, scaled to [-1, 1]")
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- entry point -----------------------------------------------------------------------------------
def generate(out_dir: Path, epochs: int = EPOCHS, progress: bool = True) -> dict[str, float]:
    """Train, export and write both files into `out_dir`; returns the measured numbers."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(np.int64)
    train_index, calib_index, eval_index = split(len(labels))
    started, cpu_started = time.perf_counter(), time.process_time()
    net = train(preprocess(images[train_index]), labels[train_index], epochs, progress)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    model = export(net)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out_dir / MODEL_FILE)
    np.savez_compressed(out_dir / DATA_FILE,
                        calib_images=images[calib_index], calib_labels=labels[calib_index].astype(np.uint8),
                        calib_index=calib_index.astype(np.int16),
                        eval_images=images[eval_index], eval_labels=labels[eval_index].astype(np.uint8),
                        eval_index=eval_index.astype(np.int16))
    numpy_top1 = float(np.mean(net.forward(preprocess(images[eval_index]), train=False).argmax(1)
                               == labels[eval_index]))
    return {"train_seconds": seconds, "train_cpu_seconds": cpu_seconds, "numpy_top1": numpy_top1,
            "onnx_top1": evaluate_top1(out_dir / MODEL_FILE, directory=out_dir)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="directory for the two files")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    numbers = generate(args.out, args.epochs)
    sizes = {name: (args.out / name).stat().st_size for name in (MODEL_FILE, DATA_FILE)}
    print(f"trained in {numbers['train_seconds']:.1f} s ({numbers['train_cpu_seconds']:.1f} s CPU); held-out top-1: numpy {numbers['numpy_top1']:.4f}, "
          f"onnxruntime {numbers['onnx_top1']:.4f}; " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
