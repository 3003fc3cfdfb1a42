"""Scale/zero-point arithmetic of ONNX QuantizeLinear/DequantizeLinear, in numpy.

    q = saturate(round_half_even(x / scale) + zero_point)        x' = (q - zero_point) * scale

Every range is widened to contain 0 first, so that 0 (padding, ReLU's floor) is exactly representable.
Symmetric quantization puts the zero point in the middle of the integer range (0 for int8, 128 for
uint8) and uses scale = max|x| / 127, the convention onnxruntime and TensorRT use for weights (int8 in
[-127, 127], so that -w and w quantize alike). Asymmetric quantization maps [min, max] onto the whole
integer range. Arrays of ranges give per-channel parameters.
"""

from __future__ import annotations

import numpy as np

#: integer range of each quantized type
QRANGE = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-(2**31), 2**31 - 1)}
#: numpy dtype of each quantized type
NP_DTYPE = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}
#: levels either side of the symmetric zero point (full 8-bit range, and 7-bit "reduced range")
SYMMETRIC_HALF_LEVELS = 127
REDUCED_HALF_LEVELS = 63


def scale_zero_point(rmin, rmax, qtype: str = "int8", symmetric: bool = False,
                     half_levels: int = SYMMETRIC_HALF_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (`qtype`) that cover [rmin, rmax]; arrays give per-channel values.

    A range that is all zero gets scale 1, so that DequantizeLinear never divides by zero. Symmetric
    ranges use `half_levels` steps either side of zero.
    """
    qmin, qmax = QRANGE[qtype]
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        scale = np.maximum(-rmin, rmax) / half_levels
        zero_point = np.full(scale.shape, (qmin + qmax + 1) // 2, dtype=np.float64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(qmin - rmin / safe), qmin, qmax)
    zero_point = np.where(scale > 0, zero_point, (qmin + qmax + 1) // 2 if symmetric else qmin)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zero_point.astype(NP_DTYPE[qtype])


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-channel parameter to broadcast along `axis` of an `ndim`-d tensor."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def quantize(x: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear: round half to even, add the zero point, saturate to its type."""
    zero_point = np.asarray(zero_point)
    qmin, qmax = np.iinfo(zero_point.dtype).min, np.iinfo(zero_point.dtype).max
    s = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _broadcast(zero_point.astype(np.int64), x.ndim, axis)
    q = np.rint(np.asarray(x, dtype=np.float32) / s) + z
    return np.clip(q, qmin, qmax).astype(zero_point.dtype)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """DequantizeLinear: (q - zero_point) * scale, in float32."""
    s = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point).astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)


def fake_quantize(x: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """What a Q -> DQ pair computes: `x` rounded onto the quantization grid."""
    return dequantize(quantize(x, scale, zero_point, axis), scale, zero_point, axis)


def channel_ranges(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of `w` per slice along `axis` (or over everything when `axis` is None)."""
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    others = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return w.min(axis=others), w.max(axis=others)


def quantize_weight(w: np.ndarray, axis: int | None, reduce_range: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 weight quantization, per channel along `axis` or per tensor: (q, scale, zero point).

    `reduce_range` uses 7 bits ([-63, 63]): onnxruntime's x86 kernels without VNNI add pairs of
    uint8 x int8 products in int16, which saturates with full-range weights.
    """
    half_levels = REDUCED_HALF_LEVELS if reduce_range else SYMMETRIC_HALF_LEVELS
    scale, zero_point = scale_zero_point(*channel_ranges(w, axis), "int8", True, half_levels)
    return quantize(w, scale, zero_point, axis), scale, zero_point


def quantize_bias(bias: np.ndarray, input_scale, weight_scale) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale input_scale * weight_scale (per output channel), as int8 kernels expect."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32) if scale.ndim else scale
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    qmin, qmax = QRANGE["int32"]
    q = np.clip(np.rint(bias.astype(np.float64) / scale), qmin, qmax).astype(np.int32)
    return q, scale
