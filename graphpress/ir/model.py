"""`Model`: an onnx-graphsurgeon graph plus the model-level facts gs does not keep.

Passes edit `model.graph` (a `gs.Graph`) directly, using the queries here for the questions every pass
asks (who produces this tensor, who consumes it, is it a constant and what is its value). The model-level
fields (metadata, doc strings, model version, node doc strings) are kept beside the graph so that
load -> save is lossless.
"""

from __future__ import annotations

import base64
import itertools
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

#: doc_string prefix that marks a node made by a graphpress rewrite rule
PROVENANCE_PREFIX = "graphpress:"


class Model:
    """A graph being optimized, with the facts needed to write it back out unchanged."""

    def __init__(self, graph: gs.Graph, proto_fields: dict | None = None, node_docs: dict | None = None):
        self.graph = graph
        # model-level ModelProto fields that gs does not carry (metadata_props, doc_string, ...)
        self.proto_fields = dict(proto_fields or {})
        # node name -> doc_string (gs nodes carry no doc string); also where rewrite rules sign their nodes
        self.node_docs = dict(node_docs or {})
        self._name_counter = itertools.count()

    # ---- conversion -------------------------------------------------------------------------------
    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto) -> "Model":
        graph = gs.import_onnx(_type_attributes_as_text(proto))
        fields = {
            "doc_string": proto.doc_string,
            "domain": proto.domain,
            "model_version": proto.model_version,
            "metadata_props": [(p.key, p.value) for p in proto.metadata_props],
        }
        docs = {n.name: n.doc_string for n in proto.graph.node if n.doc_string and n.name}
        return cls(graph, fields, docs)

    def to_onnx(self) -> onnx.ModelProto:
        """Export to a ModelProto (the graph is not modified, not even topologically sorted)."""
        proto = _export_with_optional_types(self)
        _type_attributes_from_text(proto)
        if proto.ir_version < 4:
            _list_initializers_as_inputs(proto.graph)
        proto.doc_string = self.proto_fields.get("doc_string", "")
        proto.domain = self.proto_fields.get("domain", "")
        proto.model_version = self.proto_fields.get("model_version", 0)
        del proto.metadata_props[:]
        for key, value in self.proto_fields.get("metadata_props", []):
            proto.metadata_props.add(key=key, value=value)
        if self.node_docs:
            for node in proto.graph.node:
                if node.name in self.node_docs:
                    node.doc_string = self.node_docs[node.name]
        return proto

    def copy(self) -> "Model":
        """A deep copy, independent of this one (constants are copied too)."""
        return Model.from_onnx(self.to_onnx())

    # ---- queries ----------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        """The default-domain opset version."""
        return int(self.graph.opset)

    def nodes(self, op: str | tuple[str, ...] | None = None, recursive: bool = True) -> Iterator[gs.Node]:
        """Nodes of the graph (and, if `recursive`, of If/Loop/Scan subgraphs), optionally by op type."""
        ops = (op,) if isinstance(op, str) else op
        for graph in self.graphs() if recursive else [self.graph]:
            for node in list(graph.nodes):
                if ops is None or node.op in ops:
                    yield node

    def graphs(self) -> list[gs.Graph]:
        """The main graph followed by every nested subgraph, depth first."""
        found = [self.graph]

        def walk(graph: gs.Graph) -> None:
            for node in graph.nodes:
                for sub in _subgraphs(node):
                    found.append(sub)
                    walk(sub)

        walk(self.graph)
        return found

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        """The node that produces `tensor`, or None for graph inputs and constants."""
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    @staticmethod
    def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
        """The value of `tensor` if it is an initializer or the output of a Constant node, else None."""
        if isinstance(tensor, gs.Constant):
            return _values_of(tensor)
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is not None and producer.op == "Constant" and not producer.domain:
            return _constant_node_value(producer)
        return None

    # ---- naming -----------------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        """A tensor/node name not yet used in the model, derived from `base`."""
        taken = self._names()
        if base not in taken:
            return base
        while True:
            name = f"{base}_{next(self._name_counter)}"
            if name not in taken:
                return name

    def _names(self) -> set[str]:
        names = set()
        for graph in self.graphs():
            names.update(graph.tensors().keys())
            names.update(n.name for n in graph.nodes)
        return names

    def mark_made_by(self, node: gs.Node, rule: str) -> None:
        """Record on `node` (as its doc string) which rewrite rule created it."""
        self.node_docs[node.name] = f"{PROVENANCE_PREFIX} made by rule {rule}"

    # ---- whole-graph maintenance ------------------------------------------------------------------
    def cleanup(self) -> "Model":
        """Remove nodes and tensors that no graph output depends on, then sort topologically."""
        self.graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
        self.graph.toposort(recurse_subgraphs=True)
        return self

    def parameter_count(self) -> int:
        """Number of scalars in all initializers and Constant nodes (the model's parameters)."""
        total = 0
        for graph in self.graphs():
            for tensor in graph.tensors().values():
                if isinstance(tensor, gs.Constant):
                    total += int(np.prod(tensor.shape)) if tensor.shape is not None else 0
            for node in graph.nodes:
                if node.op == "Constant" and not node.domain:
                    value = _constant_node_value(node)
                    total += value.size if value is not None else 0
        return total

    def __repr__(self) -> str:
        return f"<Model {self.graph.name!r}: {len(self.graph.nodes)} nodes, opset {self.graph.opset}>"


