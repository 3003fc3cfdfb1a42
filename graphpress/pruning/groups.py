"""Channel-dependency analysis on an ONNX graph: which channels must be removed together.

Every activation tensor that carries prunable channels gets a *space*: one axis of that tensor (the
channel axis, wherever a Transpose or Reshape moved it) whose positions are numbered globally. Ops tie
positions of different spaces together (a union-find over positions):

- element-wise ops, activations, BatchNormalization, pooling, Pad, QDQ: input position j is output
  position j; residual Add/Mul/Sub/Max/... tie *all* their inputs and the output together;
- Concat / Split on the channel axis: position j of input k is output position offset_k + j;
- depthwise Conv (group == input channels, multiplier m): output c*m+i is input c;
- Transpose moves the axis; Flatten/Reshape/Squeeze/Unsqueeze map each position of the output axis that
  holds the channels to the channel it came from (flatten -> Gemm: channel c owns H*W features).

An equivalence class of positions (a *channel*) can be removed on its own: every tensor loses those
positions, producers lose output rows, consumers lose input columns, per-channel parameters lose entries.
Channels written by the same set of producer layers form a *group* (a Conv and the residual stream it
feeds, with its depthwise block and consumers): the unit for importance, ratios and the report.

A channel is *frozen* (never removed) when removing it would change the model's interface or cannot be
expressed: it reaches a graph output or input, an unknown op, a channel-mixing Reshape, a Softmax or
normalization over channels, a grouped Conv's input, a Slice along the channel axis, ... The reason is
kept and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from ..ir.model import in_default_domain
from .weights import is_sliceable, weight_shape

#: ops whose output 0 has the input 0's channels unchanged, whatever the channel axis
ELEMENTWISE_UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Gelu",
    "Softplus", "Softsign", "Mish", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Identity", "Dropout", "Cast", "Clip", "ThresholdedRelu", "Sin", "Cos", "Not",
    "QuantizeLinear", "DequantizeLinear", "IsNaN", "IsInf",
}
#: the element-wise non-linearities (a group whose channels pass one is `activated`)
ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
               "Gelu", "Softplus", "Softsign", "Mish", "Clip", "ThresholdedRelu"}
#: ops over the spatial axes of an NCHW tensor: channels pass through on axis 1 only
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
           "InstanceNormalization", "Resize", "Upsample"}
#: element-wise ops with several tensor inputs, broadcast numpy-style
ELEMENTWISE_NARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Equal", "Greater", "Less",
                    "And", "Or", "Xor", "Where", "BitShift", "Mod"}
#: ops that only change the layout (the channels are found again from static shapes)
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass
class Space:
    """One axis of one tensor that carries channels; its positions are numbered from `start`."""

    tensor: gs.Tensor
    axis: int
    size: int
    start: int

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)


@dataclass(frozen=True)
class Member:
    """A parameter axis aligned with a space: index j of `node.inputs[input_index]` along `axis` is
    position j of `space`. `role` is "out" (a layer's output channels), "in" (a layer's input channels)
    or "param" (a per-channel parameter: BN statistics, a bias, a per-channel scale)."""

    node: gs.Node
    input_index: int
    axis: int
    space: int
    role: str


@dataclass(frozen=True)
class Fixup:
    """An attribute or shape constant that must follow the channel counts: `kind` is "group"
    (depthwise Conv: group = input channels), "reshape" (shape constant entry `axis` = output space
    size) or "split" (split sizes = output space sizes)."""

    node: gs.Node
    kind: str
    spaces: tuple[int, ...]
    axis: int = 0


@dataclass
class Layer:
    """A node that does MACs, with the spaces its work scales with (None: not pruned there)."""

    node: gs.Node
    out_space: int | None
    in_space: int | None


@dataclass
class Group:
    """Channels that are pruned by the same rule: they come from the same producer layers (a Conv and
    its residual partners; a producer split into several consumers stays one group).

    `classes` are the channel ids (union-find roots); `blocks` > 1 asks for the same number of channels
    removed from each of that many equal slices of `block_space` (a grouped Conv's output groups).
    """

    id: int
    name: str
    classes: np.ndarray
    spaces: tuple[int, ...]
    frozen: str | None = None
    block_space: int | None = None
    blocks: int = 1
    #: how many layers write these channels (more than one: a residual stream joined by Add/Sub/...)
    writers: int = 1
    #: the channels pass an activation (not a linear bottleneck going straight from one layer to the next)
    activated: bool = False

    @property
    def size(self) -> int:
        return len(self.classes)


@dataclass
class ChannelGraph:
    """The result of the analysis: spaces, members, fixups, layers, and the groups built from them."""

    spaces: list[Space] = field(default_factory=list)
    by_tensor: dict[str, int] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    fixups: list[Fixup] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    #: position -> union-find parent
    parent: list[int] = field(default_factory=list)
    #: position -> why it may not be removed
    frozen: dict[int, str] = field(default_factory=dict)
    #: space id -> number of equal blocks (grouped Conv output)
    blocks: dict[int, int] = field(default_factory=dict)
    #: root layer name of each space (the node whose output channels started it)
    origin: dict[int, str] = field(default_factory=dict)
    #: spaces that are a layer's output channels (Conv, Gemm, MatMul, ConvTranspose)
    roots: set[int] = field(default_factory=set)
    groups: list[Group] = field(default_factory=list)
    #: position -> channel id (class root), filled by `finish`
    channel_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def total(self) -> int:
        return len(self.parent)

    # ---- union-find -----------------------------------------------------------------------------------
    def new_space(self, tensor: gs.Tensor, axis: int, size: int, origin: str = "") -> int:
        sid = len(self.spaces)
        start = len(self.parent)
        self.spaces.append(Space(tensor, axis, size, start))
        self.parent.extend(range(start, start + size))
        self.by_tensor[tensor.name] = sid
        self.origin[sid] = origin
        return sid

    def find(self, p: int) -> int:
        parent = self.parent
        root = p
        while parent[root] != root:
            root = parent[root]
        while parent[p] != root:
            parent[p], p = root, parent[p]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def tie(self, a: int, b: int, offset: int = 0, index_map: np.ndarray | None = None) -> None:
        """Tie space b's positions to space a's: b[j] ~ a[offset + j], or b[j] ~ a[index_map[j]]."""
        sa, sb = self.spaces[a], self.spaces[b]
        source = index_map if index_map is not None else np.arange(sb.size) + offset
        for j, i in enumerate(source):
            self.union(sa.start + int(i), sb.start + j)

    def freeze_space(self, sid: int, reason: str) -> None:
        space = self.spaces[sid]
        for p in range(space.start, space.start + space.size):
            self.frozen.setdefault(p, reason)

    # ---- results --------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Resolve channel ids and build the groups (called once the whole graph is analysed)."""
        self.channel_of = np.array([self.find(p) for p in range(self.total)], dtype=np.int64)
        frozen_channels: dict[int, str] = {}
        for p, reason in self.frozen.items():
            frozen_channels.setdefault(int(self.channel_of[p]), reason)
        touched: dict[int, set[int]] = {}
        for sid, space in enumerate(self.spaces):
            for c in set(self.channel_of[space.start:space.start + space.size].tolist()):
                touched.setdefault(c, set()).add(sid)
        by_signature: dict[tuple, list[int]] = {}
        writers: dict[tuple, int] = {}
        for channel, sids in sorted(touched.items()):
            producers = sids & self.roots or sids
            key = (tuple(sorted(producers)), channel in frozen_channels)
            writers[key] = len(sids & self.roots)
            by_signature.setdefault(key, []).append(channel)
        for key, channels in by_signature.items():
            classes = np.array(channels, dtype=np.int64)
            sids = tuple(sorted(set().union(*(touched[c] for c in channels))))
            reason = frozen_channels[channels[0]] if key[1] else None
            activated = any(p.op in ACTIVATIONS for sid in sids for p in self.spaces[sid].tensor.inputs)
            group = Group(len(self.groups), self._group_name(sids), classes, sids, frozen=reason,
                          writers=writers[key], activated=activated)
            for sid in sids:
                if sid in self.blocks:
                    group.block_space, group.blocks = sid, self.blocks[sid]
            self.groups.append(group)

    def _group_name(self, sids: tuple[int, ...]) -> str:
        names = [self.origin[s] for s in sids if self.origin.get(s)]
        return names[0] if names else self.spaces[sids[0]].tensor.name

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is None]

    def space_of(self, tensor: gs.Tensor) -> int | None:
        return self.by_tensor.get(tensor.name)


