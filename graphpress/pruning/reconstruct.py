"""Accuracy recovery without training: re-fit the layers that lost input channels by least squares.

For a consumer layer (Conv with group 1, Gemm, MatMul) whose input channels were removed, find new
weights W' (and bias) so that, on calibration data, `layer(X_pruned; W')` reproduces the *original*
model's output of that layer (He et al. 2017, ThiNet). X_pruned comes from the pruned model with the
earlier layers already re-fitted, so errors do not accumulate. Conv inputs are unfolded (im2col) at a
random sample of output positions; X^T X and X^T Y are accumulated batch by batch (bounded memory) and
the ridge system (X^T X + lambda I) W = X^T Y + lambda W_0 is solved, pulling towards the pruned weights.

Without a given ridge strength, every fifth calibration batch (from the second on) is held out: lambda is
the one of RIDGE_GRID whose fit on the other batches reproduces the held-out batches best, and the layer
keeps its pruned weights when those reproduce them better still (a layer seen on few rows, such as a
classifier behind global pooling, would otherwise memorize the calibration samples). The final solve
uses all batches.
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

#: a re-fit needs at least this many calibration rows per unknown weight of an output
MIN_ROWS_PER_UNKNOWN = 1
#: ridge strengths (relative to the mean diagonal of X^T X) tried on the held-out batches
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: batch i is held out for choosing the ridge when i % HOLDOUT_EVERY == 1
HOLDOUT_EVERY = 5


@dataclass
class Normal:
    """Accumulated normal equations of one layer: A = X^T X, B = X^T Y, and sum(Y^2)."""

    a: np.ndarray
    b: np.ndarray
    yy: float = 0.0
    rows: int = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add one batch of rows (products in float32 for speed, sums in float64)."""
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        self.a += x32.T @ x32
        self.b += x32.T @ y32
        self.yy += float(np.sum(y.astype(np.float64) ** 2))
        self.rows += len(x)

    def error(self, theta: np.ndarray) -> float:
        """||Y - X theta||^2 / ||Y||^2 from the accumulated statistics."""
        residual = self.yy - 2 * np.sum(theta * self.b) + np.sum(theta * (self.a @ theta))
        return float(max(residual, 0.0) / max(self.yy, 1e-30))

    def __add__(self, other: "Normal") -> "Normal":
        return Normal(self.a + other.a, self.b + other.b, self.yy + other.yy, self.rows + other.rows)

    def solve(self, theta0: np.ndarray, ridge: float) -> np.ndarray:
        """The ridge solution pulled towards `theta0`; with fewer calibration rows than unknowns per output
        the fit would only memorize the calibration data, so `theta0` is kept."""
        if self.rows < MIN_ROWS_PER_UNKNOWN * len(self.a):
            return theta0
        lam = ridge * np.trace(self.a) / max(len(self.a), 1) + 1e-12
        return np.linalg.solve(self.a + lam * np.eye(len(self.a)), self.b + lam * theta0)


def refit_layers(original: Model, pruned: Model, layers: list[str], calibration: Iterable[dict],
                 out_masks: dict[str, np.ndarray | None], ridge: float | None = 1e-2, rows_per_batch: int = 2048,
                 seed: int = 0) -> list[LayerFit]:
    """Re-fit the named layers of `pruned` (in graph order) against `original`'s outputs of the same
    layers. `out_masks[name]` selects the original output channels the pruned layer still produces;
    `ridge` None chooses it per layer on held-out batches.

    Layers are re-fitted in waves: a wave is a run of consecutive layers none of which reads (directly or
    not) the output of another in the same wave, so one pass over the calibration data (each model cut
    after the tensors the wave needs) serves them all, and every layer sees the re-fits of the layers it
    depends on. A plain chain is re-fitted one layer at a time.
    """
    wanted = set(layers)
    todo = []
    for node in pruned.graph.nodes:
        if node.name not in wanted:
            continue
        layer = LAYERS.get(node.op)
        if layer is None or not layer.supported(pruned, node):
            log.debug("no re-fit for %s %r: unsupported form", node.op, node.name)
            continue
        todo.append((node, layer))
    fits = []
    rng = np.random.default_rng(seed)
    for wave in _waves(todo):
        fits.extend(_refit_wave(original, pruned, wave, calibration, out_masks, ridge, rows_per_batch, rng))
    return fits


def _waves(todo: list) -> list[list]:
    """Split the layers (in graph order) into runs whose members do not depend on each other."""
    waves: list[list] = []
    members: set[int] = set()
    for node, layer in todo:
        if waves and not (ancestors(node) & members):
            waves[-1].append((node, layer))
        else:
            waves.append([(node, layer)])
            members = set()
        members.add(id(node))
    return waves


def ancestors(node: gs.Node) -> set[int]:
    """ids of every node `node` depends on."""
    seen: set[int] = set()
    stack = [t for t in node.inputs]
    while stack:
        tensor = stack.pop()
        for producer in tensor.inputs:
            if id(producer) not in seen:
                seen.add(id(producer))
                stack.extend(producer.inputs)
    return seen