def in_default_domain(node: gs.Node) -> bool:
    """True for nodes of the standard ONNX operator set (gs leaves the domain of built nodes as None)."""
    return node.domain in (None, "", "ai.onnx")


def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    subs = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            subs.append(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], gs.Graph):
            subs.extend(value)  # a GRAPHS attribute holds only graphs; checking the first is enough
    return subs


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return _values_of(value) if isinstance(value, gs.Constant) else np.asarray(value)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    return None  # sparse_value / string values: not treated as foldable constants


def _values_of(constant: gs.Constant) -> np.ndarray:
    """The constant's values. Tensors numpy cannot hold exactly (strings, bfloat16, float8, int4) are
    decoded without replacing the stored protobuf: gs would otherwise re-encode the decoded array on
    export, which fails for strings and silently changes the type of the others."""
    stored = constant._values
    if isinstance(stored, LazyValues):
        numpy_type = onnx.helper.tensor_dtype_to_np_dtype(stored.tensor.data_type)
        if numpy_type.kind not in "biufc?":
            return np.asarray(stored.load())
    return np.asarray(constant.values)


#: numpy (ml_dtypes) types that ONNX stores packed, several values per byte
SUB_BYTE_TYPES = ("int4", "uint4", "float4_e2m1fn")


def _pack_sub_byte_constants(model: "Model") -> None:
    """Hand gs the TensorProto of every loaded 4-bit constant: gs writes a constant's numpy bytes as
    its raw data, one byte per value, which ONNX rejects for 4-bit types (two values per byte)."""
    for graph in model.graphs():
        for tensor in graph.tensors().values():
            if (isinstance(tensor, gs.Constant) and not isinstance(tensor._values, LazyValues)
                    and np.dtype(tensor.dtype).name in SUB_BYTE_TYPES):
                tensor._values = LazyValues(onnx.numpy_helper.from_array(np.asarray(tensor.values), tensor.name))


def _export_with_optional_types(model: "Model") -> onnx.ModelProto:
    """`gs.export_onnx`, which fails on optional-typed inputs/outputs/values (gs imports them with the
    element's TypeProto as dtype but cannot write them back): those are exported untyped, then their
    optional type is written into the ValueInfoProtos by name. 4-bit constants are packed first."""
    _pack_sub_byte_constants(model)
    optional = {t.name: t for g in model.graphs() for t in g.tensors().values()
                if isinstance(t, gs.Variable) and getattr(t, "type", None) == "optional_type"}
    element_types = {name: t.dtype for name, t in optional.items()}
    for tensor in optional.values():
        tensor.dtype = None
    try:
        proto = gs.export_onnx(model.graph, do_type_check=False)
    finally:
        for name, tensor in optional.items():
            tensor.dtype = element_types[name]
    if element_types:
        for graph in _graph_protos(proto.graph):
            for info in list(graph.input) + list(graph.output) + list(graph.value_info):
                element = element_types.get(info.name)
                if isinstance(element, onnx.TypeProto):
                    info.type.optional_type.elem_type.CopyFrom(element)
    return proto


def _graph_protos(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """`graph` and every subgraph in its nodes' attributes, depth first."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found.extend(_graph_protos(sub))
    return found


#: gs drops TYPE_PROTO attributes (e.g. Optional's `type`); they travel through gs as strings with this prefix
TYPE_ATTRIBUTE_PREFIX = "graphpress-type-proto:"


def _type_attributes_as_text(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto`, or a copy whose TYPE_PROTO attributes are base64 strings gs keeps (see `_type_attributes_from_text`)."""
    def typed(graph: onnx.GraphProto):
        return [a for g in _graph_protos(graph) for n in g.node for a in n.attribute
                if a.type == onnx.AttributeProto.TYPE_PROTO]

    if not typed(proto.graph):
        return proto
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for attr in typed(proto.graph):
        text = TYPE_ATTRIBUTE_PREFIX + base64.b64encode(attr.tp.SerializeToString()).decode("ascii")
        attr.ClearField("tp")
        attr.type = onnx.AttributeProto.STRING
        attr.s = text.encode("ascii")
    return proto


def _type_attributes_from_text(proto: onnx.ModelProto) -> None:
    """Turn the prefixed strings written by `_type_attributes_as_text` back into TYPE_PROTO attributes."""
    prefix = TYPE_ATTRIBUTE_PREFIX.encode("ascii")
    for graph in _graph_protos(proto.graph):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.STRING and attr.s.startswith(prefix):
                    type_proto = onnx.TypeProto.FromString(base64.b64decode(attr.s[len(prefix):]))
                    attr.ClearField("s")
                    attr.type = onnx.AttributeProto.TYPE_PROTO
                    attr.tp.CopyFrom(type_proto)


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR < 4 requires every initializer to be a graph input as well; gs drops them from the inputs."""
    listed = {i.name for i in graph.input}
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer if t.name not in listed)