def analyze(model: Model, shapes: dict[str, tuple]) -> ChannelGraph:
    """Build the channel graph of `model`'s main graph; `shapes` maps tensor names to inferred shapes."""
    analyzer = _Analyzer(model, shapes)
    for node in model.graph.nodes:
        analyzer.visit(node)
    analyzer.freeze_interface()
    analyzer.cg.finish()
    return analyzer.cg


class _Analyzer:
    """Walks the nodes in graph (topological) order, applying one rule per op type."""

    def __init__(self, model: Model, shapes: dict[str, tuple]):
        self.model = model
        self.shapes = shapes
        self.cg = ChannelGraph()
        self.main_nodes = {id(n) for n in model.graph.nodes}

    # ---- helpers ----------------------------------------------------------------------------------------
    def space(self, tensor: gs.Tensor) -> int | None:
        return self.cg.space_of(tensor) if tensor.name else None

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shapes.get(tensor.name)
        if shape is None and isinstance(tensor, gs.Constant):
            shape = tensor.shape
        return len(shape) if shape is not None else None

    def dim(self, tensor: gs.Tensor, axis: int) -> int | None:
        shape = self.shapes.get(tensor.name)
        if shape is None and isinstance(tensor, gs.Constant):
            shape = tensor.shape
        if shape is None or axis >= len(shape):
            return None
        d = shape[axis]
        return d if isinstance(d, int) and d >= 0 else None

    def const(self, tensor: gs.Tensor) -> np.ndarray | None:
        return self.model.constant_value(tensor) if tensor.name else None

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            sid = self.space(t)
            if sid is not None:
                self.cg.freeze_space(sid, f"{reason} ({node.op} {node.name!r})")

    def same_space(self, tensor: gs.Tensor, sid: int, axis: int | None = None) -> int:
        """Give `tensor` a space tied position-for-position to space `sid` (on `axis`)."""
        source = self.cg.spaces[sid]
        existing = self.space(tensor)
        if existing is not None:
            if self.cg.spaces[existing].axis == (source.axis if axis is None else axis) \
                    and self.cg.spaces[existing].size == source.size:
                self.cg.tie(sid, existing)
                return existing
            self.cg.freeze_space(sid, f"{tensor.name!r} carries the channels on two axes")
            return existing
        new = self.cg.new_space(tensor, source.axis if axis is None else axis, source.size,
                                self.cg.origin.get(sid, ""))
        self.cg.tie(sid, new)
        return new

    def foreign_space(self, tensor: gs.Tensor, axis: int, size: int, reason: str) -> int:
        """A frozen space for a tensor whose channels come from something that cannot be pruned."""
        sid = self.space(tensor)
        if sid is None:
            sid = self.cg.new_space(tensor, axis, size)
        self.cg.freeze_space(sid, reason)
        return sid

    def channel_param(self, node: gs.Node, index: int, out_rank: int, axis: int, sid: int) -> bool:
        """Record a constant input broadcast against a tensor with channels on `axis` (of rank `out_rank`):
        True if it is a per-channel parameter (a member) or a broadcast scalar along the axis; False if it
        cannot follow the pruning."""
        value = self.const(node.inputs[index])
        if value is None:
            return False
        param_axis = axis - (out_rank - value.ndim)
        if param_axis < 0 or value.shape[param_axis] == 1:
            return True
        if value.shape[param_axis] != self.cg.spaces[sid].size or not is_sliceable(self.model, node.inputs[index]):
            return False
        self.cg.members.append(Member(node, index, param_axis, sid, "param"))
        return True

    # ---- dispatch ---------------------------------------------------------------------------------------
    def visit(self, node: gs.Node) -> None:
        if not in_default_domain(node):
            self.freeze_inputs(node, f"op {node.domain}.{node.op} is not understood")
            return
        rule = _RULES.get(node.op)
        if rule is None:
            if node.op in ELEMENTWISE_UNARY:
                rule = _Analyzer.unary
            elif node.op in SPATIAL:
                rule = _Analyzer.spatial
            elif node.op in ELEMENTWISE_NARY:
                rule = _Analyzer.nary
            elif node.op in RESHAPES:
                rule = _Analyzer.reshape
        if rule is None:
            if any(self.space(t) is not None for t in node.inputs):
                self.freeze_inputs(node, f"op {node.op} is not understood")
            return
        rule(self, node)

    def freeze_interface(self) -> None:
        """Graph outputs and inputs keep their shapes; channels consumed outside the main graph stay."""
        for tensor in self.model.graph.outputs:
            sid = self.space(tensor)
            if sid is not None:
                self.cg.freeze_space(sid, f"reaches graph output {tensor.name!r}")
        for sid, space in enumerate(self.cg.spaces):
            if any(id(n) not in self.main_nodes for n in space.tensor.outputs):
                self.cg.freeze_space(sid, f"{space.tensor.name!r} is used inside a subgraph")

    # ---- rules ------------------------------------------------------------------------------------------
    def unary(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0]) if node.inputs else None
        if sid is None:
            self.freeze_inputs(node, "channels enter through a non-data input")
            return
        axis = self.cg.spaces[sid].axis
        rank = self.rank(node.inputs[0])
        if node.op in ("QuantizeLinear", "DequantizeLinear", "PRelu"):
            if not self.unary_params(node, sid, axis, rank):
                self.freeze_inputs(node, "its parameters do not follow the channels")
                return
        elif any(self.space(t) is not None for t in node.inputs[1:]):
            self.freeze_inputs(node, "channels enter through a parameter input")
            return
        self.same_space(node.outputs[0], sid)

    def unary_params(self, node: gs.Node, sid: int, axis: int, rank: int | None) -> bool:
        if node.op == "PRelu":
            return rank is not None and self.channel_param(node, 1, rank, axis, sid)
        for index in (1, 2):  # scale, zero point: per-tensor, or per-channel along `axis`
            if index >= len(node.inputs) or not node.inputs[index].name:
                continue
            value = self.const(node.inputs[index])
            if value is None:
                return False
            if value.size == 1:
                continue
            q_axis = node.attrs.get("axis", 1)
            if rank is None or q_axis % rank != axis or value.ndim != 1:
                return False
            if value.shape[0] != self.cg.spaces[sid].size or not is_sliceable(self.model, node.inputs[index]):
                return False
            self.cg.members.append(Member(node, index, 0, sid, "param"))
        return True

    def spatial(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0])
        if sid is None:
            self.freeze_inputs(node, "channels enter through a non-data input")
            return
        if self.cg.spaces[sid].axis != 1:
            self.freeze_inputs(node, "it works across the channel axis")
            return
        if node.op in ("Resize", "Upsample"):
            scales = self.const(node.inputs[-1]) if node.op == "Upsample" or len(node.inputs) == 3 else None
            if scales is None or scales.ndim != 1 or len(scales) < 2 or scales[1] != 1:
                self.freeze_inputs(node, "it resizes by sizes or along channels")
                return
        if node.op == "InstanceNormalization":
            if not all(is_sliceable(self.model, node.inputs[index]) for index in (1, 2)):
                self.freeze_inputs(node, "its parameters are not constants")
                return
            for index in (1, 2):
                self.cg.members.append(Member(node, index, 0, sid, "param"))
        self.same_space(node.outputs[0], sid)

    def batchnorm(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0])
        if sid is None:
            self.freeze_inputs(node, "channels enter through a parameter input")
            return
        if self.cg.spaces[sid].axis != 1 or not all(
                self.const(t) is not None and is_sliceable(self.model, t) for t in node.inputs[1:5]):
            self.freeze_inputs(node, "BatchNormalization with non-constant parameters or channels off axis 1")
            return
        for index in range(1, 5):
            self.cg.members.append(Member(node, index, 0, sid, "param"))
        self.same_space(node.outputs[0], sid)

    def nary(self, node: gs.Node) -> None:
        tracked = [(i, t) for i, t in enumerate(node.inputs) if t.name and self.space(t) is not None]
        if not tracked:
            return
        out = node.outputs[0]
        out_rank = self.rank(out) or max((self.rank(t) or 0) for t in node.inputs)
        axes = {self.cg.spaces[self.space(t)].axis + out_rank - (self.rank(t) or out_rank) for _, t in tracked}
        sizes = {self.cg.spaces[self.space(t)].size for _, t in tracked}
        if len(axes) != 1 or len(sizes) != 1 or node.op == "Where" and tracked[0][0] == 0:
            self.freeze_inputs(node, "its inputs carry channels on different axes")
            return
        axis, size = axes.pop(), sizes.pop()
        first = self.space(tracked[0][1])
        out_sid = self.same_space(out, first, axis)
        for index, tensor in enumerate(node.inputs):
            if not tensor.name:
                continue
            sid = self.space(tensor)
            if sid is not None:
                self.cg.tie(out_sid, sid)
                continue
            if self.const(tensor) is not None:
                if not self.channel_param(node, index, out_rank, axis, out_sid):
                    self.cg.freeze_space(out_sid, f"constant {tensor.name!r} does not follow the channels "
                                                  f"({node.op} {node.name!r})")
                continue
            t_rank = self.rank(tensor)
            t_axis = axis - (out_rank - t_rank) if t_rank is not None else -1
            t_dim = self.dim(tensor, t_axis) if t_axis >= 0 else (1 if t_rank is not None else None)
            if t_dim == 1:
                continue  # broadcast along the channels
            other = self.foreign_space(tensor, max(t_axis, 0), size,
                                       f"{tensor.name!r} comes from an input or op that cannot be pruned")
            self.cg.tie(out_sid, other)

    def concat(self, node: gs.Node) -> None:
        tracked = [t for t in node.inputs if self.space(t) is not None]
        if not tracked:
            return
        rank = self.rank(node.outputs[0]) or self.rank(tracked[0])
        axis = node.attrs.get("axis", 1) % rank if rank else None
        channel_axes = {self.cg.spaces[self.space(t)].axis for t in tracked}
        if axis is None or len(channel_axes) != 1:
            self.freeze_inputs(node, "inputs carry channels on different axes")
            return
        channel_axis = channel_axes.pop()
        if axis != channel_axis:
            self.nary(node)
            return
        sizes = []
        for t in node.inputs:
            sid = self.space(t)
            sizes.append(self.cg.spaces[sid].size if sid is not None else self.dim(t, axis))
        if any(s is None for s in sizes):
            self.freeze_inputs(node, "an input's channel count is unknown")
            return
        out_sid = self.cg.new_space(node.outputs[0], axis, sum(sizes),
                                    self.cg.origin.get(self.space(tracked[0]), ""))
        offset = 0
        for t, size in zip(node.inputs, sizes):
            sid = self.space(t)
            if sid is None:
                sid = self.foreign_space(t, axis, size, f"{t.name!r} comes from an input or op that cannot be pruned")
            self.cg.tie(out_sid, sid, offset)
            offset += size

    def split(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0])
        if sid is None:
            self.freeze_inputs(node, "channels enter through the split sizes")
            return
        space = self.cg.spaces[sid]
        rank = self.rank(node.inputs[0])
        axis = node.attrs.get("axis", 0) % rank if rank else None
        if axis != space.axis:
            for out in node.outputs:
                self.same_space(out, sid)
            return
        sizes = [self.dim(t, axis) for t in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != space.size:
            self.freeze_inputs(node, "split sizes are unknown")
            return
        offset, outs = 0, []
        for t, size in zip(node.outputs, sizes):
            out = self.cg.new_space(t, axis, size, self.cg.origin.get(sid, ""))
            self.cg.tie(sid, out, offset)
            outs.append(out)
            offset += size
        self.cg.fixups.append(Fixup(node, "split", tuple(outs)))

    def keeps_channels(self, node: gs.Node) -> None:
        """Slice / Pad: the channels pass through when the channel axis keeps its size."""
        sid = self.space(node.inputs[0])
        if sid is None:
            self.freeze_inputs(node, f"channels enter through a {node.op} parameter")
            return
        axis = self.cg.spaces[sid].axis
        fill = node.inputs[2] if node.op == "Pad" and len(node.inputs) > 2 and node.inputs[2].name else None
        fill_value = self.const(fill) if fill is not None else None
        if self.dim(node.outputs[0], axis) != self.cg.spaces[sid].size or (
                fill is not None and (fill_value is None or fill_value.size > 1)):
            self.freeze_inputs(node, f"{node.op} changes the channel axis")
            return
        self.same_space(node.outputs[0], sid)

    def transpose(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0])
        if sid is None:
            return
        rank = self.rank(node.inputs[0])
        perm = list(node.attrs.get("perm", list(range(rank - 1, -1, -1)) if rank else []))
        axis = self.cg.spaces[sid].axis
        if axis not in perm:
            self.freeze_inputs(node, "unknown permutation")
            return
        self.same_space(node.outputs[0], sid, perm.index(axis))

    def reshape(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0])
        if sid is None:
            return
        space = self.cg.spaces[sid]
        out = node.outputs[0]
        mapping = _reshape_channel_map(self.shapes.get(node.inputs[0].name), self.shapes.get(out.name),
                                       space.axis, space.size)
        if mapping is None:
            self.freeze_inputs(node, "the reshape mixes the channels with other axes")
            return
        out_axis, channel_of_index = mapping
        out_sid = self.cg.new_space(out, out_axis, len(channel_of_index), self.cg.origin.get(sid, ""))
        self.cg.tie(sid, out_sid, index_map=channel_of_index)
        if node.op == "Reshape":
            target = self.const(node.inputs[1])
            if target is None or not is_sliceable(self.model, node.inputs[1]):
                self.freeze_inputs(node, "its target shape is not a constant")
                return
            if target[out_axis] > 0:
                self.cg.fixups.append(Fixup(node, "reshape", (out_sid,), out_axis))

    def reduce(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0])
        if sid is None:
            return
        rank = self.rank(node.inputs[0])
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            value = self.const(node.inputs[1])
            axes = None if value is None else value.tolist()
        axis = self.cg.spaces[sid].axis
        if rank is None or axes is None or axis in [a % rank for a in axes]:
            self.freeze_inputs(node, "it reduces over the channels")
            return
        keep = node.attrs.get("keepdims", 1)
        out_axis = axis if keep else axis - sum(1 for a in axes if a % rank < axis)
        self.same_space(node.outputs[0], sid, out_axis)

    def softmax_like(self, node: gs.Node) -> None:
        sid = self.space(node.inputs[0])
        if sid is None:
            return
        rank = self.rank(node.inputs[0])
        channel_axis = self.cg.spaces[sid].axis
        if rank is None:
            self.freeze_inputs(node, "unknown rank")
            return
        axis = node.attrs.get("axis", -1 if node.op == "LayerNormalization" or self.model.opset >= 13 else 1) % rank
        # LayerNormalization, and Softmax before opset 13, work over all axes from `axis` on
        flattens = node.op == "LayerNormalization" or self.model.opset < 13
        if channel_axis == axis or (flattens and channel_axis >= axis):
            self.freeze_inputs(node, "it normalizes across the channels")
            return
        self.same_space(node.outputs[0], sid)

    # ---- layers (MAC nodes) -----------------------------------------------------------------------------
    def conv_input(self, node: gs.Node) -> tuple[bool, int | None]:
        """For Conv / ConvTranspose: (weights and bias are sliceable constants, the input's space on axis 1)."""
        params = [t for t in node.inputs[1:3] if t.name]
        if not all(is_sliceable(self.model, t) for t in params):
            self.freeze_inputs(node, "its weights are not constants")
            return False, None
        in_sid = self.space(node.inputs[0])
        if in_sid is not None and self.cg.spaces[in_sid].axis != 1:
            self.freeze_inputs(node, "channels are not on axis 1")
            in_sid = None
        return True, in_sid

    def conv(self, node: gs.Node) -> None:
        ok, in_sid = self.conv_input(node)
        if not ok:
            return
        w_shape = weight_shape(self.model, node.inputs[1])
        group = node.attrs.get("group", 1)
        c_in = w_shape[1] * group
        if group > 1 and group == c_in:
            self.depthwise(node, in_sid, w_shape)
            return
        out_sid = self.cg.new_space(node.outputs[0], 1, w_shape[0], node.name)
        self.add_outputs(node, out_sid, weight_axis=0)
        self.cg.roots.add(out_sid)
        if group == 1:
            if in_sid is not None:
                self.cg.members.append(Member(node, 1, 1, in_sid, "in"))
        else:
            if in_sid is not None:
                self.cg.freeze_space(in_sid, f"input of grouped Conv {node.name!r} (group={group})")
            self.cg.blocks[out_sid] = group
        self.cg.layers.append(Layer(node, out_sid, in_sid if group == 1 else None))

    def depthwise(self, node: gs.Node, in_sid: int | None, w_shape: tuple) -> None:
        c_in = w_shape[1] * node.attrs.get("group", 1)
        multiplier = w_shape[0] // c_in
        if in_sid is None:
            in_sid = self.foreign_space(node.inputs[0], 1, c_in,
                                        f"input of depthwise Conv {node.name!r} cannot be pruned")
        out_sid = self.cg.new_space(node.outputs[0], 1, w_shape[0], self.cg.origin.get(in_sid) or node.name)
        self.cg.tie(in_sid, out_sid, index_map=np.arange(w_shape[0]) // multiplier)
        self.add_outputs(node, out_sid, weight_axis=0, role="param")
        self.cg.fixups.append(Fixup(node, "group", (in_sid,)))
        self.cg.layers.append(Layer(node, out_sid, None))

    def add_outputs(self, node: gs.Node, out_sid: int, weight_axis: int, role: str = "out") -> None:
        self.cg.members.append(Member(node, 1, weight_axis, out_sid, role))
        if len(node.inputs) > 2 and node.inputs[2].name:
            self.cg.members.append(Member(node, 2, 0, out_sid, "param"))

    def conv_transpose(self, node: gs.Node) -> None:
        if node.attrs.get("group", 1) != 1 or "output_shape" in node.attrs:
            self.freeze_inputs(node, "grouped ConvTranspose or explicit output_shape")
            return
        ok, in_sid = self.conv_input(node)
        if not ok:
            return
        w_shape = weight_shape(self.model, node.inputs[1])
        out_sid = self.cg.new_space(node.outputs[0], 1, w_shape[1], node.name)
        self.add_outputs(node, out_sid, weight_axis=1)
        self.cg.roots.add(out_sid)
        if in_sid is not None:
            self.cg.members.append(Member(node, 1, 0, in_sid, "in"))
        self.cg.layers.append(Layer(node, out_sid, in_sid))

    def gemm(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        in_sid = self.space(a)
        trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
        if self.space(b) is not None or not is_sliceable(self.model, b):
            self.freeze_inputs(node, "its weights are not constants")
            return
        if in_sid is not None and self.cg.spaces[in_sid].axis != (0 if trans_a else 1):
            self.freeze_inputs(node, "channels are not on the contracted axis")
            in_sid = None
        w_shape = weight_shape(self.model, b)
        n_out = w_shape[0] if trans_b else w_shape[1]
        out_sid = self.cg.new_space(node.outputs[0], 1, n_out, node.name)
        self.cg.roots.add(out_sid)
        self.cg.members.append(Member(node, 1, 0 if trans_b else 1, out_sid, "out"))
        if in_sid is not None:
            self.cg.members.append(Member(node, 1, 1 if trans_b else 0, in_sid, "in"))
        if len(node.inputs) > 2 and node.inputs[2].name:
            if not self.channel_param(node, 2, 2, 1, out_sid):
                self.cg.freeze_space(out_sid, f"bias of Gemm {node.name!r} is not a constant")
        self.cg.layers.append(Layer(node, out_sid, in_sid))

    def matmul(self, node: gs.Node) -> None:
        a, b = node.inputs
        in_sid = self.space(a)
        if self.space(b) is not None or not is_sliceable(self.model, b) \
                or len(weight_shape(self.model, b)) != 2:
            self.freeze_inputs(node, "its weights are not a constant matrix")
            return
        rank = self.rank(a)
        if in_sid is not None and (rank is None or self.cg.spaces[in_sid].axis != rank - 1):
            self.freeze_inputs(node, "channels are not on the contracted axis")
            in_sid = None
        w_shape = weight_shape(self.model, b)
        out_rank = self.rank(node.outputs[0]) or rank or 2
        out_sid = self.cg.new_space(node.outputs[0], out_rank - 1, w_shape[1], node.name)
        self.cg.roots.add(out_sid)
        self.cg.members.append(Member(node, 1, 1, out_sid, "out"))
        if in_sid is not None:
            self.cg.members.append(Member(node, 1, 0, in_sid, "in"))
        self.cg.layers.append(Layer(node, out_sid, in_sid))


_RULES = {
    "BatchNormalization": _Analyzer.batchnorm,
    "Concat": _Analyzer.concat,
    "Split": _Analyzer.split,
    "Slice": _Analyzer.keeps_channels,
    "Pad": _Analyzer.keeps_channels,
    "Transpose": _Analyzer.transpose,
    "Conv": _Analyzer.conv,
    "ConvTranspose": _Analyzer.conv_transpose,
    "Gemm": _Analyzer.gemm,
    "MatMul": _Analyzer.matmul,
    "Softmax": _Analyzer.softmax_like,
    "LogSoftmax": _Analyzer.softmax_like,
    "Hardmax": _Analyzer.softmax_like,
    "LayerNormalization": _Analyzer.softmax_like,
    **{op: _Analyzer.reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                                       "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")},
}


def _reshape_channel_map(in_shape, out_shape, axis: int, size: int) -> tuple[int, np.ndarray] | None:
    """Where the channels of axis `axis` of a tensor of `in_shape` land after a reshape to `out_shape`.

    Returns (output axis, channel of each index along it) when the channels end up on one output axis
    (possibly merged with neighbouring axes, as in a flatten), None when they are split across axes or
    the shapes are not known. A symbolic dimension is allowed only as an identical leading (batch) dim.
    """
    if in_shape is None or out_shape is None:
        return None
    in_dims, out_dims = list(in_shape), list(out_shape)
    if in_dims and out_dims and not isinstance(in_dims[0], int) and not isinstance(out_dims[0], int):
        if axis == 0:  # both lead with a (possibly renamed) batch dimension
            return None
        in_dims[0] = out_dims[0] = 1
    if any(not isinstance(d, int) or d < 0 for d in in_dims + out_dims):
        return None
    if in_dims[axis] != size or int(np.prod(in_dims)) != int(np.prod(out_dims)):
        return None
    stride_in = int(np.prod(in_dims[axis + 1:]))
    for out_axis, extent in enumerate(out_dims):
        stride_out = int(np.prod(out_dims[out_axis + 1:]))
        if stride_out <= stride_in and stride_in * size <= stride_out * extent \
                and stride_in % stride_out == 0 and (stride_out * extent) % (stride_in * size) == 0:
            if extent == 1 and size != 1:
                continue
            index = np.arange(extent)
            return out_axis, (index * stride_out // stride_in) % size
    return None