def _refit_wave(original, pruned, todo, calibration, out_masks, ridge, rows_per_batch, rng) -> list[LayerFit]:
    normals = []
    for node, layer in todo:
        theta0 = layer.theta(pruned, node)
        normals.append((theta0, [_empty_normal(theta0), _empty_normal(theta0)]))  # [fit, held out]
    x_names = [node.inputs[0].name for node, _ in todo]
    y_names = [node.outputs[0].name for node, _ in todo]
    label = f"refit {todo[0][0].name[:30]} (+{len(todo) - 1})"
    pairs = zip(activation_batches(truncated(pruned, x_names), x_names, calibration, progress=label),
                activation_batches(truncated(original, y_names), y_names, calibration))
    for index, (xs, ys) in enumerate(pairs):
        part = int(ridge is None and index % HOLDOUT_EVERY == 1)
        for (node, layer), (_, parts) in zip(todo, normals):
            x, y = xs[node.inputs[0].name], ys[node.outputs[0].name]
            pick = _sample(layer.count(node, x), rng, rows_per_batch)
            targets = layer.targets(y, pick)
            if out_masks.get(node.name) is not None:
                targets = targets[:, out_masks[node.name]]
            parts[part].add(layer.features(node, x, pick), targets.astype(np.float64))
    fits = []
    for (node, layer), (theta0, (fit, held_out)) in zip(todo, normals):
        normal = fit + held_out
        if normal.yy == 0:
            continue
        theta = normal.solve(theta0, ridge) if ridge is not None else _solve_by_held_out(theta0, fit, held_out)
        before, after = normal.error(theta0), normal.error(theta)
        if after < before:
            layer.store(pruned, node, theta)
        fits.append(LayerFit(node.name, before, min(after, before)))
    return fits


def _empty_normal(theta0: np.ndarray) -> Normal:
    return Normal(np.zeros((len(theta0), len(theta0))), np.zeros((len(theta0), theta0.shape[1])))


def _solve_by_held_out(theta0: np.ndarray, fit: Normal, held_out: Normal) -> np.ndarray:
    """The solution on all rows with the ridge whose fit-only solution best reproduces the held-out rows,
    or `theta0` when that reproduces them better. With nothing held out (a single batch), RIDGE_GRID[2]."""
    if held_out.rows == 0:
        return (fit + held_out).solve(theta0, RIDGE_GRID[2])
    errors = {lam: held_out.error(fit.solve(theta0, lam)) for lam in RIDGE_GRID}
    best = min(errors, key=errors.get)
    if held_out.error(theta0) <= errors[best]:
        return theta0
    return (fit + held_out).solve(theta0, best)


def truncated(model: Model, outputs: list[str]) -> Model:
    """A copy of `model` computing only the named tensors (the rest of the graph removed)."""
    cut = model.copy()
    tensors = cut.graph.tensors()
    cut.graph.outputs = [tensors[name] for name in dict.fromkeys(outputs)]
    cut.graph.cleanup(remove_unused_graph_inputs=False)
    return cut


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
    def block(node: gs.Node) -> int:
        """Rows of theta per input channel."""
        return int(np.prod(node.inputs[1].shape[2:]))

    @staticmethod
    def _geometry(node, x):
        kh, kw = node.inputs[1].shape[2:]
        strides = node.attrs.get("strides", [1, 1])
        dil = node.attrs.get("dilations", [1, 1])
        pads = _conv_pads(node, x.shape[2:], (kh, kw), strides, dil)
        eff = ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1)
        ho = (x.shape[2] + pads[0] + pads[2] - eff[0]) // strides[0] + 1
        wo = (x.shape[3] + pads[1] + pads[3] - eff[1]) // strides[1] + 1
        return pads, eff, strides, dil, (x.shape[0], ho, wo)

    @staticmethod
    def count(node, x) -> int:
        return int(np.prod(_Conv._geometry(node, x)[4]))

    @staticmethod
    def features(node, x, pick) -> np.ndarray:
        """im2col rows (C_in * kh * kw, then 1 for the bias) at the picked output positions."""
        pads, eff, strides, dil, out = _Conv._geometry(node, x)
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        bn, bh, bw = np.unravel_index(pick, out)
        windows = sliding_window_view(xp, eff, axis=(2, 3))
        patches = windows[bn, :, bh * strides[0], bw * strides[1]][..., ::dil[0], ::dil[1]]
        return _with_bias(patches.reshape(len(pick), -1).astype(np.float64), True)

    @staticmethod
    def targets(y, pick) -> np.ndarray:
        n, c, ho, wo = y.shape
        bn, bh, bw = np.unravel_index(pick, (n, ho, wo))
        return y[bn, :, bh, bw]

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
    def block(node: gs.Node) -> int:
        return 1

    @staticmethod
    def count(node, x) -> int:
        return len(x)

    @staticmethod
    def features(node, x, pick) -> np.ndarray:
        return _with_bias(x[pick].astype(np.float64), len(node.inputs) > 2 and bool(node.inputs[2].name))

    @staticmethod
    def targets(y, pick) -> np.ndarray:
        return y[pick]

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
    def block(node: gs.Node) -> int:
        return 1

    @staticmethod
    def count(node, x) -> int:
        return int(np.prod(x.shape[:-1]))

    @staticmethod
    def features(node, x, pick) -> np.ndarray:
        return x.reshape(-1, x.shape[-1])[pick].astype(np.float64)

    @staticmethod
    def targets(y, pick) -> np.ndarray:
        return y.reshape(-1, y.shape[-1])[pick]

    @staticmethod
    def store(model: Model, node: gs.Node, theta: np.ndarray) -> None:
        replace_constant(model, node, 1, theta.astype(model.constant_value(node.inputs[1]).dtype))


#: the layer kinds that can be re-fitted, by op type
LAYERS = {"Conv": _Conv, "Gemm": _Gemm, "MatMul": _MatMul}
