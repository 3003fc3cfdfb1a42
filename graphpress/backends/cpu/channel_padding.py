"""Output channels padded to whole vectors: conv2d / matmul with a constant weight and an odd width.

The register tile vectorizes the output channels, in vectors that divide their count (`schedules.tiled`).
A count that no 4-lane vector divides (MobileNetV2's 1001 classes = 7 x 11 x 13) leaves a
13-channel tile of scalar and partial-vector code: its 1280 x 1001 classifier ran 3x slower than
onnxruntime's (which pads to 1008 internally). Here the weight's output axis is padded with zeros
to a multiple of `MULTIPLE` (a whole number of AVX-512, AVX2 and NEON vectors) at compile time, and
the result is sliced back to the real channels right after the convolution or matmul; the bias,
activation and requantization that followed then run on the slice, in their own small function.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from .relax_rewrites import _constant, mutator_pass

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
#: padded channel counts are multiples of this: 1, 2 or 4 vectors of 16, 8 or 4 lanes
MULTIPLE = 16
#: narrower outputs are left alone: a small tile of partial vectors costs little there (ResNet-8's 10 classes)
MIN_CHANNELS = 64


def needs_padding(channels: int, dtype: str = "float32") -> bool:
    """Whether no 4-lane vector divides `channels` and the layer is wide enough for it to matter; for
    integer (int16 / int8) weights, whether no 8-lane vector divides them: the packed dot-product
    kernels (`pairs`) have no partial-vector form, and without them the convolution is scalar code
    (a pruned 51-channel int8 conv: 0.49 ms, ten times the rest of its network)."""
    if dtype in ("int16", "int8"):
        return channels % 8 != 0
    return channels % 4 != 0 and channels >= MIN_CHANNELS


@relax.expr_functor.mutator
class _PadOutputChannels(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op not in (_CONV2D, _MATMUL) or len(call.args) != 2:
            return call
        weight = _constant(self, call.args[1])
        if weight is None or not _pads_last_axis(call, weight):
            return call
        value = weight.value.numpy()
        channels = value.shape[-1]
        padded = np.pad(value, [(0, 0)] * (value.ndim - 1) + [(0, -channels % MULTIPLE)])
        wide = relax.Call(call.op, [call.args[0], relax.const(padded, str(value.dtype))], call.attrs)
        rank = len(call.ty.shape.values)
        return relax.op.strided_slice(self.builder_.emit(wide), axes=[rank - 1], begin=[0], end=[channels])


def _pads_last_axis(call, weight: Constant) -> bool:
    """A channels-last conv2d (HWIO weight, one group) or a matmul with a 2-D weight, odd output width."""
    shape = weight.value.numpy().shape
    if call.op == _CONV2D:
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout) != ("NHWC", "HWIO") or int(attrs.groups) != 1 \
                or attrs.out_layout not in ("", "NHWC"):
            return False
    elif len(shape) != 2:
        return False
    return needs_padding(int(shape[-1]), str(weight.value.numpy().dtype))


def pad_output_channels():
    """Pass: conv2d (NHWC/HWIO) and matmul with constant weights of odd width -> padded, then sliced."""
    return mutator_pass(_PadOutputChannels, "PadOutputChannels")
