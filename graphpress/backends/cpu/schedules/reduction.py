"""Schedule for functions with reductions the register tile does not fit (softmax, layer norm, means)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from ..machine import vector_unit
from .common import const_extent, parallelize
from .injective import schedule_injective


class RowReduction(CPUScheduleRule):
    """Each block on its own: element-wise blocks vectorized, reduction blocks parallel over their rows.

    Blocks stay separate loop nests (rows are not fused across blocks): every loop nest is a
    valid parallel loop on its own, which keeps the rule correct for any mix of blocks.
    """

    def apply(self, func: tirx.PrimFunc, target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or all(b.is_injective() for b in infos):
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        for info in infos:
            dtype = str(sch.get(info.block_rv).writes[0].source.dtype)
            if info.is_injective():
                schedule_injective(sch, info.block_rv, vector_unit(target).lanes(dtype))
            else:
                parallelize_rows(sch, info.block_rv)
        return sch


def parallelize_rows(sch: s_tir.Schedule, block) -> None:
    """Parallelize the spatial loops outside a reduction block's reduction loops."""
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    if len(loops) != len(iters):
        return
    rows, row_loops = 1, []
    for iv, loop in zip(iters, loops):
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        row_loops.append(loop)
        rows *= const_extent(iv.dom.extent) or 0
    work = rows
    for iv in iters[len(row_loops):]:
        work *= const_extent(iv.dom.extent) or 0
    parallelize(sch, row_loops, work)
