"""Default CPU schedules for fused Relax PrimFuncs, as DLight-style rules (no tuning).

- `TiledReduction`: conv2d (regular, depthwise, 1x1), dense/matmul/batch-matmul and pooling, i.e. any
  reduction whose output's innermost axis is also the innermost axis of an operand: register tile
  of (second-innermost x vector-of-innermost) accumulators, vectorized and unrolled, reduction loops
  around it, parallel outer loops, and the fused epilogue (bias, activation, residual) computed per
  tile while it is still in registers.
- `DepthwiseConv`: depthwise convolutions: the same kind of tile, but sized to leave registers for
  one kernel row of weights, with the kernel columns unrolled inside the pixels so that neighbouring
  pixels share their input loads and int8 conversions (see `.depthwise`).
- `TiledPairs`: the same tile for int16 convolutions with channel-pair packed weights, tensorized
  with x86 `vpmaddwd` (see `..pairs`).
- `RowReduction`: the other reductions (softmax, layer norm, mean along the innermost axis):
  parallel over independent rows, element-wise parts vectorized. (TVM 0.27's DLight CPU `Reduction`
  rule is not used: on a [1, N] softmax it parallelizes over N and every thread recomputes, and races
  on, the shared row maximum and sum.)
- `Injective`: everything else (element-wise, transposes, padding): inlined, parallel and vectorized.

The rules read the vector width and register count from the target (`machine.vector_unit`).
"""

from .depthwise import DepthwiseConv
from .injective import Injective
from .pairs import TiledPairs
from .reduction import RowReduction
from .tiled import TiledReduction

RULES = (TiledPairs(), DepthwiseConv(), TiledReduction(), RowReduction(), Injective())

__all__ = ["RULES", "DepthwiseConv", "Injective", "RowReduction", "TiledPairs", "TiledReduction"]
