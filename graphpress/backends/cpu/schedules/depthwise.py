"""Depthwise convolutions: the padded input staged once per block of output rows and columns, in the
accumulation type, and a register tile sized for the kernel row that it keeps in registers.

`TiledReduction` computes a depthwise convolution with its padding inlined as a guarded load, and
for int8 models (`..int8`: the input stays one byte per element between layers, the products are
exact in float32) with a conversion per load: every input vector is loaded, bounds-checked and
converted once per tap that reads it, nine times for a 3x3 kernel. MobileNetV2's seventeen int8
depthwise layers ran at 13-25 GMAC/s that way, a quarter of its int8 time.

Here a block of `rows x columns` outputs (`stage_tile`) first copies the input window it reads
(((rows - 1) * stride + kh) x ((columns - 1) * stride + kw) x channels) into a small local buffer,
padding and converting to float32 on the way (`_float_window`); the reduction then reads that buffer
without bounds checks or conversions. Within the block the register tile (`register_tile`) holds a
row of output pixels x channel vectors, and the loops run kernel row, pixel, kernel column: the kw
taps of one pixel reuse the input vectors just loaded for its neighbour, so the accumulators, one
kernel row of weights and the shared input vectors must fit the registers together (the generic
tile fills all of them with accumulators, and LLVM spilled).

Exactness: the staged buffer holds float32(x) for integer x of at most 16 bits, which float32
represents exactly, so reading it back equals the converted load it replaces.

Measured (`benchmarks/bench_depthwise.py`, Intel Xeon AVX-512, 1 thread, thread CPU time, load ~6):
MobileNetV2 int8's thirteen stride-1 depthwise layers 22-30 -> 35-43 GMAC/s, all seventeen 877 ->
603 us per inference, the whole int8 model 3.17 -> 2.97 ms; float ones 18-40 -> 20-53 GMAC/s. At
batch 32 the int8 stride-1 layers take 21.2 instead of 32.5 ms.
Only stride 1 (and dilation 1) is taken: a stride-2 output reads a new 2x2 block of inputs, so the
staged window saves little over converting per load, and measured no faster (20-23 vs 24-32 GMAC/s).
"""

from __future__ import annotations

import tvm_ffi
from tvm import ir, s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base.common_schedules import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.tirx.analysis import undefined_vars

from ..machine import vector_unit
from .common import consumer_chain, const_extent, innermost_index, is_var, parallelize
from .tiled import channel_lanes

#: the staged input window of one block of outputs should stay in L1 with room for the weights
STAGE_BYTES = 16 * 1024
#: vector registers the register tile leaves to LLVM beyond its accumulators, weights and loads
SPARE_REGISTERS = 2


class DepthwiseConv(CPUScheduleRule):
    """Schedule a function whose one reduction is a channels-last depthwise convolution (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        main = _depthwise_block(sch, infos)
        if main is None:
            return None
        unit = vector_unit(target)
        dtype = str(sch.get(main.block_rv).writes[0].source.dtype)
        spatial = [int(d) for d in main.dom()[:len(main.dom_kind().rstrip("R"))]]
        lanes = channel_lanes(spatial[-1], unit.lanes(dtype))
        if spatial[-1] % lanes:
            return None
        if not _unit_stride(sch, main.block_rv):
            return None
        window = _window(sch, main.block_rv)
        sch = _float_window(sch, window, dtype)
        infos = normalize_prim_func(sch)
        main = next(b for b in infos if b.is_reduction())
        window = sch.get_sblock(window)
        try_inline(sch, [b for b in infos if b is not main and not sch.get(b.block_rv).same_as(sch.get(window))])
        tile_depthwise(sch, main.block_rv, window, lanes, unit.registers)
        return sch


def _depthwise_block(sch: s_tir.Schedule, infos):
    """The block info of a depthwise convolution: one reduction over the two window axes only, whose
    output, input and weight all index the channel (the innermost spatial axis) innermost; else None.

    Pooling (no weight) and convolutions reducing over input channels do not match.
    """
    if infos is None:
        return None
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


def _data_read(sch: s_tir.Schedule, block):
    """The input (not the weight) region of the convolution: the one indexed by spatial iterators."""
    iters = sch.get(block).iter_vars
    spatial = [iv.var for iv in iters if iv.iter_type == tirx.IterVar.DataPar]

    def uses_spatial(region) -> bool:
        used = [v for r in region.region for v in undefined_vars(r.min, [])]
        return any(v.same_as(s) for v in used for s in spatial[:-1])

    return next(r for r in sch.get(block).reads if uses_spatial(r))


def _unit_stride(sch: s_tir.Schedule, block) -> bool:
    """Whether the block iterates [(batch,) height, width, channels, kh, kw] of an NHWC output (no
    unit axis dropped) and its input window is the output plus the kernel minus one along height
    and width: stride 1 and dilation 1 (strided layers are left to `TiledReduction`, see the module doc)."""
    extents = [int(iv.dom.extent) for iv in sch.get(block).iter_vars]
    out = [int(d) for d in sch.get(block).writes[0].source.shape]
    data = [int(d) for d in _data_read(sch, block).source.shape]
    kernel_rows, kernel_cols = extents[-2:]
    return (len(out) == 4 and len(data) == 4 and extents[-5:-2] == out[-3:]
            and data[-3] == out[-3] + kernel_rows - 1 and data[-2] == out[-2] + kernel_cols - 1)


def _window(sch: s_tir.Schedule, block) -> str:
    """Name of the block producing the convolution's input window: the padding block, or a copy of
    the input made here when the convolution reads the function's input directly (no padding)."""
    data = _data_read(sch, block).source
    producers = [p for p in sch.get_producers(block) if sch.get(p).writes[0].source.same_as(data)]
    if producers:
        return sch.get(producers[0]).name_hint
    index = next(i for i, r in enumerate(sch.get(block).reads) if r.source.same_as(data))
    return sch.get(sch.cache_read(block, index, "global")).name_hint


