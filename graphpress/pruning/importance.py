"""How much each channel matters, scored over its whole dependency group.

A channel's score adds up the evidence from every parameter that loses an entry with it, so a residual
channel is judged by all the convolutions that write and read it, not by one layer (DepGraph's group
importance). Scores are only compared within a group.

- `l1` / `l2`: magnitude of the weight slices (producer rows, consumer columns, depthwise filters), each
  layer normalized by its mean so that a large layer does not drown out a small one;
- `bn`: |gamma| of the BatchNormalization scales in the group (falls back to `l1` for groups without BN);
- `activation`: data-driven: for every consumer of the channel, E[x_c^2] * ||W[:, c]||^2 on the
  calibration data, the expected squared contribution of the channel to the consumer's output;
- `reconstruction`: data-driven and aware of the re-fit: greedy elimination by the least-squares error
  the consumers keep after re-fitting (see `obs`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import GraphpressError
from ..ir import Model, activation_batches
from .groups import ChannelGraph, Member
from .weights import weight_value

CRITERIA = ("l1", "l2", "bn", "activation", "reconstruction")


def channel_scores(model: Model, cg: ChannelGraph, criterion: str,
                   calibration: Iterable[dict] | None = None) -> np.ndarray:
    """A score per channel id (indexed by union-find root; other entries are 0)."""
    if criterion not in CRITERIA:
        raise GraphpressError(f"prune-channels: unknown criterion {criterion!r} (choose {', '.join(CRITERIA)})")
    magnitude = _magnitude(model, cg, p=2 if criterion == "l2" else 1)
    if criterion in ("l1", "l2"):
        return magnitude
    if criterion == "bn":
        scores = _accumulate(cg, [(m, np.abs(weight_value(model, m.node.inputs[m.input_index])))
                                  for m in cg.members if m.node.op == "BatchNormalization" and m.input_index == 1])
        return _fallback(cg, scores, magnitude)
    if calibration is None:
        raise GraphpressError(f"prune-channels: criterion={criterion} needs calibration data")
    if criterion == "reconstruction":
        from .obs import reconstruction_scores
        return reconstruction_scores(model, cg, calibration)
    return _fallback(cg, _activation(model, cg, calibration), magnitude)


def per_position(value: np.ndarray, axis: int, p: int) -> np.ndarray:
    """L1 (p=1) or L2 (p=2) norm of each slice of `value` along `axis`."""
    moved = np.moveaxis(np.abs(value), axis, 0).reshape(value.shape[axis], -1)
    return moved.sum(axis=1) if p == 1 else np.sqrt((moved ** 2).sum(axis=1))


def _weight_members(cg: ChannelGraph) -> list[Member]:
    """Members that are weight slices (not biases or normalization statistics)."""
    return [m for m in cg.members if m.role in ("out", "in") or
            (m.role == "param" and m.input_index == 1 and m.node.op == "Conv")]


def _magnitude(model: Model, cg: ChannelGraph, p: int) -> np.ndarray:
    pieces = []
    for member in _weight_members(cg):
        norms = per_position(weight_value(model, member.node.inputs[member.input_index]), member.axis, p)
        mean = norms.mean()
        pieces.append((member, norms / mean if mean > 0 else norms))
    return _accumulate(cg, pieces)


def _accumulate(cg: ChannelGraph, pieces: list[tuple[Member, np.ndarray]]) -> np.ndarray:
    scores = np.zeros(cg.total)
    for member, per_pos in pieces:
        space = cg.spaces[member.space]
        np.add.at(scores, cg.channel_of[space.start:space.start + space.size], per_pos)
    return scores


def _fallback(cg: ChannelGraph, scores: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Use `fallback` for the groups where `scores` has no evidence at all."""
    result = scores.copy()
    for group in cg.groups:
        if not np.any(scores[group.classes]):
            result[group.classes] = fallback[group.classes]
    return result


def _activation(model: Model, cg: ChannelGraph, calibration: Iterable[dict]) -> np.ndarray:
    consumers = [m for m in cg.members if m.role == "in"]
    tensors = {cg.spaces[m.space].tensor.name: m.space for m in consumers}
    sums = {name: np.zeros(cg.spaces[sid].size) for name, sid in tensors.items()}
    count = 0
    for values in activation_batches(model, list(tensors), calibration, progress="activation importance"):
        for name, sid in tensors.items():
            x = np.moveaxis(np.asarray(values[name], dtype=np.float64), cg.spaces[sid].axis, 0)
            sums[name] += (x.reshape(x.shape[0], -1) ** 2).mean(axis=1)
        count += 1
    if count == 0:
        raise GraphpressError("prune-channels: the calibration data is empty")
    pieces = []
    for member in consumers:
        energy = sums[cg.spaces[member.space].tensor.name] / count
        w = weight_value(model, member.node.inputs[member.input_index])
        pieces.append((member, energy * per_position(w, member.axis, 2) ** 2))
    return _accumulate(cg, pieces)
