"""Register-tiled schedule for conv2d (incl. depthwise and 1x1), matmul/dense and pooling.

Every such op, once legalized in a channels-last layout, is a block

    out[s0, ..., s_{k-1}, s_k] (+)= f(in[..., r...], w[..., s_k])     s_k innermost in `out` and in `w`

so one template fits all of them: split s_k into vectors (the output channels / matmul columns),
fuse s_0..s_{k-1} (the output pixels / matmul rows) and split them into a register tile, keep the tile's accumulators in a
`local` buffer that LLVM promotes to vector registers, put the reduction loops around the tile, and
parallelize the loops outside it. Padding is a separate vectorized copy of the input when the
reduction runs over input channels (its loads are broadcasts, which a bounds check would keep out of
the FMA), and inlined into the reduction as a guarded load for depthwise convolutions and pooling (the
guard depends on the window position only, so the channel vectors stay intact, and no padded copy
of a large map is made). The epilogue that FuseOps attached (bias, ReLU/Clip, residual add with its
DequantizeLinear, requantization) is inlined into one block and computed per tile, right after the
accumulators are final.

Tile sizes follow from the target's vector width and register count only (no per-model tuning),
see `register_tile`: one or two vectors of channels times as many pixels as the accumulator
registers hold.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base.common_schedules import try_inline

from ..machine import vector_unit
from .injective import schedule_injective
from .common import (NormalizedRule, consumer_chain, const_extent, divisor_at_most, follows_channels, innermost_index, is_var,
                     parallelize, vectorize_tile)


class TiledReduction(NormalizedRule):
    """Schedule a function whose one reduction block has its output's innermost axis in an operand's."""

    def schedule(self, sch: s_tir.Schedule, infos: list, target):
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or not _fits(sch, reductions[0]):
            return None
        main = reductions[0].block_rv
        dtype = str(sch.get(main).writes[0].source.dtype)
        unit = vector_unit(target)
        pad = [b for b in infos if b.name == "pad_temp" and _reduces_innermost(sch, main, b.block_rv)]
        try_inline(sch, [b for b in infos if b is not reductions[0] and b not in pad])
        depth = _reduction_block_depth(sch, main, dtype)
        channels = int(reductions[0].dom()[len(reductions[0].dom_kind().replace("R", "")) - 1])
        lanes = channel_lanes(channels, unit.lanes(dtype))
        if depth:
            tile_reduction_blocked(sch, main, lanes, unit.accumulators, depth)
        else:
            tile_reduction(sch, main, lanes, unit.accumulators)
        for info in pad:
            schedule_injective(sch, info.block_rv, lanes)
        return sch


def _streams_data(sch: s_tir.Schedule, block) -> bool:
    """Whether the loops over pixels go outside the one over channel blocks: when the data operand is
    larger than the weights.

    Channel blocks outside re-read the whole input once per block: free while it sits in L2 (small
    maps at batch 1), a DRAM stream per block otherwise (MobileNetV2's 112x112 maps, any map at
    batch 32). Pixels outside read each input tile once and re-read the (smaller) weights from cache.
    Otherwise the channel block is the outermost loop, above the image rows too: each block's weight
    panel is then read from memory once, not once per row (7x7 layers with 2048 channels: 8 MB of
    weights, 7 times over, had halved their speed).
    """
    data, weights = _operand_elements(sch, block)
    return data > weights


def _operand_elements(sch: s_tir.Schedule, block) -> tuple[int, int]:
    """(data, weights) elements the reduction `block` reads: data are the operands indexed by the output
    pixels, weights the others (indexed by the output channels and the reduction only; in packed
    layouts, `..pairs`, their innermost axis runs along the reduction, not the channels)."""
    iters = sch.get(block).iter_vars
    pixels = [iv.var for iv in iters if iv.iter_type == tirx.IterVar.DataPar][:-1]
    weights, data = 0, 0
    for region in sch.get(block).reads:
        if len(region.source.shape) < 2:
            continue
        size = int(np.prod([int(d) for d in region.source.shape]))
        used = [v for r in region.region for v in tirx.analysis.undefined_vars(r.min, [])]
        if any(v.same_as(p) for v in used for p in pixels):
            data += size
        else:
            weights += size
    return data, weights


def _reduces_innermost(sch: s_tir.Schedule, block, producer) -> bool:
    """Whether `block` reads `producer`'s output with its innermost reduction variable as the innermost
    index: a convolution reducing over input channels, as opposed to depthwise convolutions and pooling.

    Those convolutions keep the padded input as a separate vectorized copy: inlined, each input load
    carries the window's bounds check, which stops LLVM from folding the broadcast into the FMA
    (ResNet-8: 0.43 -> 0.24 ms). Depthwise convolutions load whole channel vectors, where the check is
    cheap and the copy of a large map is not.
    """
    last = sch.get(block).iter_vars[-1]
    buffer = sch.get(producer).writes[0].source
    return last.iter_type != tirx.IterVar.DataPar and any(
        r.source.same_as(buffer) and is_var(innermost_index(r), last.var) for r in sch.get(block).reads)


def channel_lanes(channels: int, lanes: int) -> int:
    """The widest vector (a whole, half or quarter register, at least 4 lanes) that divides `channels`.

    On AVX-512 a 24-channel output (MobileNetV2's bottlenecks) is three 8-lane vectors rather than
    one 24-lane vector, which LLVM splits into a 16- and an 8-lane half per operation and spills
    (5x slower); Zen 4 runs 512-bit operations as two 256-bit halves anyway. `lanes` when none divides.
    """
    return next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 4 and channels % v == 0), lanes)


def _fits(sch: s_tir.Schedule, info) -> bool:
    """Static extents, spatial iters before reduction iters, and the innermost-axis condition."""
    kinds = info.dom_kind()
    if "O" in kinds or "R" not in kinds or kinds.rstrip("R") != kinds.replace("R", "") or kinds[0] != "S":
        return False
    if any(const_extent(d) is None for d in info.dom()):
        return False
    block = sch.get(info.block_rv)
    last = block.iter_vars[len(kinds.replace("R", "")) - 1].var
    if len(block.writes) != 1 or not is_var(innermost_index(block.writes[0]), last):
        return False
    return any(follows_channels(r, last) for r in block.reads)


def tile_reduction(sch: s_tir.Schedule, block, lanes: int, accumulators: int, intrinsic: str | None = None) -> None:
    """Apply the register-tile schedule to the reduction `block` (loops ordered S..S R..R).

    With `intrinsic` (a tensor intrinsic over [lanes outputs x last reduction axis]), the last
    reduction loop stays inside the channel loop and each `lanes` channels are tensorized with it.
    """
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    n_spatial = sum(1 for iv in iters if iv.iter_type == tirx.IterVar.DataPar)
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    inner = reduce[-1:] if intrinsic else []
    outer_reduce = reduce[:len(reduce) - len(inner)]
    extents = [int(iv.dom.extent) for iv in iters[:n_spatial]]
    work = 1
    for iv in iters:
        work *= int(iv.dom.extent)
    windowed = any(int(iv.dom.extent) > 1 for iv in iters[n_spatial:-1])
    rows_axis, outer, fused = _rows_axis(sch, spatial[:-1], extents[:-1], extents[-1], lanes, accumulators, windowed)
    if rows_axis is None:
        c_out, p_out, c_in = sch.split(spatial[-1], [None, 1, vec := extents[-1] if extents[-1] <= 2 * lanes
                                                      else register_tile(extents[-1], 1, lanes, accumulators)[0]])
        p_in, tiles = None, [c_out, p_out]
    else:
        vec, rows = register_tile(extents[-1], _extent(sch, rows_axis), lanes, accumulators, fused)
        c_out, c_in = sch.split(spatial[-1], [None, vec])
        p_out, p_in = sch.split(rows_axis, [None, rows])
        tiles = [*outer, p_out, c_out] if _streams_data(sch, block) else [c_out, *outer, p_out]
    sch.reorder(*tiles, *outer_reduce, *([p_in] if p_in is not None else []), c_in, *inner)
    epilogue = consumer_chain(sch, block)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, tiles[-1], preserve_unit_loops=False)
    for ep in epilogue:
        sch.reverse_compute_inline(ep)
    vectorize_tile(sch, local, lanes)
    if p_in is not None:
        sch.unroll(p_in)
    c_lanes = _vectorize_channels(sch, c_in, vec, lanes, vectorize=not intrinsic)
    parallelize(sch, tiles, work)
    init = sch.decompose_reduction(block, outer_reduce[0])  # the init copies the unrolled tile loops
    if intrinsic:
        vectorize_tile(sch, init, lanes)
        sch.tensorize(c_lanes, intrinsic)


#: the streamed operand (output pixels x innermost reduction) should stay in this much cache (L2)
CACHE_BYTES = 512 * 1024
#: innermost-reduction block length when the reduction is split
REDUCTION_BLOCK = 256
#: weights at least this large (twice a 2 MB L2) are read once per reduction block, with all pixels
#: streamed past each channel block, rather than once per image row: ResNet-50 at batch 32, 9.4 MB of
#: 3x3 weights re-read for each of 224 rows ran at 45 GMAC/s, 96 streamed once. With 1-2 MB weights
#: (its 14x14 1x1 layers) re-reading them per row from L2/L3 measured faster (86 vs 122 ms).
LARGE_WEIGHT_BYTES = 4 << 20


def _reduction_block_depth(sch: s_tir.Schedule, block, dtype: str) -> int:
    """The innermost reduction loop's block length when its operand rows overflow the cache, else 0.

    The register tile sweeps all output channels for every block of rows, re-reading the rows'
    whole reduction extent each time: with pixels x K too large for L2 (MiniLM's FFN: 128 x 1536
    floats) that is a stream from L3 per channel block. Splitting K makes each pass cache-resident.
    """
    iters = sch.get(block).iter_vars
    spatial = [int(iv.dom.extent) for iv in iters if iv.iter_type == tirx.IterVar.DataPar]
    inner = int(iters[-1].dom.extent)
    pixels = int(np.prod(spatial[:-1])) if len(spatial) > 1 else 1
    if inner < 2 * REDUCTION_BLOCK or pixels * inner * np.dtype(dtype).itemsize <= CACHE_BYTES:
        return 0
    depth = divisor_at_most(inner, REDUCTION_BLOCK)
    return depth if depth >= REDUCTION_BLOCK // 4 else 0


def tile_reduction_blocked(sch: s_tir.Schedule, block, lanes: int, accumulators: int, depth: int) -> None:
    """`tile_reduction` with the innermost reduction split in blocks of `depth`, the outermost loop.

    The accumulators then live in the output buffer across reduction blocks (LLVM keeps a tile in
    registers within one block), and the epilogue runs as its own vectorized loop nest afterwards.
    """
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    n_spatial = sum(1 for iv in iters if iv.iter_type == tirx.IterVar.DataPar)
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    extents = [int(iv.dom.extent) for iv in iters[:n_spatial]]
    work = 1
    for iv in iters:
        work *= int(iv.dom.extent)
    k_out, k_in = sch.split(reduce[-1], [None, depth])
    windowed = any(int(iv.dom.extent) > 1 for iv in iters[n_spatial:-1])
    rows_axis, outer, fused = _rows_axis(sch, spatial[:-1], extents[:-1], extents[-1], lanes, accumulators, windowed)
    vec, rows = register_tile(extents[-1], _extent(sch, rows_axis), lanes, accumulators, fused)
    c_out, c_in = sch.split(spatial[-1], [None, vec])
    p_out, p_in = sch.split(rows_axis, [None, rows])
    itemsize = np.dtype(str(sch.get(block).writes[0].source.dtype)).itemsize
    if _operand_elements(sch, block)[1] * itemsize >= LARGE_WEIGHT_BYTES:
        tiles = [c_out, *outer, p_out]
        sch.reorder(k_out, *tiles, *reduce[:-1], k_in, p_in, c_in)
    else:
        tiles = [c_out, p_out]
        sch.reorder(*outer, k_out, *tiles, *reduce[:-1], k_in, p_in, c_in)
    epilogue = consumer_chain(sch, block)
    sch.unroll(p_in)
    _vectorize_channels(sch, c_in, vec, lanes)
    parallelize(sch, tiles, work)
    init = sch.decompose_reduction(block, k_out)
    vectorize_tile(sch, init, lanes)
    for ep in epilogue:
        schedule_injective(sch, ep, lanes)


def _rows_axis(sch, pixel_loops, pixel_extents, channels, lanes, accumulators, windowed=True):
    """The loop whose iterations form the tile's rows, the loops left outside the tile, and the extents
    of the pixel loops fused into it (None when it is one loop).

    All pixel loops fused into one when that gives a fuller register tile (7x7 and 14x14 outputs:
    rows of 7 or 4 pixels rather than 1 or 2). For windowed reductions (k>1 convolutions, pooling)
    fusing costs index arithmetic on every input load, so there the innermost pixel loop (output
    width) is kept unless it fills less than half the tile; for pointwise convolutions and matmuls
    the fused index is linear in memory and costs nothing.
    """
    if not pixel_loops:
        return None, [], None
    total = 1
    for e in pixel_extents:
        total *= e

    def fill(pixels, fused=None):
        vec, rows = register_tile(channels, pixels, lanes, accumulators, fused)
        return rows * -(-vec // lanes)

    slack = 2 if windowed else 1
    if len(pixel_loops) == 1 or slack * fill(pixel_extents[-1]) >= fill(total, tuple(pixel_extents)):
        return pixel_loops[-1], list(pixel_loops[:-1]), None
    return sch.fuse(*pixel_loops), [], tuple(pixel_extents)


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def register_tile(channels: int, pixels: int, lanes: int, accumulators: int,
                  fused: tuple[int, ...] | None = None) -> tuple[int, int]:
    """(output channels, output pixels) of one register tile.

    Channels come in whole vectors that divide the channel count (one to three vectors; a plain
    divisor when no vector divides it), pixels as a divisor of the pixel count; among those the
    tile with the most accumulator vectors that fit the registers wins (ties: wider channels).
    With `fused` (the pixels are fused loops of these extents, e.g. [batch, height, width]), a tile
    must not straddle image rows or images partially: for every trailing product P of the extents
    (width, height x width, ...), P % rows == 0 or rows % P == 0. The epilogue is computed on the
    tile's bounding box in the unfused loops, which must be the tile itself.
    """
    trailing = [1]
    for extent in reversed(fused or ()):
        trailing.append(trailing[-1] * extent)
    candidates = [v for v in (3 * lanes, 2 * lanes, lanes) if channels % v == 0] or [divisor_at_most(channels, 2 * lanes)]
    best = None
    for vec in candidates:
        vectors = -(-vec // lanes)
        rows = max(r for r in range(1, max(1, accumulators // vectors) + 1)
                   if pixels % r == 0 and all(p % r == 0 or r % p == 0 for p in trailing[1:]))
        score = (rows * vectors, vec)
        if best is None or score > best[0]:
            best = (score, (vec, rows))
    return best[1]


def _vectorize_channels(sch: s_tir.Schedule, c_in, vec: int, lanes: int, vectorize: bool = True):
    """Split a tile's `vec` channels into machine vectors (unrolled); return the lanes loop.

    One vectorized loop of several registers' width would be legal too, but LLVM then spills.
    """
    if vec % lanes or vec == lanes:
        if vectorize:
            sch.vectorize(c_in)
        return c_in
    c_vectors, c_lanes = sch.split(c_in, [None, lanes])
    sch.unroll(c_vectors)
    if vectorize:
        sch.vectorize(c_lanes)
    return c_lanes
