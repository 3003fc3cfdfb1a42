"""Data-driven channel selection that knows the consumers will be re-fitted (`criterion=reconstruction`).

For a consumer layer with input rows X (im2col for a Conv, plus a ones column for the bias) and weights
theta, the original output is Y = X theta. If the rows R of a channel are removed and theta is re-fitted
by least squares, the output error grows by exactly

    delta(R) = tr(theta_R^T [(A^-1)_RR]^-1 theta_R),     A = X^T X

(the Optimal Brain Surgeon step on the least-squares problem). A group's channels are eliminated
greedily: the channel whose removal costs least (summed over the group's consumers, each relative to its
output energy) goes first, then theta and A^-1 are updated as if it were gone, and so on. A channel's
score is its place in that order, so `select` removes the first ones eliminated. The summed costs along
the way are the group's error curve, which `plan.ratios_by_error` compares across groups. A consumer whose input
is too wide for a dense A (more than MAX_DIM rows), or seen on too few calibration rows to estimate it,
uses the diagonal of A, which is the `activation` criterion.

With `held_out`, every HOLDOUT_EVERY-th calibration batch (from the second) is left out of A, and the
error curve is measured on those batches instead: the error the re-fitted theta leaves on rows it was not
fitted on, tr(D^T A_held D) / tr(theta_0^T A_held theta_0) with D = theta - theta_0 (the original output
is X theta_0), at about CURVE_PROBES points per group and interpolated between them. A consumer seen on
few rows per input (MobileNetV2's 7x7 layers with 960 inputs) fits its calibration images so well that
its in-sample curve calls most of its channels free; the held-out curve does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model, activation_batches
from .groups import ChannelGraph, Group, Member
from .reconstruct import HOLDOUT_EVERY, LAYERS, MIN_ROWS_PER_UNKNOWN

#: widest consumer input (rows of theta) handled with a dense inverse
MAX_DIM = 4096
#: share of a group's channels ordered (the rest keep the highest scores)
MAX_SHARE = 0.95
#: rows sampled per calibration batch and consumer (per batch of the caller's data: augmented batches,
#: which hold copies of every image, get this many per copy)
ROWS_PER_BATCH = 2048
#: ridge added to A, relative to its mean diagonal
RIDGE = 1e-3
#: points per group at which a held-out error curve is measured
CURVE_PROBES = 32


@dataclass
class _Consumer:
    """One consumer's least-squares state during a group's elimination."""

    member: Member
    ainv: np.ndarray      # (D, D) inverse of A + ridge, or its diagonal (D,) when D > MAX_DIM
    theta: np.ndarray     # (D, outputs), the weights re-fitted for the channels removed so far
    channels: np.ndarray  # (n,) channel ids read by this consumer
    index: np.ndarray     # (n, b) rows of theta owned by each channel
    scale: float          # 1 / output energy, so consumers compare
    held: np.ndarray | None = None   # A (or its diagonal) of the held-out batches, for held-out curves
    theta0: np.ndarray | None = None  # the original weights
    alive: np.ndarray = None

    def __post_init__(self):
        self.alive = np.ones(len(self.channels), dtype=bool)

    def for_group(self, group: Group) -> "_Consumer":
        """A fresh copy restricted to the channels of `group` (others stay, never removed)."""
        mine = np.isin(self.channels, group.classes)
        return _Consumer(self.member, self.ainv.copy(), self.theta.copy(), self.channels[mine],
                         self.index[mine], self.scale, self.held, self.theta0)

    def held_out_error(self) -> float:
        """Relative output error of the current (re-fitted) theta on the held-out rows."""
        d = self.theta - self.theta0
        if self.held.ndim == 1:
            a_d, a_0 = self.held[:, None] * d, self.held[:, None] * self.theta0
        else:
            a_d, a_0 = self.held @ d, self.held @ self.theta0
        return float(np.sum(d * a_d) / max(np.sum(self.theta0 * a_0), 1e-30))

    def deltas(self) -> tuple[np.ndarray, np.ndarray]:
        """(channel ids still present, the output error each one's removal would add)."""
        idx = self.index[self.alive]
        t = self.theta[idx]                                  # (n, b, out)
        if self.ainv.ndim == 1:
            values = np.sum(t * t / np.maximum(self.ainv[idx], 1e-30)[..., None], axis=(1, 2))
        else:
            blocks = self.ainv[idx[:, :, None], idx[:, None, :]]   # (n, b, b)
            blocks = blocks + 1e-30 * np.eye(idx.shape[1])
            values = np.sum(t * np.linalg.solve(blocks, t), axis=(1, 2))
        return self.channels[self.alive], values * self.scale

    def remove(self, channel: int) -> None:
        hit = np.flatnonzero((self.channels == channel) & self.alive)
        if not len(hit):
            return
        self.alive[hit] = False
        r = self.index[hit].ravel()
        if self.ainv.ndim == 2:
            cols = self.ainv[:, r]
            inverse = np.linalg.inv(self.ainv[np.ix_(r, r)] + 1e-30 * np.eye(len(r)))
            self.theta -= cols @ (inverse @ self.theta[r])
            self.ainv -= cols @ inverse @ cols.T
            self.ainv[r, :] = 0
            self.ainv[:, r] = 0
        self.theta[r] = 0


#: the re-fitted weights of a group's consumers after removing k channels: (group id, k) -> [(node, theta)]
Refits = dict[tuple[int, int], list[tuple[gs.Node, np.ndarray]]]


@dataclass
class Elimination:
    """The greedy elimination of every prunable group.

    `scores`: per channel id, its rank in its group's order (low = removed first); `curves[g][k]`: the
    consumers' summed relative output error left after re-fitting with the first k channels of group g
    removed (inf beyond the ordered share); `refits`: re-fitted weights at the requested counts.
    """

    scores: np.ndarray
    curves: dict[int, np.ndarray]
    refits: Refits


def reconstruction_scores(model: Model, cg: ChannelGraph, calibration: Iterable[dict]) -> np.ndarray:
    """A score per channel id: its rank in the greedy elimination order of its group (low = first)."""
    return eliminate(model, cg, calibration).scores


def eliminate(model: Model, cg: ChannelGraph, calibration: Iterable[dict],
              snapshots: dict[int, list[int]] | None = None, rows_per_batch: int = ROWS_PER_BATCH,
              held_out: bool = False) -> Elimination:
    """Order every prunable group's channels, with the error curves (measured on held-out batches with
    `held_out`) and, for every k in `snapshots[g]`, the consumers' re-fitted weights of group g after
    removing k channels (what the sensitivity scan runs)."""
    consumers = _consumers(model, cg, calibration, rows_per_batch, held_out)
    result = Elimination(np.zeros(cg.total), {}, {})
    for group in cg.prunable():
        mine = [c.for_group(group) for c in consumers if c.member.space in group.spaces]
        rank, curve = _elimination_rank(group, mine, set((snapshots or {}).get(group.id, ())), result.refits)
        result.scores[group.classes] = rank
        result.curves[group.id] = curve
    return result


def _elimination_rank(group: Group, consumers: list[_Consumer], keep_at: set[int],
                      refits: Refits) -> tuple[np.ndarray, np.ndarray]:
    channels = group.classes
    rank = np.full(len(channels), float(len(channels)))
    curve = np.full(len(channels) + 1, np.inf)
    curve[0] = 0.0
    if not consumers:
        return rank, curve
    position = {int(c): i for i, c in enumerate(channels)}
    removed = np.zeros(len(channels), dtype=bool)
    held_out = all(c.held is not None for c in consumers)
    stride, probes = max(1, len(channels) // CURVE_PROBES), [(0, 0.0)]
    for step in range(int(len(channels) * MAX_SHARE) + 1):
        cost = _group_costs(consumers, position, len(channels))
        cost[removed] = np.inf
        if step == int(len(channels) * MAX_SHARE):
            # the channels never eliminated keep their order by the last costs
            rest = np.flatnonzero(~removed)
            rank[rest[np.argsort(cost[rest], kind="stable")]] = step + np.arange(len(rest))
            if held_out:
                known, values = zip(*probes)
                curve[:known[-1] + 1] = np.interp(np.arange(known[-1] + 1), known, values)
                curve[known[-1] + 1:] = np.inf
            break
        chosen = int(np.argmin(cost))
        removed[chosen] = True
        rank[chosen] = step
        curve[step + 1] = curve[step] + cost[chosen]
        for consumer in consumers:
            consumer.remove(int(channels[chosen]))
        if held_out and (step + 1) % stride == 0:
            probes.append((step + 1, sum(c.held_out_error() for c in consumers)))
        if step + 1 in keep_at:
            refits[(group.id, step + 1)] = [(c.member.node, c.theta.copy()) for c in consumers]
    return rank, curve


def _group_costs(consumers: list[_Consumer], position: dict[int, int], size: int) -> np.ndarray:
    cost = np.zeros(size)
    for consumer in consumers:
        ids, values = consumer.deltas()
        np.add.at(cost, [position[int(c)] for c in ids], values)
    return cost


def _consumers(model: Model, cg: ChannelGraph, calibration: Iterable[dict], rows_per_batch: int,
               held_out: bool = False) -> list[_Consumer]:
    """Every re-fittable consumer of a prunable group, with A^-1 from the calibration data (with
    `held_out`, from the batches not held out, and A of the held-out ones)."""
    prunable_spaces = {s for g in cg.prunable() for s in g.spaces}
    members = []
    for m in cg.members:
        layer = LAYERS.get(m.node.op)
        if m.role == "in" and m.space in prunable_spaces and layer is not None and layer.supported(model, m.node):
            members.append(m)
    if not members:
        return []
    thetas = {id(m): LAYERS[m.node.op].theta(model, m.node) for m in members}
    dense = {id(m) for m in members if len(thetas[id(m)]) <= MAX_DIM}
    rows_seen = {id(m): 0 for m in members}
    grams = {id(m): np.zeros((len(thetas[id(m)]),) * (2 if id(m) in dense else 1)) for m in members}
    names = list(dict.fromkeys(m.node.inputs[0].name for m in members))
    rng = np.random.default_rng(0)
    helds = {id(m): np.zeros_like(grams[id(m)]) for m in members}
    for index, values in enumerate(activation_batches(model, names, calibration, progress="channel selection")):
        target = helds if held_out and index % HOLDOUT_EVERY == 1 else grams
        for m in members:
            layer, x = LAYERS[m.node.op], values[m.node.inputs[0].name]
            pick = np.sort(rng.choice(layer.count(m.node, x), size=min(rows_per_batch, layer.count(m.node, x)),
                                      replace=False))
            rows = layer.features(m.node, x, pick).astype(np.float32)
            target[id(m)] += rows.T @ rows if id(m) in dense else (rows * rows).sum(axis=0)
            rows_seen[id(m)] += len(rows) if target is grams else 0
    result = []
    for m in members:
        theta, gram = thetas[id(m)], grams[id(m)]
        if gram.ndim == 2 and rows_seen[id(m)] < MIN_ROWS_PER_UNKNOWN * len(gram):
            gram = np.diag(gram).copy()  # too few rows for a trustworthy covariance: its diagonal only
        diag = gram if gram.ndim == 1 else np.diag(gram)
        ridge = RIDGE * max(diag.mean(), 1e-12)
        ainv = 1.0 / (diag + ridge) if gram.ndim == 1 else np.linalg.inv(gram + ridge * np.eye(len(gram)))
        energy = float(np.sum(theta * ((gram @ theta) if gram.ndim == 2 else diag[:, None] * theta)))
        ids, rows = _rows_by_channel(cg, m)
        if ids is None:
            continue
        held = helds[id(m)] if held_out and helds[id(m)].any() else None
        if held is not None and held.ndim != gram.ndim:
            held = np.diag(held).copy()
        result.append(_Consumer(m, ainv, theta.copy(), ids, rows, 1.0 / max(energy, 1e-30), held, theta.copy()))
    return result


def _rows_by_channel(cg: ChannelGraph, member: Member) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(channel ids, rows of the consumer's theta owned by each), one row of indices per channel."""
    space = cg.spaces[member.space]
    block = LAYERS[member.node.op].block(member.node)
    channel_of = cg.channel_of[space.start:space.start + space.size]
    order = np.argsort(channel_of, kind="stable")
    ids, counts = np.unique(channel_of, return_counts=True)
    if len(set(counts.tolist())) != 1:
        return None, None  # channels own different numbers of positions: no block structure
    per_channel = int(counts[0])
    positions = order.reshape(len(ids), per_channel)        # every channel owns the same number of positions
    rows = (positions[:, :, None] * block + np.arange(block)).reshape(len(ids), -1)
    return ids, rows
