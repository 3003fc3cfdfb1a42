"""Relax-level rewrites that make the imported graph friendly to layout conversion and fusion.

- `clip_to_relax_ops`: TVM's ONNX importer emits Clip as opaque `call_tir(maximum|minimum, (x, bound))`
  PrimFuncs. ConvertLayout cannot see through those, so every Clip (ReLU6 in MobileNets) would be
  wrapped in a pair of NHWC<->NCHW transposes. With a constant bound they become `R.maximum` /
  `R.minimum`, which ConvertLayout and FuseOps understand (ReLU6 fuses into the convolution).
- `fold_constants_numpy`: the constant expressions the importer and ConvertLayout leave behind
  (weight `permute_dims` / `reshape`, the Clip bounds' `where(isnan(c), inf, c)`, the
  DequantizeLinear of QDQ biases) computed with
  numpy. `relax.transform.FoldConstant` builds and runs one TVM kernel per constant expression,
  which took 35 s on MobileNetV2; numpy takes milliseconds. FoldConstant still runs afterwards for
  anything not in the table.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

log = logging.getLogger(__name__)

#: conv2d layout the schedules are written for: output channels innermost in data and weights
CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
#: the importer's Clip PrimFuncs (topi.maximum / topi.minimum through emit_te) -> the Relax op
_CLIP_FUNCS = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}


def _permute(call, value):
    axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
    return np.transpose(value, axes)


def _dequantize(call, data, scale, zero_point):
    """ONNX DequantizeLinear: (data - zero_point) * scale, parameters along `axis` when not scalar."""
    shape = [1] * data.ndim
    if scale.size > 1:
        shape[int(call.attrs.axis)] = -1
    zero_point = zero_point.astype(np.float32).reshape(shape if zero_point.size > 1 else ())
    return ((data.astype(np.float32) - zero_point) * scale.reshape(shape if scale.size > 1 else ())).astype(np.float32)


#: op name -> numpy evaluation of a call whose tensor arguments are all constants
_NUMPY_OPS = {
    "relax.permute_dims": _permute,
    "relax.reshape": lambda call, value, _shape=None: value.reshape([int(d) for d in call.ty.shape.values]),
    "relax.isnan": lambda call, value: np.isnan(value),
    "relax.where": lambda call, cond, a, b: np.where(cond, a, b),
    "relax.dequantize": _dequantize,  # int8/int32 weights and biases of QDQ models
}


def _constant(mutator: relax.PyExprMutator, expr) -> Constant | None:
    """`expr` if it is a constant, or the constant a dataflow variable is bound to."""
    if isinstance(expr, relax.Var):
        expr = mutator.lookup_binding(expr)
    return expr if isinstance(expr, Constant) else None


@relax.expr_functor.mutator
class _ClipToRelaxOps(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != _CALL_TIR or not isinstance(call.args[0], tvm.ir.GlobalVar):
            return call
        name = call.args[0].name_hint.rstrip("0123456789_")
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        if name not in _CLIP_FUNCS or len(args) != 2:
            return call
        bound = _constant(self, args[1])
        if bound is None or bound.value.numpy().ndim != 0:
            return call
        return _CLIP_FUNCS[name](args[0], bound)


@relax.expr_functor.mutator
class _FoldConstantsNumpy(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        evaluate = _NUMPY_OPS.get(getattr(call.op, "name", None))
        if evaluate is None:
            return call
        tensors = [a for a in call.args if not isinstance(a, relax.ShapeExpr)]
        consts = [_constant(self, a) for a in tensors]
        if any(c is None for c in consts):
            return call
        value = np.asarray(evaluate(call, *[c.value.numpy() for c in consts]))
        return relax.const(value.copy(order="C"), str(call.ty.dtype))  # ascontiguousarray would make 0-d 1-d


def mutator_pass(mutator_class, name: str):
    """A module pass running `mutator_class(mod)` over every Relax function, then dead-code elimination.

    Works on a copy: a module pass receives the caller's module, which must stay as it was. The
    PrimFuncs a mutator adds (`builder_.call_te`) are in its builder's module, which is kept."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mod.clone()
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator = mutator_class(mod)
                new = mutator.visit_expr(func)
                mod = mutator.builder_.get()
                mod[gvar] = new
        return relax.transform.DeadCodeElimination()(mod)

    return transform


def clip_to_relax_ops():
    """Pass: the importer's Clip PrimFuncs with constant bounds -> R.maximum / R.minimum."""
    return mutator_pass(_ClipToRelaxOps, "ClipToRelaxOps")


def fold_constants_numpy():
    """Pass: layout changes, reshapes and Clip-bound sanitizing of constants evaluated with numpy."""
    return mutator_pass(_FoldConstantsNumpy, "FoldConstantsNumpy")


def channels_last():
    """Pass: ConvertLayout to `CONV_LAYOUT`; a module it fails on is kept in its own layout.

    TVM 0.27's layout inference rejects some graphs (the onnx wheel's light ResNet-50: "Invalid
    SLayout"); those still compile, with NCHW convolutions the register tile does not take.
    """

    @tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        try:
            return relax.transform.ConvertLayout(CONV_LAYOUT)(mod)
        except tvm.error.InternalError as exc:
            log.warning("channels-last layout conversion failed, keeping the model's layout: %s",
                        str(exc).strip().splitlines()[-1][:200])
            return mod

    return transform
