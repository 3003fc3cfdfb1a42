"""`prune-channels`: dependency-aware structured channel pruning, with least-squares reconstruction.

Whole output channels of Conv / Gemm / MatMul layers are removed together with everything that must lose
the same channels (BatchNorm statistics, residual partners, concat slices, depthwise filters, the
consumers' input columns, flatten blocks), so the model really gets smaller and faster. With calibration
data the consumers of removed channels are re-fitted to reproduce the original outputs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import GraphpressError
from ..ir import Model, infer_shapes
from ..ir.cost import macs, tensor_shapes
from ..pruning.apply import apply_plan
from ..pruning.augment import augmented, copies
from ..pruning.groups import ChannelGraph, analyze
from ..pruning.importance import channel_scores
from ..pruning.obs import ROWS_PER_BATCH, eliminate
from ..pruning.plan import CostModel, ratios_by_error, ratios_for_target, select, uniform_ratios
from ..pruning.reconstruct import ancestors, refit_layers
from ..pruning.report import build_report
from ..pruning.sensitivity import sensitivity_ratios, steps_for
from .base import Pass, PassContext, PassResult
from .registry import register


@register("prune-channels")
class PruneChannels(Pass):
    """Remove the least important channels of Conv/Gemm/MatMul layers with their dependency groups."""

    ratio: float = 0.3                         # share of the channels of every prunable group to remove
    layer_ratios: list[str] = ()               # per-layer overrides 'node-name:ratio' (the group of its outputs)
    target_macs: float | None = None           # keep this share of the MACs (replaces ratio), e.g. 0.7
    target_params: float | None = None         # keep this share of the parameters (replaces ratio)
    round_to: int = 1                          # kept channels per group are a multiple of this (8, 16)
    criterion: Literal["l1", "l2", "bn", "activation", "reconstruction"] = "l1"   # channel importance
    reconstruct: bool = True                   # re-fit consumers by least squares on calibration data
    sensitivity: bool = False                  # pick per-group ratios by a sensitivity scan under the target
    allocate: Literal["uniform", "refit-error", "held-out-error"] = "uniform"   # how a target is spread over
                                               # the groups: one ratio for all, or (criterion=reconstruction)
                                               # step by step where the consumers' error left after the re-fit
                                               # grows least per MAC/param saved; held-out-error measures that
                                               # error on calibration batches the fit did not see (an in-sample
                                               # error calls layers with few rows per input nearly free)
    ridge: float | None = 0.01                 # ridge strength of the re-fit, relative to mean diag(X^T X);
                                               # none: chosen per layer on held-out calibration batches
    refit: Literal["consumers", "downstream"] = "consumers"   # re-fit the layers that lost input channels,
                                               # or also every later layer that depends on a pruned one (they
                                               # see the changed activations, and can absorb part of the error)
    scope: Literal["all", "blocks"] = "all"    # which groups may lose channels: all, or only those inside
                                               # blocks: written by one layer and passing an activation (not
                                               # residual streams, not linear bottlenecks, whose channels are
                                               # each needed; MobileNetV2's expanded channels, a ResNet block's
                                               # inner ones)
    augment: list[str] = ()                    # also calibrate on mirrored ('flip') and 2-pixel shifted
                                               # ('shift') copies of the calibration images: more rows for
                                               # the selection and the re-fits, which overfit few images
                                               # (rows sampled per batch grow with the copies)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        shapes = tensor_shapes(infer_shapes(model))
        cg = analyze(model, shapes)
        if self.scope == "blocks":
            for group in cg.prunable():
                if group.writers > 1:
                    group.frozen = "a residual stream (scope=blocks)"
                elif not group.activated:
                    group.frozen = "a linear bottleneck: no activation between its layers (scope=blocks)"
        calibration, per_image = ctx.calibration, copies(list(self.augment))
        if self.augment:
            if calibration is None:
                raise GraphpressError("prune-channels: augment needs calibration data")
            calibration = augmented(model, calibration, list(self.augment))
        refits = curves = None
        if self.criterion == "reconstruction" and calibration is not None:
            elimination = eliminate(model, cg, calibration, steps_for(cg, self.round_to) if self.sensitivity else None,
                                    ROWS_PER_BATCH * per_image, held_out=self.allocate == "held-out-error")
            scores, refits, curves = elimination.scores, elimination.refits, elimination.curves
        else:
            scores = channel_scores(model, cg, self.criterion, calibration)
        costs = CostModel(model, cg, shapes, model.parameter_count(), macs(model).total)
        ratios = self._ratios(model, cg, scores, costs, calibration, refits, curves)
        plan = select(cg, scores, ratios, self.round_to)
        report = build_report(cg, costs, plan)
        ctx.reports[self.name] = report
        if not plan.any():
            ctx.log.debug("prune-channels: nothing to remove")
            return PassResult(False, {"removed": 0})
        _name_nodes(model)
        original = model.copy() if self.reconstruct and calibration is not None else None
        masks = apply_plan(model, cg, plan)
        model.cleanup()
        if original is not None:
            refit = self._refitted_layers(cg, masks)
            out_masks = {layer.node.name: masks[layer.out_space] for layer in cg.layers
                         if layer.out_space is not None and not masks[layer.out_space].all()}
            report.reconstruction = refit_layers(original, model, refit, calibration, out_masks, self.ridge,
                                                 ROWS_PER_BATCH * per_image)
        elif self.reconstruct:
            ctx.log.info("prune-channels: no calibration data, so no reconstruction")
        after = macs(model).total
        report.macs_after, report.params_after = after, model.parameter_count()
        removed = int(plan.sum())
        return PassResult(True, {"removed": removed, "groups": sum(1 for g in cg.prunable() if plan[g.classes].any()),
                                 "macs_kept": round(after / max(report.macs_before, 1), 4)})

    def _refitted_layers(self, cg: ChannelGraph, masks: list[np.ndarray]) -> list[str]:
        consumers = [layer for layer in cg.layers if layer.in_space is not None and not masks[layer.in_space].all()]
        if self.refit == "consumers":
            return [layer.node.name for layer in consumers]
        pruned = {id(layer.node) for layer in cg.layers
                  if any(s is not None and not masks[s].all() for s in (layer.in_space, layer.out_space))}
        reading = {id(layer.node) for layer in consumers}
        return [layer.node.name for layer in cg.layers if id(layer.node) in reading or ancestors(layer.node) & pruned]

    def _ratios(self, model: Model, cg: ChannelGraph, scores: np.ndarray, costs: CostModel,
                calibration=None, refits=None, curves=None) -> dict[int, float]:
        base = _layer_ratios(cg, self.layer_ratios)
        targets = [(metric, value) for metric, value in (("macs", self.target_macs), ("params", self.target_params))
                   if value is not None]
        if len(targets) > 1:
            raise GraphpressError("prune-channels: give target-macs or target-params, not both")
        for _, value in targets:
            if not 0 < value <= 1:
                raise GraphpressError(f"prune-channels: a target is a share in (0, 1], got {value}")
        if not 0 <= self.ratio < 1:
            raise GraphpressError(f"prune-channels: ratio must be in [0, 1), got {self.ratio}")
        if self.allocate != "uniform":
            if not targets or curves is None or self.sensitivity:
                raise GraphpressError(f"prune-channels: allocate={self.allocate} needs a target, criterion=reconstruction "
                                      "and calibration data, and replaces sensitivity=true")
            metric, value = targets[0]
            return ratios_by_error(cg, scores, costs, metric, value, curves, self.round_to, base)
        if self.sensitivity:
            if not targets or calibration is None:
                raise GraphpressError("prune-channels: sensitivity=true needs a target and calibration data")
            metric, value = targets[0]
            return sensitivity_ratios(model, cg, scores, costs, metric, value, calibration, self.round_to, refits)
        if targets:
            metric, value = targets[0]
            return ratios_for_target(cg, scores, costs, metric, value, self.round_to, base)
        ratios = uniform_ratios(cg, self.ratio)
        ratios.update(base)
        return ratios


def _layer_ratios(cg: ChannelGraph, entries) -> dict[int, float]:
    """'node:ratio' entries -> ratio for the group(s) holding that layer's output channels."""
    out_spaces = {layer.node.name: layer.out_space for layer in cg.layers if layer.out_space is not None}
    ratios = {}
    for entry in entries:
        name, sep, value = str(entry).rpartition(":")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not 0 <= ratio < 1:
            raise GraphpressError(f"prune-channels: layer ratio {entry!r} is not 'node-name:ratio', ratio in [0, 1)")
        groups = [g.id for g in cg.prunable() if out_spaces.get(name, -1) in g.spaces]
        if not groups:
            raise GraphpressError(f"prune-channels: no prunable layer named {name!r}")
        ratios.update({gid: ratio for gid in groups})
    return ratios


def _name_nodes(model: Model) -> None:
    """Give unnamed nodes a name (re-fitting finds layers by name in a copy of the model)."""
    for node in model.graph.nodes:
        if not node.name:
            node.name = model.unique_name(node.op)
