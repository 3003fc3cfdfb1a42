"""`svd-split`: low-rank factorization of MatMul/Gemm/Conv weights into two thin ops.

`MatMul(x, W)` becomes `MatMul(MatMul(x, A), B)` with W ≈ A·B of rank r (Gemm and Conv likewise, see
`graphpress.lowrank.sites`), wherever the factors hold fewer parameters than W (r < k·n/(k+n), with a
margin). The rank of each weight comes from one of:

- `energy=0.95` (default): the smallest rank keeping that share of the squared spectrum;
- `ratio=0.25`: rank = ceil(ratio·min(k, n)) for every weight;
- `target-params=0.75`: keep 75% of the parameters (of the model, or of the factorable weights with
  `budget-of=layers`), spread over the weights by sensitivity (`graphpress.lowrank.rank`): by each
  weight's spectrum alone (`sensitivity=spectrum`), or by measured curves of the model's output error
  against each layer's rank (`sensitivity=measured`: `sensitivity-probes` trial splits per layer, each
  run on `sensitivity-batches` calibration batches; `lowrank.sensitivity`). Measured curves see what
  the spectrum cannot: on MiniLM the whitened spectra cut the first FFN output layer to rank 14 and
  leave all attention whole; the curves spread the cut over 26 of 36 weights (Spearman 0.8045 -> 0.8110
  at 75% of the MatMul weights, benchmarks/bench_svd).

With calibration data and `method=whitened` (the default) the factorization minimises the output
error on that data instead of the weight error, and the spectra used to choose ranks are those of the
whitened weights (`graphpress.lowrank.factorize`). So `energy` then means the share of the layer's
(uncentred) output energy on the calibration data, which the mean of post-ReLU activations
dominates: whitened `energy=0.95` cuts far deeper than plain `energy=0.95` (LeNet: 9% vs 54% of the
weights kept); use a higher energy or a budget with whitening.

`sequential=true` (with calibration data and `method=whitened`; SVD-LLM v2 / GPTQ style) factors the
weights in dependency order (`lowrank.groups.stages`): each is whitened by the inputs it receives from
the model factored so far and refit in closed form to reproduce the ORIGINAL layer's outputs
(`lowrank.factorize.refit_weight`, ridged toward W by `damping`), so each layer makes up for part of the
error before it. `refit-unsplit=true` also refits the weights the budget leaves whole, at no parameter
cost; on MiniLM (75% of the MatMul weights) that takes the Spearman from 0.8045 to 0.8191, the float
model's 0.8188, where refitting only the split weights changed nothing measurable (a trial run). Each stage after the first split runs the calibration data through the partly factored
model once more (MiniLM: ~12 min on 2 busy cores).

Weights read by several ops are factored once; a weight that something else also reads is left alone.
The factors are ordinary constant initializers of ordinary MatMul/Gemm/Conv ops, so `insert-qdq` after
this pass quantizes them like any weight. Only main-graph ops are considered.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np

from ..errors import GraphpressError
from ..ir import Model
from ..lowrank.factorize import Decomposition, decompose, refit_weight, whitening_factor
from ..lowrank.groups import WeightGroup, group_sites, stages
from ..lowrank.rank import LayerCost, allocate_budget, dropped_energy, energy_rank, max_useful_rank, ratio_rank
from ..lowrank.sensitivity import measured_costs
from ..lowrank.sites import find_site
from ..lowrank.statistics import input_grams, paired_grams, reference_session
from .base import Pass, PassContext, PassResult
from .registry import register


@register("svd-split")
class SvdSplit(Pass):
    """Split MatMul/Gemm/Conv weights into two thin factors (W ≈ A·B) where that saves parameters."""

    energy: float = 0.95                   # keep this share of each weight's squared (whitened) spectrum
    ratio: float | None = None             # instead: rank = ceil(ratio * min(k, n)) for every weight
    target_params: float | None = None     # instead: keep this share of the parameters, spread by sensitivity
    budget_of: Literal["model", "layers"] = "model"   # target-params is a share of all parameters, or of the factorable weights
    margin: float = 0.1                    # split only if the factors hold under (1 - margin) of the weight's parameters
    method: Literal["whitened", "plain"] = "whitened"  # whitened: minimise output error on calibration data (plain SVD without data)
    damping: float = 0.01                  # added to the input Gram diagonal, as a share of its mean (whitened)
    max_batches: int | None = None         # use at most this many calibration batches (None: all)
    sensitivity: Literal["spectrum", "measured"] = "spectrum"  # target-params: weigh layers by spectrum alone, or by measured output error
    sensitivity_batches: int = 4           # calibration batches each sensitivity probe runs
    sensitivity_probes: int = 4            # measured: probe ranks per layer (the error curve between them follows the spectrum)
    sequential: bool = False               # factor in dependency order on the inputs of the already-factored model, refit to the original outputs (whitened)
    refit_unsplit: bool = False            # sequential: also refit the weights left whole (no parameter cost)
    ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")  # op types to factor

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self._check_options()
        groups = self._groups(model, ctx)
        decompositions = self._decompositions(model, groups, ctx)
        ranks = self._ranks(model, groups, decompositions, ctx)
        refit = 0
        if self.sequential and self.method == "whitened" and ctx.calibration is not None:
            refit = self._split_sequentially(model, groups, decompositions, ranks, ctx)
        else:
            if self.sequential:
                ctx.log.info("svd-split: sequential needs calibration data and method=whitened: factoring at once")
            for group, decomposition, rank in zip(groups, decompositions, ranks):
                if rank is not None:
                    with ctx.at(group.sites[0].node):
                        group.split(model, decomposition, rank)
        layers, before, after = [], 0, 0
        for group, decomposition, rank in zip(groups, decompositions, ranks):
            kept = group.params if rank is None else rank * sum(group.shape)
            before, after = before + group.params, after + kept
            layers.append({"name": group.name, "weight": group.sites[0].source.name, "shape": list(group.shape),
                           "rank": rank, "params": group.params, "kept": kept,
                           "energy": float(1.0 - dropped_energy(decomposition.s)[rank]) if rank else 1.0})
        split = sum(rank is not None for rank in ranks)
        if split:
            model.cleanup()
        ctx.reports[self.name] = {"layers": layers, "params_before": before, "params_after": after}
        return PassResult(changed=split + refit > 0, stats={"split": split, "left": len(groups) - split,
                                                            "refit_whole": refit, "params_removed": before - after})

    def _check_options(self) -> None:
        if self.ratio is not None and self.target_params is not None:
            raise GraphpressError("svd-split: give either ratio or target-params, not both")
        if not 0.0 <= self.margin < 1.0:
            raise GraphpressError(f"svd-split: margin must be in [0, 1), got {self.margin}")
        if self.refit_unsplit and not self.sequential:
            raise GraphpressError("svd-split: refit-unsplit needs sequential=true")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise GraphpressError(f"svd-split: target-params must be in (0, 1], got {self.target_params}")

    def _groups(self, model: Model, ctx: PassContext) -> list[WeightGroup]:
        sites = []
        for node in model.nodes(op=self.ops, recursive=False):
            site = find_site(model, node)
            if isinstance(site, str):
                ctx.log.debug("svd-split: leave %s %r: %s", node.op, node.name, site)
            else:
                sites.append(site)
        groups, refused = group_sites(model, sites)
        for name, why in refused.items():
            ctx.log.debug("svd-split: leave %r: %s", name, why)
        return groups

    def _decompositions(self, model: Model, groups: list[WeightGroup], ctx: PassContext) -> list[Decomposition]:
        """The SVD of every group's weight, whitened by its input statistics where data allows."""
        whitenings: dict[int, np.ndarray] = {}
        if self.method == "whitened" and ctx.calibration is None:
            ctx.log.info("svd-split: no calibration data, so plain SVD (weight error, not output error)")
        elif self.method == "whitened" and groups:
            measurable = []
            for i, group in enumerate(groups):
                why = next((s.rows_reason() for s in group.sites if s.rows_reason()), "")
                if why:
                    ctx.log.debug("svd-split: plain SVD for %r: %s", group.name, why)
                else:
                    measurable.append(i)
            grams = input_grams(model, [groups[i] for i in measurable], ctx.calibration, self.max_batches)
            for j, i in enumerate(measurable):
                with ctx.at(groups[i].sites[0].node):
                    whitenings[i] = whitening_factor(grams[j], self.damping)
        return [decompose(group.matrix, whitenings.get(i)) for i, group in enumerate(groups)]

    def _split_sequentially(self, model: Model, groups: list[WeightGroup], decompositions: list[Decomposition],
                            ranks: list[int | None], ctx: PassContext) -> int:
        """Split stage by stage (`groups.stages`), each group re-factored on the inputs the model split so far
        gives it, aiming at the original model's outputs (`factorize.refit_weight`); updates `decompositions`.
        Returns how many weights left whole were refit."""
        reference, refit_whole = None, 0
        for stage in stages(model, groups):
            splits = [i for i in stage if ranks[i] is not None]
            if reference is None:
                # nothing split yet: these layers see their original inputs, so each refit is the weight itself
                if splits:
                    reference = reference_session(model, groups)
            else:
                refit_whole += self._refit_stage(model, groups, decompositions, ranks, stage, reference, ctx)
            for i in splits:
                with ctx.at(groups[i].sites[0].node):
                    groups[i].split(model, decompositions[i], ranks[i])
        return refit_whole

    def _refit_stage(self, model: Model, groups: list[WeightGroup], decompositions: list[Decomposition],
                     ranks: list[int | None], stage: list[int], reference, ctx: PassContext) -> int:
        """Refit the stage's groups on the current model's inputs: new decompositions for the groups to split,
        new weights for the others (refit-unsplit). Returns how many whole weights were refit."""
        refit = [i for i in stage if not any(site.rows_reason() for site in groups[i].sites)
                 and (ranks[i] is not None or self.refit_unsplit and groups[i].settable)]
        statistics = paired_grams(reference, model, [groups[i] for i in refit], ctx.calibration,
                                  self.max_batches) if refit else []
        for i, (gram, cross) in zip(refit, statistics):
            with ctx.at(groups[i].sites[0].node):
                whitening = whitening_factor(gram, self.damping)
                target = refit_weight(groups[i].matrix, whitening, gram, cross)
                if ranks[i] is None:
                    groups[i].set_matrix(target)
                else:
                    decompositions[i] = decompose(target, whitening)
        return sum(ranks[i] is None for i in refit)

    def _ranks(self, model: Model, groups: list[WeightGroup], decompositions: list[Decomposition],
               ctx: PassContext) -> list[int | None]:
        """The rank of every group (None: leave it), by the chosen mode; logs why layers are left."""
        limits = [max_useful_rank(*group.shape, self.margin) for group in groups]
        if self.target_params is not None:
            return self._budget_ranks(model, groups, decompositions, limits, ctx)
        ranks = []
        for group, decomposition, limit in zip(groups, decompositions, limits):
            k, n = group.shape
            if self.ratio is not None:
                rank, why = ratio_rank(k, n, self.ratio), f"ratio {self.ratio}"
            else:
                rank, why = energy_rank(decomposition.s, self.energy), f"{self.energy:g} of the energy"
            if rank > limit:
                ctx.log.debug("svd-split: leave %r (%dx%d): %s needs rank %d, but only ranks up to %d save "
                              "(margin %g)", group.name, k, n, why, rank, limit, self.margin)
                rank = None
            ranks.append(rank)
        return ranks

    def _budget_ranks(self, model: Model, groups: list[WeightGroup], decompositions: list[Decomposition],
                      limits: list[int], ctx: PassContext) -> list[int | None]:
        if not groups:
            return []
        factorable = sum(group.params for group in groups)
        total = model.parameter_count() if self.budget_of == "model" else factorable
        budget = self.target_params * total - (total - factorable)
        curves = [dropped_energy(d.s) for d in decompositions]
        if self.sensitivity == "measured":
            if ctx.calibration is None:
                raise GraphpressError("svd-split: sensitivity=measured needs calibration data")
            probes = itertools.islice(ctx.calibration, self.sensitivity_batches)
            curves = measured_costs(model, groups, decompositions, limits, probes, self.sensitivity_probes)
            for group, curve, limit in zip(groups, curves, limits):
                ctx.log.debug("svd-split: %r: output error %.3g at half its break-even rank", group.name,
                              curve[max(1, limit // 2)] if limit >= 1 else 0.0)
        costs = [LayerCost(group.params, sum(group.shape), limit, curve)
                 for group, limit, curve in zip(groups, limits, curves)]
        ranks = allocate_budget(costs, budget)
        for group, rank in zip(groups, ranks):
            if rank is None:
                ctx.log.debug("svd-split: leave %r: the budget costs less error spent on other layers", group.name)
        return ranks