def _float_window(sch: s_tir.Schedule, window: str, dtype: str) -> s_tir.Schedule:
    """The schedule with the window buffer in `dtype` (float32) when it holds narrower values that the
    convolution converts on every load: the conversion moves into the window copy.

    `unsafe_set_dtype` stores cast(value, dtype) and reads back as cast(cast(load, old), dtype); the
    outer pair is dropped here, which is exact because every stored value came from the old type
    (an integer of at most 16 bits, exactly representable in float32).
    """
    block = sch.get_sblock(window)
    old = str(sch.get(block).writes[0].source.dtype)
    if old == dtype or not dtype.startswith("float") or old not in ("int8", "uint8", "int16", "uint16"):
        return sch
    sch.unsafe_set_dtype(block, 0, dtype)
    converted = sch.get(block).writes[0].source

    def strip(node):
        inner = node.value
        if str(node.ty) == dtype and isinstance(inner, tirx.Cast) and str(inner.ty) == old \
                and isinstance(inner.value, ir.TensorLoad) and inner.value.source.same_as(converted):
            return inner.value
        return node

    return s_tir.Schedule(tvm_ffi.structural_map(sch.mod["main"], (tirx.Cast, strip)))


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


def stage_rows(height: int, window_row_bytes: int, kernel_rows: int) -> int:
    """Output rows per block: the largest divisor of `height` whose input window rows,
    rows + kernel_rows - 1 of `window_row_bytes` each, fit STAGE_BYTES (at least 1)."""
    fits = [r for r in range(1, height + 1)
            if height % r == 0 and (r + kernel_rows - 1) * window_row_bytes <= STAGE_BYTES]
    return max(fits, default=1)


def tile_depthwise(sch: s_tir.Schedule, block, window, lanes: int, registers: int) -> None:
    """Block the output [(batch,) height, width, channels] into register tiles and stage the window.

    Loops: channel blocks, batch, row blocks, column blocks (parallel) | window copy | rows in the
    block | kernel rows | pixels of the tile (unrolled) | kernel columns (unrolled) | channel vectors.
    """
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    n_spatial = sum(1 for iv in iters if iv.iter_type == tirx.IterVar.DataPar)
    *batch, h, w, c = loops[:n_spatial]
    kh, kw = loops[n_spatial:]
    extents = [int(iv.dom.extent) for iv in iters]
    height, width, channels, kernel_rows, kernel_cols = extents[n_spatial - 3:]
    vec, pixels = register_tile(channels, width, lanes, registers - SPARE_REGISTERS, kernel_cols)
    rows = stage_rows(height, (pixels + kernel_cols - 1) * vec * 4, kernel_rows)
    c_out, c_in = sch.split(c, [None, vec])
    w_out, w_in = sch.split(w, [None, pixels])
    h_out, h_in = sch.split(h, [None, rows])
    sch.reorder(c_out, *batch, h_out, w_out, h_in, kh, w_in, kw, c_in)
    epilogue = consumer_chain(sch, block)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, h_in, preserve_unit_loops=False)
    for ep in epilogue:
        sch.reverse_compute_inline(ep)
    tile_pixels = sch.get_loops(local)[-2]
    _vectorize(sch, sch.get_loops(local)[-1], lanes)
    sch.unroll(tile_pixels)
    sch.unroll(w_in)
    sch.unroll(kw)
    _vectorize(sch, c_in, lanes)
    sch.compute_at(window, w_out, preserve_unit_loops=False)
    sch.set_scope(window, 0, "local")
    _vectorize(sch, sch.get_loops(window)[-1], lanes)
    work = 1
    for e in extents:
        work *= e
    parallelize(sch, [c_out, *batch, h_out, w_out], work)
    init = sch.decompose_reduction(block, kh)
    init_loops = sch.get_loops(init)
    _vectorize(sch, init_loops[-1], lanes)
    sch.unroll(init_loops[-2])


def _vectorize(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """Vectorize `loop` in `lanes` vectors, unrolled when it spans several."""
    extent = const_extent(sch.get(loop).extent)
    if extent is not None and extent > lanes and extent % lanes == 0:
        vectors, vector = sch.split(loop, [None, lanes])
        sch.unroll(vectors)
        sch.vectorize(vector)
    else:
        sch.vectorize(loop)
