"""Carry out a pruning plan on the graph: slice every member, fix attributes and shapes that follow the
channel counts (depthwise `group`, Reshape targets, Split sizes), and update the tensors' shapes.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from .groups import ChannelGraph, Fixup
from .plan import keep_masks
from .weights import replace_constant, slice_input


def apply_plan(model: Model, cg: ChannelGraph, plan: np.ndarray) -> list[np.ndarray]:
    """Remove the planned channels from `model` (the graph `cg` was built on). Returns the keep mask of
    every space."""
    masks = keep_masks(cg, plan)
    cuts: dict[tuple[int, int], list] = defaultdict(list)
    nodes: dict[int, gs.Node] = {}
    for member in cg.members:
        mask = masks[member.space]
        if not mask.all():
            cuts[(id(member.node), member.input_index)].append((member.axis, mask))
            nodes[id(member.node)] = member.node
    for (node_id, index), node_cuts in cuts.items():
        slice_input(model, nodes[node_id], index, _merge_axes(node_cuts))
    for fixup in cg.fixups:
        if not all(masks[s].all() for s in fixup.spaces):
            _FIXUPS[fixup.kind](model, fixup, [masks[s] for s in fixup.spaces])
    for space, mask in zip(cg.spaces, masks):
        if not mask.all() and space.tensor.shape is not None and len(space.tensor.shape) > space.axis:
            shape = list(space.tensor.shape)
            shape[space.axis] = int(mask.sum())
            space.tensor.shape = shape
    return masks


def _merge_axes(cuts: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """One mask per axis (two members on the same axis of one parameter must agree)."""
    merged: dict[int, np.ndarray] = {}
    for axis, mask in cuts:
        merged[axis] = mask if axis not in merged else merged[axis] & mask
    return sorted(merged.items())


def _fix_group(model: Model, fixup: Fixup, masks: list[np.ndarray]) -> None:
    fixup.node.attrs["group"] = int(masks[0].sum())


def _fix_reshape(model: Model, fixup: Fixup, masks: list[np.ndarray]) -> None:
    target = np.array(model.constant_value(fixup.node.inputs[1]))
    target[fixup.axis] = int(masks[0].sum())
    replace_constant(model, fixup.node, 1, target)


def _fix_split(model: Model, fixup: Fixup, masks: list[np.ndarray]) -> None:
    node = fixup.node
    sizes = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    node.attrs.pop("num_outputs", None)
    if model.opset >= 13:
        node.attrs.pop("split", None)
        constant = gs.Constant(model.unique_name(f"{node.name or 'split'}_sizes"), sizes)
        if len(node.inputs) > 1:
            node.inputs[1] = constant
        else:
            node.inputs.append(constant)
    else:
        node.attrs["split"] = sizes.tolist()


_FIXUPS = {"group": _fix_group, "reshape": _fix_reshape, "split": _fix_split}
