"""int16 convolutions and matmuls as pairwise dot products: packed weights and the `vpmaddwd` intrinsic.

`int8.integer_conv_matmul` leaves `conv2d(int16 NHWC, int16 HWIO, out_dtype=int32)`. Vectorized over
output channels as it is, LLVM widens every product to int32 and multiplies with `vpmulld` (8 products
per instruction, 10-cycle latency on Zen). x86's `vpmaddwd` multiplies 16 int16 pairs and adds adjacent
products into 8 int32 lanes in one instruction, exactly, so two input channels advance at once:

    acc[o] += x[c] * w[c, o] + x[c+1] * w[c+1, o]        for 8 (AVX2) or 16 (AVX-512) outputs o

That needs the weights of channel pairs side by side: HWIO [kh, kw, C, O] is packed (numpy, at compile
time) to [kh, kw, C/2, O, 2], and the convolution is written in that layout (`conv2d_nhwc_pairs`). The
schedule rule `schedules.pairs.TiledPairs` tiles it like any convolution and tensorizes the innermost
[outputs x pair] loops with `PAIR_DOT[lanes]` (AVX-512 VNNI's `vpdpwssd` fuses the add).

Matmuls with a constant 2-D weight [K, N] (even K) are packed the same way, to [K/2, N, 2]
(`matmul_pairs`), and take the same schedule.

Applied on x86 targets with AVX2 or AVX-512, to groups=1 convolutions with an even channel count and
to such matmuls; depthwise and odd-channel convolutions and activation x activation matmuls keep the
plain int16 schedule.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.ir.expr import Constant
from tvm.script import tirx as T

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
#: output lanes per instruction -> tensor intrinsic name
PAIR_DOT = {8: "graphpress_pair_dot_8_avx2", 16: "graphpress_pair_dot_16_avx512"}
_LLVM_INTRINSIC = {8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}
BLOCK_NAME = "conv2d_nhwc_pairs"


def _pair_dot(lanes: int):
    """(description, implementation) of C[i] += sum_k int32(A[k]) * int32(B[i, k]), i < lanes, k < 2.

    C is the register tile's `local` accumulator buffer.
    """

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((lanes, 2), "int16", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((lanes, 2), "int16", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
            broadcast = T.reinterpret(T.broadcast(pair, lanes), dtype=f"int16x{2 * lanes}")
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_LLVM_INTRINSIC[lanes]), broadcast,
                B.vload([0, 0], dtype=f"int16x{2 * lanes}"), dtype=f"int32x{lanes}")

    return desc, impl


def register_intrinsics() -> None:
    """Register the pair-dot tensor intrinsics with TVM (once per process)."""
    from tvm.s_tir import TensorIntrin

    for lanes, name in PAIR_DOT.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *_pair_dot(lanes))


def conv2d_nhwc_pairs(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation) -> te.Tensor:
    """NHWC int16 convolution with [kh, kw, C/2, O, 2] int16 weights, int32 result."""
    n, h, w, _ = (int(d) for d in data.shape)
    kh, kw, pairs, channels, _ = (int(d) for d in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    padded = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], name="pad_temp") if any(padding) else data
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    rc, rp = te.reduce_axis((0, pairs), "rc"), te.reduce_axis((0, 2), "rp")
    return te.compute(
        (n, out_h, out_w, channels),
        lambda b, y, x, o: te.sum(
            padded[b, y * sh + ry * dh, x * sw + rx * dw, rc * 2 + rp].astype("int32")
            * kernel[ry, rx, rc, o, rp].astype("int32"), axis=[ry, rx, rc, rp]),
        name=BLOCK_NAME)


def matmul_pairs(data: te.Tensor, kernel: te.Tensor) -> te.Tensor:
    """[..., M, K] int16 times [K/2, N, 2] int16 packed weights, int32 result [..., M, N]."""
    pairs, columns, _ = (int(d) for d in kernel.shape)
    rc, rp = te.reduce_axis((0, pairs), "rc"), te.reduce_axis((0, 2), "rp")
    return te.compute(
        (*data.shape[:-1], columns),
        lambda *index: te.sum(data[(*index[:-1], rc * 2 + rp)].astype("int32")
                              * kernel[rc, index[-1], rp].astype("int32"), axis=[rc, rp]),
        name=BLOCK_NAME)


@relax.expr_functor.mutator
class _PairConvolutions(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not (_fits(call) or _fits_matmul(call)):
            return call
        weight = call.args[1]
        if isinstance(weight, relax.Var):
            weight = self.lookup_binding(weight)
        if not isinstance(weight, Constant):
            return call
        if call.op == _MATMUL:
            k, n = weight.value.numpy().shape
            packed = np.ascontiguousarray(weight.value.numpy().reshape(k // 2, 2, n).transpose(0, 2, 1))
            return self.builder_.call_te(matmul_pairs, call.args[0], relax.const(packed, "int16"),
                                         primfunc_name_hint="matmul_pairs")
        hwio = weight.value.numpy()
        kh, kw, cin, cout = hwio.shape
        packed = np.ascontiguousarray(hwio.reshape(kh, kw, cin // 2, 2, cout).transpose(0, 1, 2, 4, 3))
        attrs = call.attrs
        return self.builder_.call_te(
            conv2d_nhwc_pairs, call.args[0], relax.const(packed, "int16"),
            strides=[int(s) for s in attrs.strides], padding=[int(p) for p in attrs.padding],
            dilation=[int(d) for d in attrs.dilation], primfunc_name_hint="conv2d_pairs")


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


def pair_convolutions(target):
    """Pass: int16 NHWC convolutions and weight matmuls -> `conv2d_nhwc_pairs` / `matmul_pairs` with packed
    weights (x86 AVX2/AVX-512 only)."""
    from .machine import vector_unit

    enabled = not str(target.attrs.get("mtriple", "x86_64")).startswith("aarch64") and vector_unit(target).bits >= 256

    @tvm.transform.module_pass(opt_level=0, name="PairConvolutions")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not enabled:
            return mod
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator = _PairConvolutions(mod)
                new = mutator.visit_expr(func)
                mod = mutator.builder_.get()
                mod[gvar] = new
        return relax.transform.DeadCodeElimination()(mod)

    return transform
