"""The requantization fold (`graphpress.backends.cpu.requantize`) on Relax graphs built in code: fewer
element-wise operations, the same integers (exactly where only clamps and shifts merge, within one
step where the scales fold)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from graphpress.backends.cpu.requantize import fold_requantize  # noqa: E402

RNG = np.random.default_rng(0)
SHAPE = (1, 8, 8, 16)


def const(value, dtype="float32"):
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def build(chain) -> tvm.IRModule:
    """main(x: int32 accumulators or float32 values) -> `chain(x)`, one op per binding."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, chain.input_dtype))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(chain(builder, x))
        builder.emit_func_output(out)
    return builder.get()


def run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    executable = tvm.compile(relax.transform.LegalizeOps()(mod), target="llvm")
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def calls(mod: tvm.IRModule) -> int:
    return sum(1 for block in mod["main"].body.blocks for b in block.bindings if isinstance(b.value, relax.Call))


def quantize(builder, y, inverse, zero_point, dtype="int8"):
    """ONNX QuantizeLinear as `int8.elementwise_qdq` writes it."""
    info = np.iinfo(dtype)
    y = builder.emit(relax.op.multiply(y, const(inverse)))
    y = builder.emit(relax.op.round(y))
    y = builder.emit(relax.op.add(y, const(zero_point)))
    y = builder.emit(relax.op.maximum(y, const(info.min)))
    y = builder.emit(relax.op.minimum(y, const(info.max)))
    return builder.emit(relax.op.astype(y, dtype))


def to_unsigned(builder, q):
    """int8 -> uint8 by + 128, as the channel-quads kernels' inputs are made."""
    wide = builder.emit(relax.op.astype(q, "int16"))
    return builder.emit(relax.op.astype(builder.emit(relax.op.add(wide, const(128, "int16"))), "uint8"))


def conv_epilogue(builder, acc, relu6=True, shift=True):
    """acc (int32) * per-channel scale + bias, ReLU6, QuantizeLinear(zero point -128), + 128 -> uint8."""
    y = builder.emit(relax.op.astype(acc, "float32"))
    y = builder.emit(relax.op.multiply(y, const(RNG.uniform(1e-4, 4e-4, (1, 1, 1, 16)))))
    y = builder.emit(relax.op.add(y, const(RNG.uniform(-1, 1, (1, 1, 1, 16)))))
    if relu6:
        y = builder.emit(relax.op.minimum(builder.emit(relax.op.maximum(y, const(0.0))), const(6.0)))
    q = quantize(builder, y, 42.5, -128.0)
    return to_unsigned(builder, q) if shift else q


conv_epilogue.input_dtype = "int32"


def test_conv_epilogue_folds_to_one_multiply_add_and_one_clamp():
    mod = build(conv_epilogue)
    folded = fold_requantize()(mod)
    assert (calls(mod), calls(folded)) == (14, 7)  # astype, multiply, add, round, maximum, minimum, astype
    acc = RNG.integers(-30000, 30000, SHAPE).astype(np.int32)
    want, got = run(mod, acc), run(folded, acc)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.mean(got == want) >= 0.999


def test_clamp_and_shift_merge_exactly_without_scales():
    """No scale to fold: the activation clamp and the shift merge, and every integer stays the same."""

    def chain(builder, y):
        y = builder.emit(relax.op.minimum(builder.emit(relax.op.maximum(y, const(0.0))), const(6.0)))
        return to_unsigned(builder, quantize(builder, y, 42.5, -128.0))

    chain.input_dtype = "float32"
    mod = build(chain)
    folded = fold_requantize()(mod)
    y = RNG.uniform(-2, 8, SHAPE).astype(np.float32)
    y.reshape(-1)[:64] = np.arange(64, dtype=np.float32) / 42.5 - 0.5  # near the steps and bounds
    assert calls(folded) < calls(mod)
    np.testing.assert_array_equal(run(folded, y), run(mod, y))


def test_a_quantized_value_with_other_uses_keeps_its_shift_separate():
    """q also feeds something else (a residual add): folding the shift into q's chain would compute the
    requantization twice, so the int8 value is computed once and shifted after."""

    def chain(builder, acc):
        q = conv_epilogue(builder, acc, shift=False)
        other = builder.emit(relax.op.astype(q, "float32"))
        shifted = builder.emit(relax.op.astype(to_unsigned(builder, q), "float32"))
        return builder.emit(relax.op.add(shifted, other))

    chain.input_dtype = "int32"
    mod = build(chain)
    folded = fold_requantize()(mod)
    rounds = [b for block in folded["main"].body.blocks for b in block.bindings
              if isinstance(b.value, relax.Call) and b.value.op.name == "relax.round"]
    assert len(rounds) == 1
    acc = RNG.integers(-30000, 30000, SHAPE).astype(np.int32)
    assert np.abs(run(folded, acc) - run(mod, acc)).max() <= 2  # one step in each of the two terms
