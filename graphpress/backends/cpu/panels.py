"""Float convolutions and matmuls with constant weights read from packed weight panels.

The register tile (`schedules.tiled`) computes a block of output channels for a few pixels and walks
the whole reduction (kh x kw x input channels, or K) once per tile. In the channels-last weight
HWIO [kh, kw, C, O] (a matmul's [K, N]) the tile's channels at consecutive reduction steps are O
floats apart: 8 KB on a 2048-channel layer, a new page and a new cache set per step. Where the
weights are large and the map small (ResNet-50's 7x7 layers, 1024 -> 2048) every tile re-streams
its slice of them that way, and the layer ran at a third of onnxruntime's speed. Measured with the
same schedule on a standalone matmul (Intel Xeon, AVX-512, 1 thread), GMAC/s:

    49 x 1024 -> 2048:   plain [K, N] 35,  panels 90   (onnxruntime 92)
    196 x 256 -> 1024:   plain [K, N] 91,  panels 113  (onnxruntime 93)

Here each weight is re-laid out at compile time as panels of `V` output channels, [O/V, kh, kw, C, V]
([N/V, K, V] for a matmul), V being the vector the schedule will use for that channel count
(`schedules.tiled.channel_lanes`): one tile's weights are then one or a few contiguous streams. The
compute indexes the panel with (o // V, ..., o % V), which the schedule's vector split turns back
into contiguous vector loads (`schedules.tiled` accepts that innermost index).

Applied to float32 NHWC/HWIO convolutions with groups = 1 and to matmuls whose second operand is a
constant 2-D weight, when V divides the output channels (`channel_padding` pads the ones it does
not); depthwise convolutions read one weight vector per tap already and are left alone.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, te
from tvm.ir.expr import Constant

from .machine import vector_unit
from .pairs import padded_window
from .relax_rewrites import _constant, mutator_pass
from .schedules.tiled import channel_lanes

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
#: TE block name of the packed computes (the schedule rule finds its reduction by structure, not name)
BLOCK_NAME = "panel_dot"


def conv2d_nhwc_panels(data: te.Tensor, panels: te.Tensor, strides, padding, dilation) -> te.Tensor:
    """NHWC convolution with [O/V, kh, kw, C, V] weight panels."""
    blocks, kh, kw, channels, width = (int(d) for d in panels.shape)
    padded, out_h, out_w, (sh, sw), (dh, dw) = padded_window(data, kh, kw, strides, padding, dilation)
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, channels), "rc")
    return te.compute(
        (int(data.shape[0]), out_h, out_w, blocks * width),
        lambda b, y, x, o: te.sum(padded[b, y * sh + ry * dh, x * sw + rx * dw, rc]
                                  * panels[o // width, ry, rx, rc, o % width], axis=[ry, rx, rc]),
        name=BLOCK_NAME)


def matmul_panels(data: te.Tensor, panels: te.Tensor) -> te.Tensor:
    """[..., M, K] times [N/V, K, V] weight panels -> [..., M, N]."""
    blocks, depth, width = (int(d) for d in panels.shape)
    rk = te.reduce_axis((0, depth), "rk")
    return te.compute(
        (*data.shape[:-1], blocks * width),
        lambda *index: te.sum(data[(*index[:-1], rk)] * panels[index[-1] // width, rk, index[-1] % width], axis=rk),
        name=BLOCK_NAME)


def to_panels(weight: np.ndarray, width: int) -> np.ndarray:
    """[..., O] -> [O/width, ..., width]: the output axis split into panels, panel index outermost."""
    *lead, outputs = weight.shape
    split = weight.reshape(*lead, outputs // width, width)
    return np.ascontiguousarray(np.moveaxis(split, -2, 0))


def _fits_conv(call) -> bool:
    attrs = call.attrs
    return (call.op == _CONV2D and attrs.data_layout == "NHWC" and attrs.kernel_layout == "HWIO"
            and attrs.out_layout in ("", "NHWC") and int(attrs.groups) == 1)


def _rank(expr) -> int | None:
    """The rank of a tensor expression, None when the importer left it unknown."""
    ndim = getattr(expr.ty, "ndim", -1)
    return None if ndim == -1 else int(ndim)


def _fits_matmul(call) -> bool:
    """A matmul of a rank >= 2 tensor by a 2-D weight."""
    return call.op == _MATMUL and _rank(call.args[1]) == 2 and (_rank(call.args[0]) or 0) >= 2


@relax.expr_functor.mutator
class _Panelizer(relax.PyExprMutator):
    """Rewrites fitting float32 convolutions / matmuls for a vector unit of `lanes` float32 lanes."""

    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op) or not (_fits_conv(call) or _fits_matmul(call)):
            return call
        if any(str(a.ty.dtype) != "float32" for a in call.args[:2]) or str(call.ty.dtype) != "float32":
            return call
        weight: Constant | None = _constant(self, call.args[1])
        if weight is None:
            return call
        value = weight.value.numpy()
        width = channel_lanes(value.shape[-1], self.lanes)
        if value.shape[-1] % width:
            return call
        panels = relax.const(to_panels(value, width), "float32")
        if call.op == _MATMUL:
            return self.builder_.call_te(matmul_panels, call.args[0], panels, primfunc_name_hint="matmul_panels")
        attrs = call.attrs
        return self.builder_.call_te(
            conv2d_nhwc_panels, call.args[0], panels, strides=[int(s) for s in attrs.strides],
            padding=[int(p) for p in attrs.padding], dilation=[int(d) for d in attrs.dilation],
            primfunc_name_hint="conv2d_panels")


def pack_weight_panels(target):
    """Pass: float32 channels-last convolutions (groups = 1) and constant-weight matmuls -> weight panels."""
    return mutator_pass(functools.partial(_Panelizer, lanes=vector_unit(target).lanes("float32")), "PackWeightPanels")
