"""`fold`: the clean-up pipeline run to a fixed point; a useful pipeline on its own.

One round runs, in order: eliminate-identity, fold-constants, fold-shapes, fuse-conv-bn, fuse-conv-affine,
fuse-matmul-add, dedup-initializers, cse, eliminate-dead. Each sub-pass can expose work for the others (a
folded shape makes a Reshape a no-op, merged constants make two nodes equal, a fused Conv meets the next
Mul), so rounds repeat until one changes nothing, at most `max_iterations` times. Fusions run before
merging: two Convs that differ only in the BatchNormalization after them must not be merged into one
Conv feeding both (the BatchNormalizations could then not be folded away).
"""

from __future__ import annotations

from collections import Counter

from ..ir import Model
from .base import Pass, PassContext, PassResult
from .cleanup import CommonSubexpressions, DedupInitializers, EliminateDead, EliminateIdentity
from .fold_constants import FoldConstants
from .fold_shapes import FoldShapes
from .fusion import FuseConvAffine, FuseConvBatchNorm, FuseMatMulAdd
from .registry import register


@register("fold")
class Fold(Pass):
    """Fold constants and shapes, drop dead/identity/duplicate nodes and fuse layers, to a fixed point.

    The fusions are Conv+BatchNormalization, Conv/BatchNormalization+per-channel Mul/Add and
    MatMul+Add->Gemm; the round repeats until nothing changes (see the module docstring)."""

    max_iterations: int = 10       # cap on rounds of the whole sequence
    max_growth: float = 4.0        # fold-constants: keep a node whose output is this many times its largest input
    size_floor_kb: int = 1024      # fold-constants: outputs up to this size (KiB) are always folded
    fusions: bool = True           # run the Conv/BatchNormalization/MatMul fusions

    def passes(self) -> list[Pass]:
        """The sub-passes of one round, in order."""
        fold_constants = FoldConstants()
        # set, not passed to __init__: option checking there reads the class's source (slow at start-up)
        fold_constants.max_growth, fold_constants.size_floor_kb = self.max_growth, self.size_floor_kb
        sequence: list[Pass] = [EliminateIdentity(), fold_constants, FoldShapes()]
        if self.fusions:
            sequence += [FuseConvBatchNorm(), FuseConvAffine(), FuseMatMulAdd()]
        return sequence + [DedupInitializers(), CommonSubexpressions(), EliminateDead()]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        totals: Counter = Counter()
        sequence = self.passes()
        # a sub-pass that changed nothing last time and has seen no change since would change nothing
        # again: it is skipped, which makes the last (confirming) round nearly free
        last_change, last_run = 0, {}
        step = rounds = 0
        for rounds in range(1, self.max_iterations + 1):
            changed = False
            for index, sub in enumerate(sequence):
                step += 1
                if index in last_run and last_run[index] > last_change:
                    continue
                last_run[index] = step
                result = sub.run(model, ctx)
                if result.changed:
                    changed, last_change = True, step
                    last_run[index] = step - 1  # its own change may expose more work for itself
                for key, value in result.stats.items():
                    if isinstance(value, (int, float)) and value:
                        totals[f"{sub.name}.{key}"] += value
            if not changed:
                break
        else:
            ctx.log.info("fold stopped at its cap of %d rounds", self.max_iterations)
        totals["rounds"] = rounds
        return PassResult(changed=any(k != "rounds" for k in totals), stats=dict(totals))
