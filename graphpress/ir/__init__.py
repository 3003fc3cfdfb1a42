"""graphpress's IR: ONNX graphs held as onnx-graphsurgeon graphs, with what passes need on top.

- `Model` (`model.graph` is a `gs.Graph`), `load`/`save` (atomic, >2 GB external data)
- `infer_shapes` tolerant of symbolic dims
- edits that keep the graph valid (`edit`)
- reference execution with onnxruntime and `compare(model_a, model_b, inputs=None)`
"""

from .edit import replace_uses, remove_node, insert_node_after, new_constant
from .activations import activation_batches, with_outputs
from .execute import compare, compare_outputs, random_inputs, run, session, model_size_bytes, Comparison
from .io import load, save
from .model import Model
from .shapes import infer_shapes, static_shape

__all__ = [
    "Model", "load", "save", "infer_shapes", "static_shape", "compare", "compare_outputs", "random_inputs",
    "run", "session", "model_size_bytes", "Comparison", "replace_uses", "remove_node", "insert_node_after",
    "new_constant", "activation_batches", "with_outputs",
]
