"""What `graphpress inspect` reports about a model: ops, parameters, size, inputs and outputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .ir import Model, model_size_bytes
from .ir.cost import macs


@dataclass
class ModelSummary:
    """Facts about one model, comparable before and after a pipeline."""

    nodes: int
    ops: dict[str, int]
    parameters: int
    size_bytes: int
    inputs: list[tuple[str, str, list]]
    outputs: list[tuple[str, str, list]]
    opset: int
    macs: dict[str, int] = field(default_factory=dict)

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())


def summarize(model: Model, size_bytes: int | None = None) -> ModelSummary:
    """The model's facts; `size_bytes` (e.g. the file's size) saves serializing the model to measure it."""
    ops = Counter(node.op for node in model.nodes())

    def spec(tensor):
        return tensor.name, str(getattr(tensor.dtype, "__name__", tensor.dtype)), list(tensor.shape or [])

    return ModelSummary(
        nodes=sum(ops.values()),
        ops=dict(ops.most_common()),
        parameters=model.parameter_count(),
        size_bytes=model_size_bytes(model) if size_bytes is None else size_bytes,
        inputs=[spec(t) for t in model.graph.inputs],
        outputs=[spec(t) for t in model.graph.outputs],
        opset=model.opset,
        macs=macs(model).by_op,
    )
