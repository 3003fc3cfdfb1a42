"""Just enough of a neural-network library, in plain numpy, to train the embedded example CNN.

graphpress must not depend on a training framework, yet its demo needs a real trained model. These layers
(3x3 convolution via im2col, batch normalization, ReLU, 2x2 max pooling, global average pooling, linear,
dropout), softmax cross-entropy and Adam are the textbook algorithms, each with a forward pass that caches
what its backward pass needs. Tensors are NCHW (float32 for training, any float dtype works: the gradient check runs in float64); parameters and their gradients live in the
`params` / `grads` dicts of each layer, keyed by the names the ONNX exporter uses.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class Layer:
    """A differentiable step: `forward(x, train)` caches, `backward(grad_out)` returns grad_in and fills grads."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Conv3x3(Layer):
    """3x3 convolution, stride 1, padding 1 (the spatial size is kept), as one matrix product over im2col."""

    def __init__(self, rng: np.random.Generator, cin: int, cout: int, bias: bool) -> None:
        super().__init__()
        fan_in = cin * 9
        self.params["weight"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if bias:
            self.params["bias"] = np.zeros(cout, np.float32)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        n, c, h, w = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = sliding_window_view(padded, (3, 3), axis=(2, 3))  # n, c, h, w, 3, 3
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)
        weight = self.params["weight"]
        out = cols @ weight.reshape(len(weight), -1).T
        if "bias" in self.params:
            out += self.params["bias"]
        self._cache = (x.shape, cols)
        return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        (n, c, h, w), cols = self._cache
        weight = self.params["weight"]
        flat = grad.transpose(0, 2, 3, 1).reshape(n * h * w, -1)
        self.grads["weight"] = (flat.T @ cols).reshape(weight.shape)
        if "bias" in self.params:
            self.grads["bias"] = flat.sum(0)
        dcols = flat @ weight.reshape(len(weight), -1)  # n*h*w, c*9
        # one transposing copy to (n, c, 3, 3, h, w) makes every tap's slice contiguous for the col2im sums
        taps = np.ascontiguousarray(dcols.reshape(n, h * w, c * 9).transpose(0, 2, 1)).reshape(n, c, 3, 3, h, w)
        dpadded = np.zeros((n, c, h + 2, w + 2), grad.dtype)
        for i in range(3):
            for j in range(3):
                dpadded[:, :, i:i + h, j:j + w] += taps[:, :, i, j]
        return dpadded[:, :, 1:-1, 1:-1]


class BatchNorm2d(Layer):
    """Batch normalization over (N, H, W) per channel; running statistics as PyTorch keeps them."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.params["weight"] = np.ones(channels, np.float32)
        self.params["bias"] = np.zeros(channels, np.float32)
        self.running_mean = np.zeros(channels, np.float32)
        self.running_var = np.ones(channels, np.float32)
        self.momentum, self.eps = momentum, eps

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        shape = (1, -1, 1, 1)
        if train:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
            count = x.size // x.shape[1]
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (var * count / (count - 1) - self.running_var)
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = 1.0 / np.sqrt(var + self.eps)
        normalized = (x - mean.reshape(shape)) * inv_std.reshape(shape)
        self._cache = (normalized, inv_std)
        return normalized * self.params["weight"].reshape(shape) + self.params["bias"].reshape(shape)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        normalized, inv_std = self._cache
        shape = (1, -1, 1, 1)
        self.grads["weight"] = (grad * normalized).sum((0, 2, 3))
        self.grads["bias"] = grad.sum((0, 2, 3))
        dnorm = grad * self.params["weight"].reshape(shape)
        mean_d = dnorm.mean((0, 2, 3), keepdims=True)
        mean_dn = (dnorm * normalized).mean((0, 2, 3), keepdims=True)
        return (dnorm - mean_d - normalized * mean_dn) * inv_std.reshape(shape)


class ReLU(Layer):
    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self._mask = x > 0
        return x * self._mask

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad * self._mask


class MaxPool2x2(Layer):
    """2x2 max pooling, stride 2; the gradient goes to the first maximum of each window (as PyTorch does)."""

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        n, c, h, w = x.shape
        windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        self._argmax = windows.argmax(-1)[..., None]
        self._shape = x.shape
        return np.take_along_axis(windows, self._argmax, -1)[..., 0]

    def backward(self, grad: np.ndarray) -> np.ndarray:
        n, c, h, w = self._shape
        dwindows = np.zeros((n, c, h // 2, w // 2, 4), grad.dtype)
        np.put_along_axis(dwindows, self._argmax, grad[..., None], -1)
        return dwindows.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


class GlobalAvgPool(Layer):
    """Mean over H and W: [N, C, H, W] -> [N, C]."""

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self._shape = x.shape
        return x.mean((2, 3))

    def backward(self, grad: np.ndarray) -> np.ndarray:
        n, c, h, w = self._shape
        return np.broadcast_to(grad[:, :, None, None] / (h * w), self._shape).copy()


class Linear(Layer):
    """y = x @ W.T + b with W stored [out, in] (ONNX Gemm with transB=1)."""

    def __init__(self, rng: np.random.Generator, fan_in: int, fan_out: int) -> None:
        super().__init__()
        bound = 1.0 / np.sqrt(fan_in)
        self.params["weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        self.params["bias"] = np.zeros(fan_out, np.float32)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self._x = x
        return x @ self.params["weight"].T + self.params["bias"]

    def backward(self, grad: np.ndarray) -> np.ndarray:
        self.grads["weight"] = grad.T @ self._x
        self.grads["bias"] = grad.sum(0)
        return grad @ self.params["weight"]


class Dropout(Layer):
    """Inverted dropout: zeroes a fraction `rate` while training and rescales, so inference is the identity."""

    def __init__(self, rng: np.random.Generator, rate: float) -> None:
        super().__init__()
        self.rng, self.rate = rng, rate

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        if not train:
            self._scale = 1.0
            return x
        self._scale = (self.rng.random(x.shape) >= self.rate).astype(x.dtype) / x.dtype.type(1 - self.rate)
        return x * self._scale

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad * self._scale


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of integer `labels` under softmax(`logits`), and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    rows = np.arange(len(labels))
    loss = float(-log_probs[rows, labels].mean())
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1
    return loss, grad / len(labels)


class Adam:
    """Adam with decoupled weight decay (AdamW) on the parameters named "weight" of conv and linear layers."""

    def __init__(self, layers: list[Layer], weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.layers, self.weight_decay, self.betas, self.eps = layers, weight_decay, betas, eps
        self.moments = {(id(layer), name): (np.zeros_like(p), np.zeros_like(p))
                        for layer in layers for name, p in layer.params.items()}
        self.steps = 0

    def step(self, lr: float) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for layer in self.layers:
            decays = isinstance(layer, (Conv3x3, Linear))
            for name, param in layer.params.items():
                grad = layer.grads[name]
                m, v = self.moments[(id(layer), name)]
                m += (1 - beta1) * (grad - m)
                v += (1 - beta2) * (grad * grad - v)
                if decays and name == "weight":
                    param -= lr * self.weight_decay * param
                param -= (lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)).astype(np.float32)
