"""The Relax pass sequence graphpress uses for CPU (llvm) targets.

    mod = cpu.lower(mod, target)     # then tvm.compile(mod, target)

`lower` = `prepare` (steps 0-2, unscheduled: what MetaSchedule tuning extracts tasks from and a
tuning database applies to) followed by `schedule` (step 3, only functions not scheduled yet, so
tuned functions keep their tuned schedules).

0. Clip as Relax ops (see `relax_rewrites`), so that layouts propagate through ReLU6; QDQ
   convolutions and matmuls to integer arithmetic (see `int8`).
1. Layout: convolutions to channels-last (NHWC activations, HWIO weights) so the output channel
   is the contiguous, vectorized axis of both the output and the weights; the weight transposes
   fold into the constants, and layout conversions between consecutive convolutions cancel.
   Output channels that no vector divides are padded (see `channel_padding`); int8 convolutions and
   matmuls get packed weights (see `pairs`) and their requantization epilogues are folded into one
   multiply-add, round and clamp (see `requantize`); float ones read their weights from panels of
   one vector of output channels (see `panels`).
   exp, erf, tanh and softmax as TVM's polynomial `fast_*` versions (~1e-7 relative error), which
   vectorize; the default lowering calls scalar libm per element (GELU's erf was half of MiniLM's time).
2. Legalize and fuse: conv/matmul + bias + activation + residual add become one PrimFunc.
3. Schedule every PrimFunc with the rules in `schedules` (target-parameterized, not tuned).
"""

from __future__ import annotations

def prepare_passes(target) -> list:
    """Layout, legalization and fusion passes for `target`, in order (no schedules)."""
    from tvm import relax

    from .channel_padding import pad_output_channels
    from .int8 import elementwise_qdq, integer_conv_matmul
    from .pairs import pack_dot_products
    from .panels import pack_weight_panels
    from .relax_rewrites import channels_last, clip_to_relax_ops, fold_constants_numpy
    from .requantize import fold_requantize

    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        integer_conv_matmul(),  # before constant folding turns the weights' DequantizeLinear into floats
        elementwise_qdq(),
        fold_constants_numpy(),
        clip_to_relax_ops(),
        channels_last(),
        fold_constants_numpy(),
        pad_output_channels(),
        pack_dot_products(target),
        pack_weight_panels(target),
        fold_requantize(),
        relax.transform.FastMathTransform(),  # vectorizable exp/erf/tanh/softmax: libm calls are scalar
        relax.transform.FoldConstant(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def prepare(mod, target):
    """Fused, channels-last, legalized module for the llvm `target`, not yet scheduled."""
    import tvm

    with target:
        return tvm.transform.Sequential(prepare_passes(target))(mod)


def schedule(mod, target):
    """Apply the default schedule rules to every PrimFunc of `mod` that has no schedule yet."""
    from tvm.s_tir import dlight

    from .schedules import RULES

    with target:
        return dlight.ApplyDefaultSchedule(*RULES)(mod)


def lower(mod, target):
    """Lower an imported Relax module for the llvm `target`: scheduled, ready for `tvm.compile`."""
    return schedule(prepare(mod, target), target)
