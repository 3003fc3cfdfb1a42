"""Intermediate activations on calibration data, one batch at a time (bounded memory).

Quantization observers, data-aware SVD and pruning reconstruction all need the values of inner tensors
on real inputs. `activation_batches` exposes the named tensors as extra outputs of one onnxruntime
session and yields them batch by batch, so a caller accumulates statistics and never holds every
activation of the calibration set at once.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import GraphpressError
from .execute import session
from .model import Model


def activation_batches(model: Model, tensor_names: Iterable[str], batches: Iterable[dict[str, np.ndarray]],
                       progress: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield {tensor name: value} for every batch of inputs, for the given main-graph tensors.

    Tensors that are initializers are returned as their constant values. With `progress`, a tqdm bar
    with that description is shown.
    """
    names = list(dict.fromkeys(tensor_names))
    tensors = model.graph.tensors()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise GraphpressError(f"no tensor named {missing[0]!r} in the model")
    constants = {n: np.asarray(tensors[n].values) for n in names if isinstance(tensors[n], gs.Constant)}
    wanted = [n for n in names if n not in constants]
    sess = session(with_outputs(model, wanted)) if wanted else None
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=progress, unit="batch", leave=False)
    for batch in batches:
        values = dict(constants)
        if sess is not None:
            try:
                values.update(zip(wanted, sess.run(wanted, batch)))
            except Exception as exc:
                raise GraphpressError(f"running the calibration batch failed: {str(exc).splitlines()[0]}") from exc
        yield values


def with_outputs(model: Model, names: list[str]) -> onnx.ModelProto:
    """A ModelProto of `model` whose graph outputs also include the named inner tensors."""
    proto = model.to_onnx()
    present = {o.name for o in proto.graph.output}
    tensors = model.graph.tensors()
    for name in names:
        if name in present:
            continue
        tensor = tensors[name]
        info = onnx.ValueInfoProto(name=name)
        if tensor.dtype is not None:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)) \
                if not isinstance(tensor.dtype, int) else tensor.dtype
            info.type.tensor_type.elem_type = elem
        proto.graph.output.append(info)
    return proto
