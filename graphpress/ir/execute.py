"""Reference execution with onnxruntime, input generation, and numeric comparison of two models.

This is how every pass is checked: run the model before and after on the same inputs and report the
largest absolute and relative error per output.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import GraphpressError
from .model import Model

#: integer inputs are drawn from [0, INT_INPUT_HIGH): valid as token ids, token types, masks and indices
INT_INPUT_HIGH = 2


def session(model: Model | onnx.ModelProto, optimize: bool = False, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session for `model` (graph optimizations off by default: a faithful reference)."""
    proto = model.to_onnx() if isinstance(model, Model) else model
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors become our own exceptions
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if proto.ByteSize() < 2**31 - 1:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:
            from .io import save
            path = save(proto, Path(tmp) / "model.onnx")
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise GraphpressError(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc


def run(model: Model | onnx.ModelProto, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
        optimize: bool = False) -> dict[str, np.ndarray]:
    """Run `model` in onnxruntime; returns output name -> array."""
    sess = session(model, optimize=optimize)
    names = outputs or [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, inputs)
    except Exception as exc:
        raise GraphpressError(f"onnxruntime failed to run the model: {_first_line(exc)}") from exc
    return dict(zip(names, values))


def random_inputs(model: Model | onnx.ModelProto, dims: dict[str, int] | None = None, seed: int = 0,
                  default_dim: int = 1) -> dict[str, np.ndarray]:
    """Inputs matching the model's input specs; symbolic dims take `dims[name]` or `default_dim`."""
    proto = model.to_onnx() if isinstance(model, Model) else model
    rng = np.random.default_rng(seed)
    result = {}
    for value in fed_inputs(proto):
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise GraphpressError(f"input {value.name!r} is not a tensor; give inputs explicitly")
        shape = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append((dims or {}).get(d.dim_param, default_dim))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        result[value.name] = _random_array(rng, shape, dtype)
    return result


def fed_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (old IR versions also list initializers as inputs: those are left out)."""
    initializers = {t.name for t in proto.graph.initializer}
    return [value for value in proto.graph.input if value.name not in initializers]


def _random_array(rng: np.random.Generator, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, INT_INPUT_HIGH, size=shape).astype(dtype)
    raise GraphpressError(f"cannot generate inputs of dtype {dtype}; give inputs explicitly")


@dataclass
class OutputError:
    """How far one output of model B is from model A's."""

    name: str
    max_abs: float
    max_rel: float
    shape_match: bool = True


@dataclass
class Comparison:
    """Per-output errors of model B against model A on the same inputs."""

    outputs: list[OutputError] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def within(self, rtol: float, atol: float = 0.0) -> bool:
        """True when every element satisfies |b - a| <= atol + rtol * max|a| for its output."""
        return all(o.shape_match and (o.max_abs <= atol or o.max_rel <= rtol) for o in self.outputs)

    def __str__(self) -> str:
        return "; ".join(f"{o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}" for o in self.outputs)


def compare_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> Comparison:
    """Compare two output dicts by name. Relative error is scaled by the largest |expected| value,
    so that near-zero elements do not make it meaningless."""
    result = Comparison()
    for name, want in expected.items():
        got = actual[name]
        want_a, got_a = np.asarray(want), np.asarray(got)
        if want_a.shape != got_a.shape:
            result.outputs.append(OutputError(name, float("inf"), float("inf"), shape_match=False))
            continue
        if want_a.dtype.kind in "OUS":  # strings compare exactly
            same = bool(np.array_equal(want_a, got_a))
            result.outputs.append(OutputError(name, 0.0 if same else float("inf"), 0.0 if same else float("inf")))
            continue
        w, g = want_a.astype(np.float64), got_a.astype(np.float64)
        both_nan = np.isnan(w) & np.isnan(g)
        same_inf = np.isinf(w) & (w == g)
        diff = np.where(both_nan | same_inf, 0.0, np.abs(w - g))
        diff = np.where(np.isnan(diff), np.inf, diff)
        max_abs = float(diff.max()) if diff.size else 0.0
        finite = np.abs(w[np.isfinite(w)])
        scale = float(finite.max()) if finite.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        result.outputs.append(OutputError(name, max_abs, max_rel))
    return result


def compare(model_a: Model | onnx.ModelProto, model_b: Model | onnx.ModelProto,
            inputs: dict[str, np.ndarray] | None = None, seed: int = 0) -> Comparison:
    """Run both models on the same inputs (generated from A's input specs if not given) and
    report max abs/rel error of B against A for each of A's outputs."""
    if inputs is None:
        inputs = random_inputs(model_a, seed=seed)
    return compare_outputs(run(model_a, inputs), run(model_b, inputs))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def model_size_bytes(model: Model | onnx.ModelProto) -> int:
    """Serialized size of the model in bytes (what it takes on disk without external data)."""
    proto = model.to_onnx() if isinstance(model, Model) else model
    return proto.ByteSize()

