"""How a compressed model is scored: the user's metric (`--eval MODULE:FUNCTION`) or agreement with float.

The user's function takes a `Runnable` (anything with `.run(inputs) -> {output name: array}`) and returns
a number where higher is better. Without one, agreement with the float model on held-out inputs stands in:
top-1 agreement for classifier-shaped outputs ([N, classes]), mean cosine similarity otherwise.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import onnx

from ..errors import GraphpressError
from ..ir import Model, session


class Runnable(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRunnable:
    """An ONNX model run by onnxruntime (graph optimizations on, as a deployment would run it)."""

    def __init__(self, model: Model | onnx.ModelProto, threads: int = 0):
        self.proto = model.to_onnx() if isinstance(model, Model) else model
        self._session = session(self.proto, optimize=True, threads=threads)
        self._names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self._session.run(self._names, inputs)))


Evaluator = Callable[[Runnable], float]


@dataclass
class Agreement:
    """Agreement of a model's first output with the float model's on held-out inputs."""

    reference: list[np.ndarray]
    batches: Sequence[dict[str, np.ndarray]]
    kind: str  # "top-1 agreement" or "cosine"

    @classmethod
    def against(cls, float_model: Model, batches: Sequence[dict[str, np.ndarray]]) -> "Agreement":
        if not batches:
            raise GraphpressError("no held-out inputs to measure agreement on; give more calibration data")
        runnable = OnnxRunnable(float_model)
        reference = [_first_output(runnable.run(b)) for b in batches]
        kind = "top-1 agreement" if reference[0].ndim == 2 and reference[0].shape[1] > 1 else "cosine"
        return cls(reference, batches, kind)

    def __call__(self, model: Runnable) -> float:
        scores = []
        for want, batch in zip(self.reference, self.batches):
            got = _first_output(model.run(batch))
            if self.kind == "top-1 agreement":
                scores.append(np.argmax(got, axis=1) == np.argmax(want, axis=1))
            else:
                a, b = want.reshape(len(want), -1), got.reshape(len(got), -1)
                cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
                scores.append(cos)
        return float(np.mean(np.concatenate(scores)))


def _first_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())), dtype=np.float64)


def load_evaluator(spec: str) -> Evaluator:
    """Import `MODULE:FUNCTION` (a module on sys.path or a `path/to/file.py:FUNCTION`), with clear errors."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise GraphpressError(f"--eval {spec!r}: expected MODULE:FUNCTION, e.g. my_metrics:top1")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise GraphpressError(f"--eval {spec!r}: no such file {path}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(module_name)
    except GraphpressError:
        raise
    except ModuleNotFoundError as exc:
        raise GraphpressError(f"--eval {spec!r}: cannot import module {exc.name!r}") from exc
    except Exception as exc:
        raise GraphpressError(f"--eval {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise GraphpressError(f"--eval {spec!r}: module {module_name} has no {function_name!r}")
    if not callable(function):
        raise GraphpressError(f"--eval {spec!r}: {function_name} is not a function")
    try:
        inspect.signature(function).bind(None)
    except TypeError as exc:
        raise GraphpressError(f"--eval {spec!r}: {function_name} must take one argument (the model): {exc}") from exc
    except ValueError:
        pass  # builtins without a signature: trust them
    return _checked(function, spec)


def _checked(function: Callable, spec: str) -> Evaluator:
    def evaluate(model: Runnable) -> float:
        value = function(model)
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise GraphpressError(f"--eval {spec}: returned {value!r}, not a number") from exc

    return evaluate
