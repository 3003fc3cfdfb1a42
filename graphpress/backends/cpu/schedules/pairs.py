"""Schedule for packed convolutions and matmuls (see `..pairs`): the register tile, tensorized with
`vpmaddwd` (channel pairs) or `vpdpbusd` (channel quads)."""

from __future__ import annotations

from tvm import s_tir

from ..machine import vector_unit
from ..pairs import BLOCK_NAME, DOT, pair_lanes, register_intrinsics
from .common import NormalizedRule
from .injective import schedule_injective
from .tiled import tile_reduction


class TiledPairs(NormalizedRule):
    """The `TiledReduction` tile with the innermost [int32 lanes x channel pair] done by one instruction.

    The padded input stays a separate (vectorized) copy: the intrinsic loads the channel pair with one
    32-bit load, which a guarded (inlined) padding load would not allow.
    """

    def schedule(self, sch: s_tir.Schedule, infos: list, target):
        mains = [b for b in infos if b.name == BLOCK_NAME]
        if len(mains) != 1:
            return None
        group = int(mains[0].dom()[-1])
        lanes = pair_lanes(vector_unit(target).lanes("int32"), int(mains[0].dom()[-1 - _reduce_count(mains[0])]), group)
        if lanes is None:
            return None
        register_intrinsics()
        pad = [b for b in infos if b.name == "pad_temp"]
        for info in infos:
            if info is not mains[0] and info not in pad:
                try:
                    sch.compute_inline(info.block_rv)
                except s_tir.ScheduleError:  # the output block: computed per tile by tile_reduction
                    continue
        tile_reduction(sch, mains[0].block_rv, lanes, vector_unit(target).accumulators, DOT[lanes, group])
        for info in pad:
            schedule_injective(sch, info.block_rv, group * lanes)
        return sch


def _reduce_count(info) -> int:
    return info.dom_kind().count("R")
