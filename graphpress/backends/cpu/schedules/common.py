"""Small helpers the CPU schedule rules share."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

#: below this much work (multiply-adds, or elements for element-wise loops; ~20 us on one core) a
#: loop nest is not handed to the thread pool: waking and joining the pool costs more than it saves,
#: and a parallel launch costs ~2 us even on one thread. Measured (wall time, load ~1): 2M left
#: half of MobileNetV2's layers serial (2 threads: 6.2-6.6 ms float, 3.4 ms int8; 256K: 5.1-6.0 and
#: 2.4-2.6 ms), 256K added 18 us of launches to ResNet-8 int8 at one thread (0.094 -> 0.112 ms).
PARALLEL_MIN_WORK = 1 << 19


def const_extent(value) -> int | None:
    """An extent as int, or None when it is symbolic."""
    return int(value) if isinstance(value, (int, tirx.IntImm)) else None


def divisor_at_most(n: int, limit: int, multiple_of: int = 1) -> int:
    """The largest divisor of `n` that is <= `limit` and a multiple of `multiple_of` (1 if none)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return 1


def innermost_index(region) -> tirx.Expr | None:
    """The index expression of the innermost dimension of a buffer region (None for scalars)."""
    return region.region[-1].min if len(region.region) else None


def is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def follows_channels(region, var) -> bool:
    """Whether a buffer region's innermost index is the channel variable `var` itself, or `var % V`
    (weights in packed panels, see `..panels`): its innermost axis then runs along the channels."""
    index = innermost_index(region)
    return is_var(index, var) or (isinstance(index, tirx.FloorMod) and is_var(index.a, var)
                                  and isinstance(index.b, tirx.IntImm))


#: a parallel loop fuses outer loops until it has this many iterations (enough chunks to balance the
#: pool); fusing more costs a div/mod per iteration to recover each index and leaves LLVM a loop it
#: optimizes less well
PARALLEL_MIN_CHUNKS = 64


def fuse_outer_prefix(sch: s_tir.Schedule, loops: list):
    """Fuse the shortest prefix of `loops` with at least PARALLEL_MIN_CHUNKS iterations; return it."""
    count = 1
    for n, loop in enumerate(loops, start=1):
        count *= const_extent(sch.get(loop).extent) or 1
        if count >= PARALLEL_MIN_CHUNKS:
            break
    prefix = loops[:n]
    return sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]


def parallelize(sch: s_tir.Schedule, loops: list, work: int) -> None:
    """Fuse `loops` and run them on the thread pool when there is enough work."""
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work >= PARALLEL_MIN_WORK and const_extent(sch.get(fused).extent) not in (None, 1):
        sch.parallel(fused)


def consumer_chain(sch: s_tir.Schedule, block) -> list:
    """The blocks after `block` in a fused function, inlined backwards into one epilogue block.

    Returns [] when `block` writes the function output directly, else [epilogue block].
    Blocks that cannot be inlined (e.g. a consumer with a second producer) stop the chain.
    """
    consumers = sch.get_consumers(block)
    if not consumers:
        return []
    chain = [consumers[0]]
    while True:
        nxt = sch.get_consumers(chain[-1])
        if len(nxt) != 1:
            break
        chain.append(nxt[0])
    for later in reversed(chain[1:]):
        sch.reverse_compute_inline(later)
    return chain[:1]


class NormalizedRule(CPUScheduleRule):
    """A CPU schedule rule that works on DLight's normalized blocks: `apply` takes PrimFuncs for targets
    the rule accepts whose blocks normalize, and hands the schedule and block infos to `schedule`."""

    def apply(self, func, target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        return None if infos is None else self.schedule(sch, infos, target)

    def schedule(self, sch: s_tir.Schedule, infos: list, target) -> s_tir.Schedule | None:
        """The scheduled `sch`, or None when the rule does not fit the function."""
        raise NotImplementedError


def vectorize_in_lanes(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """Vectorize `loop` in `lanes` vectors, unrolled when it spans several."""
    extent = const_extent(sch.get(loop).extent)
    if extent is not None and extent > lanes and extent % lanes == 0:
        vectors, vector = sch.split(loop, [None, lanes])
        sch.unroll(vectors)
        sch.vectorize(vector)
    else:
        sch.vectorize(loop)


def vectorize_tile(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorize the innermost loop of a tile-sized block in `lanes` vectors and unroll the loop around it."""
    loops = sch.get_loops(block)
    vectorize_in_lanes(sch, loops[-1], lanes)
    if len(loops) > 1 and const_extent(sch.get(loops[-2]).extent) not in (None, 1):
        sch.unroll(loops[-2])
