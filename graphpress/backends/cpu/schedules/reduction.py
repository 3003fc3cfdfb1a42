"""Schedule for functions with reductions the register tile does not fit (softmax, layer norm, means)."""

from __future__ import annotations

from tvm import s_tir, tirx

from ..machine import vector_unit
from .common import NormalizedRule, const_extent, parallelize
from .injective import schedule_injective


class RowReduction(NormalizedRule):
    """Row-wise reductions (softmax, layer norm): one parallel loop over rows, every block per row.

    When every block iterates the same rows as the output (all axes but the innermost), the blocks
    are computed row by row under one loop (the row stays in L1 between the max, exp, sum and
    divide passes; element-wise passes vectorized). Otherwise each block is its own loop nest:
    element-wise ones vectorized, reduction ones parallel over their rows.
    """

    def schedule(self, sch: s_tir.Schedule, infos: list, target):
        if all(b.is_injective() for b in infos):
            return None
        infos = _inline_single_use(sch, infos)
        lanes = vector_unit(target).lanes(str(sch.get(infos[-1].block_rv).writes[0].source.dtype))
        fused = sch.copy()
        try:
            if fuse_rows(fused, [i.block_rv for i in infos], lanes):
                return fused
        except s_tir.ScheduleError:  # blocks whose rows do not line up: schedule them one by one
            pass
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


def fuse_rows(sch: s_tir.Schedule, blocks: list, lanes: int) -> bool:
    """Compute all `blocks` per row of the last one; False when their row extents differ."""
    out_loops = sch.get_loops(blocks[-1])
    extents = [int(sch.get(loop).extent) for loop in out_loops]
    rows = extents[:-1]
    if not rows:
        return False
    for block in blocks[:-1]:
        spatial = [int(iv.dom.extent) for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        if spatial not in (rows, extents):
            return False
    blocks, partials = _vector_partials(sch, blocks, lanes)
    out_loops = sch.get_loops(blocks[-1])
    row = sch.fuse(*out_loops[:-1]) if len(rows) > 1 else out_loops[0]
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=True)
    total = 1
    for e in extents:
        total *= e
    parallelize(sch, [row], total * len(blocks))
    for block in blocks:
        inner = sch.get_loops(block)[-1]
        if any(block.same_as(p) for p in partials):
            # under the row loop, compute_at lays out the partials' spatial loops (the lanes among
            # them) before their reduction loop, which may have `lanes` iterations too
            loops = sch.get_loops(block)[1:]
            lane = next(loop for loop in loops if int(sch.get(loop).extent) == lanes)
            sch.reorder(*[loop for loop in loops if not loop.same_as(lane)], lane)
            sch.vectorize(lane)
        elif all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
            extent = int(sch.get(inner).extent)
            if extent % lanes == 0 and extent > lanes:
                sch.vectorize(sch.split(inner, [None, lanes])[1])
    return True


def _vector_partials(sch: s_tir.Schedule, blocks: list, lanes: int) -> tuple[list, list]:
    """Each row reduction over a multiple of `lanes` elements as `lanes` partial results (one vector
    accumulator, block `*_rf`) and then the lanes into one value: (all blocks in order, the partials).

    As one scalar accumulator, a row's max or sum is a chain of dependent operations (softmax's
    128-long rows: a latency per element); `lanes` independent partials vectorize.
    """
    ordered, partials = [], []
    for block in blocks:
        iters = sch.get(block).iter_vars
        extent = const_extent(iters[-1].dom.extent) or 0
        if iters[-1].iter_type == tirx.IterVar.DataPar or extent % lanes or extent <= lanes:
            ordered.append(block)
            continue
        _, lane = sch.split(sch.get_loops(block)[-1], [None, lanes])
        try:
            partial = sch.rfactor(lane, factor_axis=len(iters) - 1)
        except s_tir.ScheduleError:  # a reducer rfactor does not recognize: stays scalar
            ordered.append(block)
            continue
        ordered += [partial, block]
        partials.append(partial)
    return ordered, partials


def _inline_single_use(sch: s_tir.Schedule, infos: list) -> list:
    """Inline element-wise blocks read by one block; keep the rest (softmax's exp feeds both the sum
    and the division: inlined, it would be computed twice, and inside the scalar sum loop)."""
    remaining = []
    for info in infos:
        if info.is_injective() and len(sch.get_consumers(info.block_rv)) == 1:
            try:
                sch.compute_inline(info.block_rv)
                continue
            except s_tir.ScheduleError:  # e.g. it writes a function output
                pass
        remaining.append(info)
    return remaining
