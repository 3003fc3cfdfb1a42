"""Depthwise convolutions: a register tile that keeps one kernel row of weights, and the loops ordered
so that neighbouring output pixels share their input loads.

`TiledReduction` computes a depthwise convolution like any reduction: a tile of output pixels x
channel vectors holding as many accumulators as there are registers, the kernel taps (kh, kw) as
loops around it. Every tap then loads and, for int8 models (`..int8`: the input stays one byte per
element between layers; the integer products and their float32 sums are exact), converts and
bounds-checks its input vector anew: nine loads and conversions per output vector for a 3x3 kernel.
MobileNetV2's seventeen int8 depthwise layers ran at 22-33 GMAC/s that way (28% of its int8 time).

Here the loops run kernel row | output pixel (unrolled) | kernel column (unrolled) | channel vector,
so the taps of one pixel and of its neighbour read the same input columns within one unrolled
block, and LLVM loads, converts and bounds-checks each column once (for stride 1, three columns per
pixel become one). That takes registers beyond the accumulators: one kernel row of weights (kw
vectors per channel vector) and the shared input column, so the tile (`register_tile`) is sized
for accumulators + weights + one column per channel vector, with two registers to spare; the
generic tile's full register file of accumulators spilled in this loop order.

Staging the padded input window converted to float32 in a local buffer first (each input converted
once) measured no faster for int8 and slower for float (the copy's stores and reloads cost what the
conversions saved), so the padding stays inlined as a guarded load.

Measured (`benchmarks/bench_depthwise.py`, Intel Xeon AVX-512, 1 thread, thread CPU time, load ~7):
MobileNetV2 int8's seventeen depthwise layers 22-33 -> 31-43 GMAC/s, 878 -> 567 us per inference
(whole model 3.14 -> 2.88 ms); float 7-47 -> 9-81 GMAC/s, 1152 -> 766 us (5.23 -> 4.84 ms). The
same layers compiled for AVX2 (x86-64-v3, 16 registers): int8 1699 -> 1092 us, float 1705 -> 1300 us.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base.common_schedules import try_inline

from ..machine import vector_unit
from .common import (NormalizedRule, consumer_chain, const_extent, innermost_index, is_var, parallelize, vectorize_in_lanes,
                     vectorize_tile)
from .tiled import channel_lanes

#: vector registers the register tile leaves to LLVM beyond its accumulators, weights and loads
SPARE_REGISTERS = 2
#: the input window of a block of output rows (one column of register tiles) should fit in L1
BLOCK_BYTES = 16 * 1024


class DepthwiseConv(NormalizedRule):
    """Schedule a function whose one reduction is a channels-last depthwise convolution (see module doc)."""

    def schedule(self, sch: s_tir.Schedule, infos: list, target):
        main = _depthwise_block(sch, infos)
        if main is None:
            return None
        unit = vector_unit(target)
        channels = int(main.dom()[len(main.dom_kind().rstrip("R")) - 1])
        lanes = channel_lanes(channels, unit.lanes(str(sch.get(main.block_rv).writes[0].source.dtype)))
        if channels % lanes:
            return None
        try_inline(sch, [b for b in infos if b is not main])  # padding: a guarded load in the reduction
        tile_depthwise(sch, main.block_rv, lanes, unit.registers)
        return sch


def _depthwise_block(sch: s_tir.Schedule, infos):
    """The block info of a depthwise convolution: one reduction over the two window axes only, whose
    output, input and weight all index the channel (the innermost spatial axis) innermost; else None.

    Pooling (no weight) and convolutions reducing over input channels do not match.
    """
    reductions = [b for b in infos if b.is_reduction()]
    if len(reductions) != 1:
        return None
    info = reductions[0]
    kinds = info.dom_kind()
    n_spatial = len(kinds.rstrip("R"))
    if kinds != "S" * n_spatial + "RR" or n_spatial < 3 or any(const_extent(d) is None for d in info.dom()):
        return None
    block = sch.get(info.block_rv)
    channel = block.iter_vars[n_spatial - 1].var
    if len(block.writes) != 1 or len(block.reads) != 2 or not is_var(innermost_index(block.writes[0]), channel):
        return None
    if not all(is_var(innermost_index(r), channel) for r in block.reads):
        return None
    return info


def register_tile(channels: int, width: int, lanes: int, registers: int, taps: int) -> tuple[int, int]:
    """(channels, pixels) of the register tile: one to three vectors of channels that divide `channels`,
    pixels a divisor of the output width, such that the accumulators, one kernel row's weights (`taps`
    vectors per channel vector) and one loaded input vector per channel vector fit the registers;
    the most accumulators win, ties to the wider channel block."""
    best = None
    for vectors in (1, 2, 3):
        if channels % (vectors * lanes):
            continue
        pixels = max((p for p in range(1, width + 1) if width % p == 0 and vectors * (p + taps + 1) <= registers),
                     default=None)
        if pixels is not None and (best is None or (pixels * vectors, vectors) > best[0]):
            best = ((pixels * vectors, vectors), (vectors * lanes, pixels))
    return best[1] if best else (lanes, 1)


def block_rows(height: int, window_row_bytes: int, kernel_rows: int) -> int:
    """Output rows per block of one column of tiles: the largest divisor of `height` whose input window,
    rows + kernel_rows - 1 rows of `window_row_bytes` (as float32), fits BLOCK_BYTES; at least 1."""
    return max((r for r in range(1, height + 1)
                if height % r == 0 and (r + kernel_rows - 1) * window_row_bytes <= BLOCK_BYTES), default=1)


def tile_depthwise(sch: s_tir.Schedule, block, lanes: int, registers: int) -> None:
    """Tile the output [(batch,) height, width, channels] (see module doc).

    Loops: channel blocks, batch, row blocks, pixel blocks (parallel) | rows of the block | kernel
    rows | pixels of the tile (unrolled) | kernel columns (unrolled) | channel vectors (unrolled,
    vectorized); the epilogue (bias, activation, requantization) per tile, from the accumulators.
    A block walks down a column `pixels` wide for `block_rows` rows (the input rows a row re-reads
    were just loaded by the one above); the block size is a measured choice (MobileNetV2 int8: one
    row per block took 1.20x, whole columns 1.17x the time of `block_rows`).
    """
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    n_spatial = sum(1 for iv in iters if iv.iter_type == tirx.IterVar.DataPar)
    *outer, w, c = loops[:n_spatial]
    kh, kw = loops[n_spatial:]
    extents = [int(iv.dom.extent) for iv in iters]
    width, channels, kernel_cols = extents[n_spatial - 2], extents[n_spatial - 1], extents[-1]
    vec, pixels = register_tile(channels, width, lanes, registers - SPARE_REGISTERS, kernel_cols)
    rows = block_rows(extents[n_spatial - 3], (pixels + kernel_cols - 1) * vec * 4, extents[-2])
    c_out, c_in = sch.split(c, [None, vec])
    w_out, w_in = sch.split(w, [None, pixels])
    h_out, h_in = sch.split(outer[-1], [None, rows])
    outer = [*outer[:-1], h_out]
    sch.reorder(c_out, *outer, w_out, h_in, kh, w_in, kw, c_in)
    epilogue = consumer_chain(sch, block)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, h_in, preserve_unit_loops=False)
    for ep in epilogue:
        sch.reverse_compute_inline(ep)
    vectorize_tile(sch, local, lanes)
    sch.unroll(w_in)
    sch.unroll(kw)
    vectorize_in_lanes(sch, c_in, lanes)
    work = 1
    for e in extents:
        work *= e
    parallelize(sch, [c_out, *outer, w_out], work)
    init = sch.decompose_reduction(block, kh)
    vectorize_tile(sch, init, lanes)
