"""Accuracy recovery without training: re-fit the layers that lost input channels by least squares.

For a consumer layer (Conv with group 1, Gemm, MatMul) whose input channels were removed, find new
weights W' (and bias) so that, on calibration data, `layer(X_pruned; W')` reproduces the *original*
model's output of that layer (He et al. 2017, ThiNet). X_pruned comes from the pruned model with the
earlier layers already re-fitted, so errors do not accumulate. Conv inputs are unfolded (im2col) at a
random sample of output positions; X^T X and X^T Y are accumulated batch by batch (bounded memory) and
the ridge system (X^T X + lambda I) W = X^T Y + lambda W_0 is solved, pulling towards the pruned weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view

from ..ir import Model, activation_batches
from .report import LayerFit
from .weights import replace_constant

log = logging.getLogger("graphpress.pruning")


@dataclass
class Normal:
    """Accumulated normal equations of one layer: A = X^T X, B = X^T Y, and sum(Y^2)."""

    a: np.ndarray
    b: np.ndarray
    yy: float = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.a += x.T @ x
        self.b += x.T @ y
        self.yy += float((y * y).sum())

    def error(self, theta: np.ndarray) -> float:
        """||Y - X theta||^2 / ||Y||^2 from the accumulated statistics."""
        residual = self.yy - 2 * np.sum(theta * self.b) + np.sum(theta * (self.a @ theta))
        return float(max(residual, 0.0) / max(self.yy, 1e-30))

    def solve(self, theta0: np.ndarray, ridge: float) -> np.ndarray:
        lam = ridge * np.trace(self.a) / max(len(self.a), 1) + 1e-12
        return np.linalg.solve(self.a + lam * np.eye(len(self.a)), self.b + lam * theta0)


def refit_layers(original: Model, pruned: Model, layers: list[str], calibration: Iterable[dict],
                 out_masks: dict[str, np.ndarray | None], ridge: float = 1e-2, rows_per_batch: int = 4096,
                 seed: int = 0) -> list[LayerFit]:
    """Re-fit the named layers of `pruned` (in graph order) against `original`'s outputs of the same
    layers. `out_masks[name]` selects the original output channels the pruned layer still produces."""
    by_name = {n.name: n for n in pruned.graph.nodes}
    fits = []
    rng = np.random.default_rng(seed)
    for name in [n.name for n in pruned.graph.nodes if n.name in set(layers)]:
        node = by_name[name]
        layer = _LAYERS.get(node.op)
        if layer is None or not layer.supported(pruned, node):
            log.debug("no re-fit for %s %r: unsupported form", node.op, name)
            continue
        theta0 = layer.theta(pruned, node)
        normal = Normal(np.zeros((len(theta0), len(theta0))), np.zeros((len(theta0), theta0.shape[1])))
        x_name, y_name = node.inputs[0].name, node.outputs[0].name
        pairs = zip(activation_batches(pruned, [x_name], calibration, progress=f"refit {name[:40]}"),
                    activation_batches(original, [y_name], calibration))
        for xs, ys in pairs:
            x, y = layer.rows(node, xs[x_name], ys[y_name], out_masks.get(name), rng, rows_per_batch)
            normal.add(x, y)
        if normal.yy == 0:
            continue
        theta = normal.solve(theta0, ridge)
        before, after = normal.error(theta0), normal.error(theta)
        if after < before:
            layer.store(pruned, node, theta)
        fits.append(LayerFit(name, before, min(after, before)))
    return fits


def _with_bias(x: np.ndarray, bias: bool) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], axis=1) if bias else x


def _sample(count: int, rng: np.random.Generator, limit: int) -> np.ndarray:
    return np.sort(rng.choice(count, size=limit, replace=False)) if count > limit else np.arange(count)


def _plain(model: Model, tensor: gs.Tensor) -> bool:
    return bool(tensor.name) and model.constant_value(tensor) is not None


class _Conv:
    """2-D Conv with group 1: theta rows are (C_in * kh * kw [+ bias]), columns are output channels."""

    @staticmethod
    def supported(model: Model, node: gs.Node) -> bool:
        w = model.constant_value(node.inputs[1]) if _plain(model, node.inputs[1]) else None
        has_bias = len(node.inputs) > 2 and node.inputs[2].name
        return (w is not None and w.ndim == 4 and node.attrs.get("group", 1) == 1
                and (not has_bias or _plain(model, node.inputs[2])))

    @staticmethod
    def theta(model: Model, node: gs.Node) -> np.ndarray:
        w = model.constant_value(node.inputs[1]).astype(np.float64)
        theta = w.reshape(w.shape[0], -1).T
        if len(node.inputs) > 2 and node.inputs[2].name:
            return np.vstack([theta, model.constant_value(node.inputs[2]).astype(np.float64)[None, :]])
        return np.vstack([theta, np.zeros((1, w.shape[0]))])

    @staticmethod
    def rows(node, x, y, out_mask, rng, limit):
        kh, kw = node.inputs[1].shape[2:] if node.inputs[1].shape else (1, 1)
        strides = node.attrs.get("strides", [1, 1])
        dil = node.attrs.get("dilations", [1, 1])
        pads = _conv_pads(node, x.shape[2:], (kh, kw), strides, dil)
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        eff = ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1)
        n, _, ho, wo = y.shape
        pick = _sample(n * ho * wo, rng, limit)
        bn, bh, bw = np.unravel_index(pick, (n, ho, wo))
        windows = sliding_window_view(xp, eff, axis=(2, 3))
        patches = windows[bn, :, bh * strides[0], bw * strides[1]][..., ::dil[0], ::dil[1]]
        targets = y[bn, :, bh, bw]
        if out_mask is not None:
            targets = targets[:, out_mask]
        return _with_bias(patches.reshape(len(pick), -1).astype(np.float64), True), targets.astype(np.float64)

    @staticmethod
    def store(model: Model, node: gs.Node, theta: np.ndarray) -> None:
        w_shape = model.constant_value(node.inputs[1]).shape
        dtype = model.constant_value(node.inputs[1]).dtype
        replace_constant(model, node, 1, theta[:-1].T.reshape(w_shape).astype(dtype))
        bias = theta[-1].astype(dtype)
        if len(node.inputs) > 2 and node.inputs[2].name:
            replace_constant(model, node, 2, bias)
        else:
            node.inputs.append(gs.Constant(model.unique_name(f"{node.name}_bias"), bias))


def _conv_pads(node: gs.Node, spatial, kernel, strides, dil) -> list[int]:
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("NOTSET", ""):
        return list(node.attrs.get("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dil):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


class _Gemm:
    """Gemm with alpha = beta = 1, transA = 0: theta rows are inputs [+ bias], columns outputs."""

    @staticmethod
    def supported(model: Model, node: gs.Node) -> bool:
        has_c = len(node.inputs) > 2 and node.inputs[2].name
        return (_plain(model, node.inputs[1]) and node.attrs.get("transA", 0) == 0
                and node.attrs.get("alpha", 1.0) == 1.0 and node.attrs.get("beta", 1.0) == 1.0
                and (not has_c or (_plain(model, node.inputs[2]) and model.constant_value(node.inputs[2]).ndim <= 1)))

    @staticmethod
    def theta(model: Model, node: gs.Node) -> np.ndarray:
        w = model.constant_value(node.inputs[1]).astype(np.float64)
        theta = w.T if node.attrs.get("transB", 0) else w
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = np.broadcast_to(model.constant_value(node.inputs[2]).astype(np.float64), (theta.shape[1],))
            return np.vstack([theta, c[None, :]])
        return theta

    @staticmethod
    def rows(node, x, y, out_mask, rng, limit):
        pick = _sample(len(x), rng, limit)
        targets = y[pick] if out_mask is None else y[pick][:, out_mask]
        bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
        return _with_bias(x[pick].astype(np.float64), bias), targets.astype(np.float64)

    @staticmethod
    def store(model: Model, node: gs.Node, theta: np.ndarray) -> None:
        dtype = model.constant_value(node.inputs[1]).dtype
        bias = len(node.inputs) > 2 and node.inputs[2].name
        w = theta[:-1] if bias else theta
        replace_constant(model, node, 1, (w.T if node.attrs.get("transB", 0) else w).astype(dtype))
        if bias:
            replace_constant(model, node, 2, theta[-1].astype(dtype))


class _MatMul:
    """MatMul by a constant matrix: theta is the matrix (no bias input to fit)."""

    @staticmethod
    def supported(model: Model, node: gs.Node) -> bool:
        return _plain(model, node.inputs[1]) and model.constant_value(node.inputs[1]).ndim == 2

    @staticmethod
    def theta(model: Model, node: gs.Node) -> np.ndarray:
        return model.constant_value(node.inputs[1]).astype(np.float64)

    @staticmethod
    def rows(node, x, y, out_mask, rng, limit):
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        pick = _sample(len(x2), rng, limit)
        targets = y2[pick] if out_mask is None else y2[pick][:, out_mask]
        return x2[pick].astype(np.float64), targets.astype(np.float64)

    @staticmethod
    def store(model: Model, node: gs.Node, theta: np.ndarray) -> None:
        replace_constant(model, node, 1, theta.astype(model.constant_value(node.inputs[1]).dtype))


_LAYERS = {"Conv": _Conv, "Gemm": _Gemm, "MatMul": _MatMul}
