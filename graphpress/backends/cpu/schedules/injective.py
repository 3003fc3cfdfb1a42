"""Schedule for functions without reductions: element-wise chains, transposes, padding, reshapes."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.base.common_schedules import try_inline

from ..machine import vector_unit
from .common import PARALLEL_MIN_WORK, NormalizedRule, const_extent, fuse_outer_prefix


class Injective(NormalizedRule):
    """Inline everything into the output blocks, then one parallel loop around vectors of the innermost axis."""

    def schedule(self, sch: s_tir.Schedule, infos: list, target):
        if any(not b.is_injective() for b in infos):
            return None
        lanes = vector_unit(target).lanes(str(sch.get(infos[-1].block_rv).writes[0].source.dtype))
        for info in try_inline(sch, infos):
            schedule_injective(sch, info.block_rv, lanes)
        return sch


def schedule_injective(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorize the innermost axis by `lanes` when it divides it; parallelize the rest if large."""
    loops = sch.get_loops(block)
    extents = [const_extent(sch.get(loop).extent) for loop in loops]
    if not loops or None in extents:
        return
    total = 1
    for e in extents:
        total *= e
    inner = loops[-1]
    outer = list(loops[:-1])
    if extents[-1] % lanes == 0 and extents[-1] > lanes:
        rest, vec = sch.split(inner, [None, lanes])
        outer.append(rest)
        sch.vectorize(vec)
    elif extents[-1] in (lanes // 2, lanes):
        sch.vectorize(inner)
    else:
        outer.append(inner)
    if outer and total >= PARALLEL_MIN_WORK:
        sch.parallel(fuse_outer_prefix(sch, outer))
