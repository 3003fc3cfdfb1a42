"""Factorable ops ("sites"): each seen as `y = x @ W` with a constant W [k, n], and rebuilt from factors.

A site knows four things: its weight matrix W in the row convention, the tensor its input rows come
from and how to turn an activation into rows (for the input Gram matrix), how the factors A [k, r]
and B [r, n] are stored as initializers for this op, and how to rewrite the op into two thin ops of
the same type with constant weights (so a later quantizer sees ordinary MatMul/Gemm/Conv weights).

- `MatMul(x, W)`: x of any rank ≥ 1, W 2-D (also through a Transpose of a constant).
- `MatMul(W, x)`: W first; y = W·x = Bᵀ·(Aᵀ·x) with the row matrix Wᵀ.
- `Gemm(x, W, C)` with transA/transB/alpha/beta: alpha and transA go to the first Gemm, C and beta to
  the second; both keep the original transB layout.
- `Conv(x, W, b)` with group 1: spatial then pointwise conv (see `conv`).
`find_site` returns why an op cannot be factored when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from ..ir.model import in_default_domain
from .conv import ConvGeometry, conv_matrix, pointwise_weight, spatial_weight

#: provenance recorded on the nodes this package creates
RULE = "svd-split"


@dataclass
class Site:
    """One op to factor. Subclasses define the row view and the rewrite."""

    node: gs.Node
    source: gs.Tensor            # the constant tensor the weight comes from
    matrix: np.ndarray           # W [k, n] in the row convention y = x @ W
    transposed: bool             # whether `matrix` is the source's value transposed
    via: list[gs.Node] = field(default_factory=list)   # Transpose nodes between source and op

    @property
    def activation(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def layout(self) -> str:
        """Sites with the same layout store the factors identically (and can share initializers)."""
        return type(self).__name__

    def rows_reason(self) -> str:
        """Why input rows cannot be formed for this site ('' when they can)."""
        return ""

    @property
    def rows_key(self) -> tuple:
        """Sites with equal (activation, rows_key) see the same rows (their Gram is computed once)."""
        return self.activation.name, type(self).__name__, self.matrix.shape[0]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The activation -> its [m, k] rows (what multiplies `matrix`)."""
        return x.reshape(-1, self.matrix.shape[0])

    def stored(self, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The factors as this op's weight initializers."""
        return first, second

    def source_value(self, matrix: np.ndarray) -> np.ndarray:
        """A matrix in the row convention -> the value of the source constant that gives it."""
        return matrix.T if self.transposed else matrix

    def rewrite(self, model: Model, first: gs.Constant, second: gs.Constant) -> gs.Node:
        """Insert the first thin op before `node` and turn `node` into the second; returns the new node."""
        hidden = self._hidden(model)
        new = gs.Node(self.node.op, name=model.unique_name(f"{self.node.name or self.node.op}/svd_first"),
                      inputs=[self.activation, first], outputs=[hidden])
        self.node.inputs[0], self.node.inputs[1] = hidden, second
        return self._add(model, new)

    def _hidden(self, model: Model) -> gs.Variable:
        return gs.Variable(model.unique_name(f"{self.node.outputs[0].name}_svd_hidden"),
                           dtype=self.activation.dtype)

    def _add(self, model: Model, new: gs.Node) -> gs.Node:
        model.graph.nodes.append(new)
        model.mark_made_by(new, RULE)
        model.mark_made_by(self.node, RULE)
        return new


class MatMulSite(Site):
    """MatMul(x, W)."""


class LeftMatMulSite(Site):
    """MatMul(W, x): the row matrix is Wᵀ and the rows are the columns of x."""

    @property
    def activation(self) -> gs.Tensor:
        return self.node.inputs[1]

    def rows(self, x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x, -1, -2).reshape(-1, self.matrix.shape[0]) if x.ndim > 1 else x.reshape(1, -1)

    def stored(self, first, second):
        return first.T, second.T

    def rewrite(self, model, first, second):
        hidden = self._hidden(model)
        new = gs.Node("MatMul", name=model.unique_name(f"{self.node.name or 'MatMul'}/svd_first"),
                      inputs=[first, self.activation], outputs=[hidden])
        self.node.inputs[0], self.node.inputs[1] = second, hidden
        return self._add(model, new)


class GemmSite(Site):
    """Gemm(x, W, C): alpha·op(x)·op(W) + beta·C."""

    @property
    def layout(self) -> str:
        return f"Gemm(transB={self.node.attrs.get('transB', 0)})"

    @property
    def rows_key(self):
        return self.activation.name, "Gemm", int(self.node.attrs.get("transA", 0))

    def rows(self, x):
        return x.T if self.node.attrs.get("transA", 0) else x

    def stored(self, first, second):
        return (first.T, second.T) if self.node.attrs.get("transB", 0) else (first, second)

    def rewrite(self, model, first, second):
        attrs = self.node.attrs
        hidden = self._hidden(model)
        new = gs.Node("Gemm", name=model.unique_name(f"{self.node.name or 'Gemm'}/svd_first"),
                      attrs={"alpha": float(attrs.get("alpha", 1.0)), "transA": int(attrs.get("transA", 0)),
                             "transB": int(attrs.get("transB", 0))},
                      inputs=[self.activation, first], outputs=[hidden])
        self.node.inputs[0], self.node.inputs[1] = hidden, second
        attrs.pop("alpha", None)
        attrs.pop("transA", None)
        return self._add(model, new)


class ConvSite(Site):
    """Conv(x, W, b) with group 1: a spatial conv to rank r channels, then a pointwise conv."""

    @property
    def geometry(self) -> ConvGeometry | str:
        return ConvGeometry.of(self.node.attrs, self.source_shape)

    @property
    def source_shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    def rows_reason(self):
        geometry = self.geometry
        return geometry if isinstance(geometry, str) else ""

    @property
    def rows_key(self):
        return self.activation.name, self.geometry

    def rows(self, x):
        return self.geometry.patches(x)

    def stored(self, first, second):
        return spatial_weight(first, self.source_shape), pointwise_weight(second, len(self.source_shape))

    def source_value(self, matrix):
        return matrix.T.reshape(self.source_shape)

    def rewrite(self, model, first, second):
        hidden = self._hidden(model)
        attrs = {key: value for key, value in self.node.attrs.items() if key != "group"}
        attrs["kernel_shape"] = list(self.source_shape[2:])
        new = gs.Node("Conv", name=model.unique_name(f"{self.node.name or 'Conv'}/svd_first"), attrs=attrs,
                      inputs=[self.activation, first], outputs=[hidden])
        self.node.inputs[0], self.node.inputs[1] = hidden, second
        self.node.attrs = {"kernel_shape": [1] * (len(self.source_shape) - 2)}
        return self._add(model, new)


def find_site(model: Model, node: gs.Node) -> Site | str:
    """The factorable view of `node`, or the reason it has none."""
    if not in_default_domain(node):
        return f"op in domain {node.domain!r}"
    finder = _FINDERS.get(node.op)
    if finder is None:
        return f"{node.op} is not factorable"
    return finder(model, node)


def _weight(model: Model, tensor: gs.Tensor) -> tuple[gs.Tensor, np.ndarray, bool, list[gs.Node]] | None:
    """(source constant, value as the op sees it, transposed by a Transpose?, Transpose nodes) or None."""
    value = model.constant_value(tensor)
    if value is not None:
        return tensor, value, False, []
    producer = model.producer(tensor)
    if producer is None or producer.op != "Transpose" or not in_default_domain(producer):
        return None
    source = producer.inputs[0]
    value = model.constant_value(source)
    if value is None:
        return None
    perm = producer.attrs.get("perm")
    swapped = perm is None or list(perm) != sorted(perm)
    return source, np.transpose(value, perm), swapped, [producer]


def _float_matrix(value: np.ndarray, what: str) -> str:
    if value.dtype.kind != "f":
        return f"{what} has dtype {value.dtype}, not floating point"
    if value.ndim != 2:
        return f"{what} is {value.ndim}-D, not a 2-D matrix"
    return ""


def _matmul(model: Model, node: gs.Node) -> Site | str:
    right = _weight(model, node.inputs[1])
    left = _weight(model, node.inputs[0])
    if right is not None and left is not None:
        return "both inputs are constant (constant folding, not factorization, applies)"
    if right is not None:
        source, value, swapped, via = right
        why = _float_matrix(value, "the weight (second input)")
        return why or MatMulSite(node, source, value, swapped, via)
    if left is not None:
        source, value, swapped, via = left
        why = _float_matrix(value, "the weight (first input)")
        return why or LeftMatMulSite(node, source, value.T, not swapped, via)
    return "neither input is a constant weight"


def _gemm(model: Model, node: gs.Node) -> Site | str:
    weight = _weight(model, node.inputs[1])
    if weight is None:
        if _weight(model, node.inputs[0]) is not None:
            return "the constant is Gemm's first input A (only a constant B is factored)"
        return "B is not a constant weight"
    source, value, swapped, via = weight
    why = _float_matrix(value, "B")
    if why:
        return why
    trans_b = bool(node.attrs.get("transB", 0))
    return GemmSite(node, source, value.T if trans_b else value, swapped != trans_b, via)


def _conv(model: Model, node: gs.Node) -> Site | str:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "the weight is not an initializer"
    value = np.asarray(node.inputs[1].values)
    if value.dtype.kind != "f":
        return f"the weight has dtype {value.dtype}"
    if int(node.attrs.get("group", 1)) != 1:
        return f"grouped convolution (group={node.attrs['group']}): each group is already thin"
    if value.ndim < 3:
        return f"the weight is {value.ndim}-D"
    return ConvSite(node, node.inputs[1], conv_matrix(value), False)


_FINDERS = {"MatMul": _matmul, "Gemm": _gemm, "Conv": _conv}
