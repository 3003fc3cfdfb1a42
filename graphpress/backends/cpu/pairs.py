"""int8 convolutions and matmuls as grouped dot products: packed weights and x86 dot-product intrinsics.

`int8.integer_conv_matmul` leaves `conv2d(int16 NHWC, int16 HWIO, out_dtype=int32)` (and matmuls
alike), on `int16(xq) - zero_point`. Vectorized over output channels as it is, LLVM widens every
product to int32 and multiplies with `vpmulld` (8 products per instruction, 10-cycle latency on Zen).
x86 has instructions that multiply groups of adjacent narrow values and add each group into one int32
lane, exactly:

- pairs, `vpmaddwd` (AVX2, AVX-512): int16 x int16, two input channels per output lane;
- quads, `vpdpbusd` (AVX-512 VNNI, AVX-VNNI): uint8 x int8, four input channels per lane, with the
  accumulation fused.

    acc[o] += x[c] * w[c, o] + ... + x[c+g-1] * w[c+g-1, o]       for 8 (ymm) or 16 (zmm) outputs o

That needs the weights of a channel group side by side: HWIO [kh, kw, C, O] is packed (numpy, at
compile time) to [O/V, kh, kw, C/g, V, g] (`conv2d_nhwc_packed`), a matmul weight [K, N] to
[N/V, K/g, V, g] (`matmul_packed`), in panels of V = the instruction's int32 lanes. The schedule rule
`schedules.pairs.TiledPairs` tiles them like any convolution and tensorizes the innermost
[outputs x group] loops with `DOT[lanes, g]`.

Quads need unsigned activations: u = xq + 128 for int8 xq (u = xq for uint8), i.e. u = (xq - zx) + c
with c = zx + 128 (or zx), so

    sum (xq - zx) * w  =  sum u * w  -  c * sum w

where the last term is a per-output-channel constant subtracted after the product. Padding the input
with u = c (the real zero) keeps padded convolutions exact. Weights must fit int8 (symmetric, as
insert-qdq makes them) and the reduction length be a multiple of 4; otherwise pairs are used.

Applied on x86 targets with AVX2 or AVX-512 (quads when the target has VNNI) to groups=1
convolutions with an even channel count and to matmuls with a constant 2-D weight; depthwise and
odd-channel convolutions and activation x activation matmuls keep the plain int16 schedule.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.ir.expr import Constant
from tvm.script import tirx as T

from .relax_rewrites import _constant, mutator_pass

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_ASTYPE = tvm.ir.Op.get("relax.astype")
_SUBTRACT = tvm.ir.Op.get("relax.subtract")
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")
#: (int32 output lanes, products per lane) -> tensor intrinsic name
DOT = {(8, 2): "graphpress_pair_dot_8_avx2", (16, 2): "graphpress_pair_dot_16_avx512",
       (8, 4): "graphpress_quad_dot_8_vnni", (16, 4): "graphpress_quad_dot_16_vnni"}
_LLVM_INTRINSIC = {(8, 2): "llvm.x86.avx2.pmadd.wd", (16, 2): "llvm.x86.avx512.pmaddw.d.512",
                   (8, 4): "llvm.x86.avx512.vpdpbusd.256", (16, 4): "llvm.x86.avx512.vpdpbusd.512"}
#: products per lane -> (activation dtype, weight dtype)
_DTYPES = {2: ("int16", "int16"), 4: ("uint8", "int8")}
BLOCK_NAME = "packed_dot"


def pair_lanes(widest: int, channels: int, group: int = 2) -> int | None:
    """int32 lanes of the widest instruction for `group` products per lane whose vectors divide the
    output channels: on AVX-512 a 24-channel conv takes the 8-lane (ymm) form rather than no kernel."""
    return next((lanes for lanes in (widest, widest // 2) if (lanes, group) in DOT and channels % lanes == 0), None)


def _grouped_dot(lanes: int, group: int):
    """(description, implementation) of C[i] += sum_k int32(A[k]) * int32(B[i, k]), i < lanes, k < group.

    C is the register tile's `local` accumulator buffer.
    """
    a_dtype, b_dtype = _DTYPES[group]
    c_dtype, c_scope = "int32", "local"  # names, not literals, in the annotations (pyflakes reads those as code)
    a_vector, b_vector = f"{a_dtype}x{group}", f"{b_dtype}x{group * lanes}"
    intrinsic = _LLVM_INTRINSIC[lanes, group]

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((group,), a_dtype, offset_factor=1), B: T.Buffer((lanes, group), b_dtype, offset_factor=1),
             C: T.Buffer((lanes,), c_dtype, offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def pair_impl(A: T.Buffer((group,), a_dtype, offset_factor=1), B: T.Buffer((lanes, group), b_dtype, offset_factor=1),
                  C: T.Buffer((lanes,), c_dtype, offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            both = T.reinterpret(A.vload([0], a_vector), dtype="int32")
            broadcast = T.reinterpret(T.broadcast(both, lanes), dtype=f"int16x{2 * lanes}")
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic), broadcast, B.vload([0, 0], dtype=b_vector), dtype=f"int32x{lanes}")

    @T.prim_func(s_tir=True)
    def quad_impl(A: T.Buffer((group,), a_dtype, offset_factor=1), B: T.Buffer((lanes, group), b_dtype, offset_factor=1),
                  C: T.Buffer((lanes,), c_dtype, offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            four = T.reinterpret(A.vload([0], a_vector), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic), C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(four, lanes), dtype=f"uint8x{4 * lanes}"), B.vload([0, 0], dtype=b_vector),
                dtype=f"int32x{lanes}")

    return desc, (pair_impl if group == 2 else quad_impl)


def register_intrinsics() -> None:
    """Register the grouped dot-product tensor intrinsics with TVM (once per process)."""
    from tvm.s_tir import TensorIntrin

    for (lanes, group), name in DOT.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *_grouped_dot(lanes, group))


def padded_window(data: te.Tensor, kh: int, kw: int, strides, padding, dilation, pad_value=0):
    """(padded NHWC input, output height, output width, strides, dilation) of a kh x kw convolution.

    The padded copy is named `pad_temp` like the one TVM's own conv2d makes, so the schedules
    recognize it; it is `data` itself without padding."""
    _, h, w, _ = (int(d) for d in data.shape)
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    padded = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], pad_value=pad_value,
                         name="pad_temp") if any(padding) else data
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    return padded, out_h, out_w, (sh, sw), (dh, dw)


def conv2d_nhwc_packed(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation, pad_value=0) -> te.Tensor:
    """NHWC convolution with [O/V, kh, kw, C/g, V, g] packed weights, int32 result; padding with `pad_value`."""
    n = int(data.shape[0])
    blocks, kh, kw, groups, width, group = (int(d) for d in kernel.shape)
    padded, out_h, out_w, (sh, sw), (dh, dw) = padded_window(data, kh, kw, strides, padding, dilation, pad_value)
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    rc, rp = te.reduce_axis((0, groups), "rc"), te.reduce_axis((0, group), "rp")
    return te.compute(
        (n, out_h, out_w, blocks * width),
        lambda b, y, x, o: te.sum(
            padded[b, y * sh + ry * dh, x * sw + rx * dw, rc * group + rp].astype("int32")
            * kernel[o // width, ry, rx, rc, o % width, rp].astype("int32"), axis=[ry, rx, rc, rp]),
        name=BLOCK_NAME)


def matmul_packed(data: te.Tensor, kernel: te.Tensor) -> te.Tensor:
    """[..., M, K] times [N/V, K/g, V, g] packed weights, int32 result [..., M, N]."""
    blocks, groups, width, group = (int(d) for d in kernel.shape)
    rc, rp = te.reduce_axis((0, groups), "rc"), te.reduce_axis((0, group), "rp")
    return te.compute(
        (*data.shape[:-1], blocks * width),
        lambda *index: te.sum(data[(*index[:-1], rc * group + rp)].astype("int32")
                              * kernel[index[-1] // width, rc, index[-1] % width, rp].astype("int32"), axis=[rc, rp]),
        name=BLOCK_NAME)


def _pack(weight: np.ndarray, group: int, width: int) -> np.ndarray:
    """[..., C, O] -> [O/width, ..., C/group, width, group]: channel groups side by side for the dot
    product, in panels of `width` outputs (the instruction's int32 lanes) so that one tile's weights
    are one contiguous stream (see `panels`: 7x7 int8 layers ran at a third of the 14x14 ones' speed)."""
    *lead, channels, outputs = weight.shape
    split = weight.reshape(*lead, channels // group, group, outputs // width, width)
    return np.ascontiguousarray(np.moveaxis(split, [-2, -1, -3], [0, -2, -1]))


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    """Rewrites fitting int16 convolutions / matmuls; `quads` when the target has a u8 x s8 dot product."""

    def __init__(self, mod, quads: bool, lanes: int):
        super().__init__(mod)
        self.quads, self.lanes = quads, lanes

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not (_fits(call) or _fits_matmul(call)):
            return call
        weight = _constant(self, call.args[1])
        if weight is None:
            return call
        value = weight.value.numpy()
        unsigned = self._unsigned(call.args[0]) if self.quads and value.shape[-2] % 4 == 0 \
            and value.min() >= -128 and value.max() <= 127 else None
        group = 2 if unsigned is None else 4
        width = pair_lanes(self.lanes, value.shape[-1], group)
        if width is None:
            return call
        if unsigned is None:
            return self._emit(call, call.args[0], relax.const(_pack(value, 2, width), "int16"), 0, "pairs")
        data, shift = unsigned
        product = self._emit(call, data, relax.const(_pack(value.astype(np.int8), 4, width), "int8"), shift, "quads")
        correction = shift * value.astype(np.int64).reshape(-1, value.shape[-1]).sum(axis=0)
        return relax.op.subtract(product, relax.const(correction.astype(np.int32), "int32"))

    def _emit(self, call, data, packed, pad_value: int, kind: str):
        if call.op == _MATMUL:
            return self.builder_.call_te(matmul_packed, data, packed, primfunc_name_hint=f"matmul_{kind}")
        attrs = call.attrs
        return self.builder_.call_te(
            conv2d_nhwc_packed, data, packed, strides=[int(s) for s in attrs.strides],
            padding=[int(p) for p in attrs.padding], dilation=[int(d) for d in attrs.dilation],
            pad_value=pad_value, primfunc_name_hint=f"conv2d_{kind}")

    def _unsigned(self, data) -> tuple[relax.Expr, int] | None:
        """For data = int16(q) [- zx] with q int8/uint8, maybe transposed to channels-last after that:
        (the uint8 tensor u, c) with data = u - c."""
        expr = self.lookup_binding(data) if isinstance(data, relax.Var) else data
        if isinstance(expr, relax.Call) and expr.op == _PERMUTE_DIMS:
            inner = self._unsigned(expr.args[0])
            if inner is None:
                return None
            return self.builder_.emit(relax.op.permute_dims(inner[0], expr.attrs.axes)), inner[1]
        zero_point = 0
        if isinstance(expr, relax.Call) and expr.op == _SUBTRACT:
            shift = expr.args[1]
            shift = self.lookup_binding(shift) if isinstance(shift, relax.Var) else shift
            if not isinstance(shift, Constant) or shift.value.numpy().size != 1:
                return None
            zero_point = int(shift.value.numpy().reshape(()))
            expr = self.lookup_binding(expr.args[0]) if isinstance(expr.args[0], relax.Var) else expr.args[0]
        if not isinstance(expr, relax.Call) or expr.op != _ASTYPE:
            return None
        source = expr.args[0]
        dtype = str(source.ty.dtype)
        if dtype == "uint8":
            return source, zero_point
        if dtype != "int8":
            return None
        shifted = relax.op.add(relax.op.astype(source, "int16"), relax.const(128, "int16"))
        return self.builder_.emit(relax.op.astype(shifted, "uint8")), zero_point + 128


def _fits_matmul(call) -> bool:
    """An int16 matmul whose second operand is a 2-D weight with an even reduction length."""
    if call.op != _MATMUL:
        return False
    data, weight = call.args[0].ty, call.args[1].ty
    return (str(data.dtype) == "int16" and str(weight.dtype) == "int16" and str(call.ty.dtype) == "int32"
            and len(weight.shape.values) == 2 and int(weight.shape.values[0]) % 2 == 0)


def _fits(call) -> bool:
    if call.op != _CONV2D:
        return False
    attrs = call.attrs
    data, weight = call.args[0].ty, call.args[1].ty
    return (str(data.dtype) == "int16" and str(weight.dtype) == "int16" and str(call.ty.dtype) == "int32"
            and attrs.data_layout == "NHWC" and attrs.kernel_layout == "HWIO" and int(attrs.groups) == 1
            and int(weight.shape.values[2]) % 2 == 0 and attrs.out_layout in ("", "NHWC"))


def pack_dot_products(target):
    """Pass: int16 NHWC convolutions and weight matmuls -> `conv2d_nhwc_packed` / `matmul_packed` with
    packed weights: quads on x86 with VNNI, pairs on other AVX2 / AVX-512 x86 (nothing elsewhere)."""
    from .machine import vector_unit

    unit = vector_unit(target)
    if str(target.attrs.get("mtriple", "x86_64")).startswith("aarch64") or unit.bits < 256:
        return tvm.transform.module_pass(lambda mod, _ctx: mod, opt_level=0, name="PackDotProducts")
    quads = unit.dot_int8 in ("avx512vnni", "avxvnni")
    return mutator_pass(functools.partial(_Packer, quads=quads, lanes=unit.lanes("int32")), "PackDotProducts")
