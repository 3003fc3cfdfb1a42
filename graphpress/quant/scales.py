"""Scale/zero-point arithmetic of ONNX QuantizeLinear/DequantizeLinear, in numpy.

    q = saturate(round_half_even(x / scale) + zero_point)        x' = (q - zero_point) * scale

Every range is widened to contain 0 first, so that 0 (padding, ReLU's floor) is exactly representable.
Symmetric quantization puts the zero point in the middle of the integer range (0 for int8, 128 for
uint8) and uses scale = max|x| / 127, the convention onnxruntime and TensorRT use for weights (int8 in
[-127, 127], so that -w and w quantize alike). Asymmetric quantization maps [min, max] onto the whole
integer range. Arrays of ranges give per-channel parameters.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

#: integer range of each quantized type
QRANGE = {"int4": (-8, 7), "int8": (-128, 127), "uint8": (0, 255), "int32": (-(2**31), 2**31 - 1)}
#: numpy dtype of each quantized type (int4: ml_dtypes' one-byte-per-value int4, packed two per byte in ONNX)
NP_DTYPE = {"int4": ml_dtypes.int4, "int8": np.int8, "uint8": np.uint8, "int32": np.int32}
#: levels either side of the symmetric zero point (full 8-bit range, and 7-bit "reduced range")
SYMMETRIC_HALF_LEVELS = 127
REDUCED_HALF_LEVELS = 63
#: steps from zero to the largest positive level of symmetric 4-bit weights (levels [-8, 7], zero point 0)
INT4_HALF_LEVELS = 7
#: the lowest 4-bit level: int4's -8 is used too (16 levels rather than 15). The reason int8 weights stop at
#: -127 (onnxruntime's u8 x s8 kernels without VNNI add pairs of products in int16) does not bind at 4 bits
INT4_LOWEST = -8


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
    qmin, qmax = integer_limits(zero_point.dtype)
    s = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _broadcast(zero_point.astype(np.int64), x.ndim, axis)
    q = np.rint(np.asarray(x, dtype=np.float32) / s) + z
    return np.clip(q, qmin, qmax).astype(zero_point.dtype)


def integer_limits(dtype) -> tuple[int, int]:
    """Smallest and largest value of an integer dtype, ml_dtypes' int4 included."""
    info = ml_dtypes.iinfo(dtype) if np.dtype(dtype) == np.dtype(ml_dtypes.int4) else np.iinfo(dtype)
    return int(info.min), int(info.max)


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


def quantize_weight(w: np.ndarray, axis: int | None, reduce_range: bool = False, bits: int = 8
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric weight quantization, per channel along `axis` or per tensor: (q, scale, zero point).

    8 bits: int8 in [-127, 127]; `reduce_range` uses 7 bits ([-63, 63]): onnxruntime's x86 kernels
    without VNNI add pairs of uint8 x int8 products in int16, which saturates with full-range weights.
    4 bits: int4 in [-8, 7] (step = range / 7) with each channel's range clipped where that lowers its
    squared error (`clipped_ranges`): with 16 levels, one outlier would otherwise leave most weights on 3.
    """
    if bits == 4:
        qtype, half_levels = "int4", INT4_HALF_LEVELS
        low, high = clipped_ranges(w, axis, half_levels, INT4_LOWEST)
    elif bits == 8:
        qtype, half_levels = "int8", REDUCED_HALF_LEVELS if reduce_range else SYMMETRIC_HALF_LEVELS
        low, high = channel_ranges(w, axis)
    else:
        raise ValueError(f"weights are stored in 4 or 8 bits, not {bits}")
    scale, zero_point = scale_zero_point(low, high, qtype, True, half_levels)
    return quantize(w, scale, zero_point, axis), scale, zero_point


#: shares of a channel's largest magnitude tried as its clipping range by `clipped_ranges`
CLIP_SHARES = np.linspace(0.5, 1.0, 26)


def clipped_ranges(w: np.ndarray, axis: int | None, half_levels: int, lowest: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric ranges ±c·max|w| with the share c (from CLIP_SHARES) that minimises the
    channel's squared rounding error on a grid of steps c·max|w| / `half_levels` from level `lowest`
    (default -half_levels) to half_levels."""
    lowest = -half_levels if lowest is None else lowest
    moved = np.moveaxis(np.asarray(w, np.float64), axis, 0) if axis is not None else np.asarray(w, np.float64)[None]
    rows = moved.reshape(moved.shape[0], -1)
    peak = np.abs(rows).max(axis=1)
    best, best_error = peak.copy(), np.full(peak.shape, np.inf)
    for share in CLIP_SHARES:
        step = np.where(peak > 0, share * peak / half_levels, 1.0)[:, None]
        error = ((np.clip(np.rint(rows / step), lowest, half_levels) * step - rows) ** 2).sum(axis=1)
        better = error < best_error
        best, best_error = np.where(better, share * peak, best), np.where(better, error, best_error)
    if axis is None:
        best = best[0]
    return -best, best


def quantize_bias(bias: np.ndarray, input_scale, weight_scale) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale input_scale * weight_scale (per output channel), as int8 kernels expect."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32) if scale.ndim else scale
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    qmin, qmax = QRANGE["int32"]
    q = np.clip(np.rint(bias.astype(np.float64) / scale), qmin, qmax).astype(np.int32)
    return q, scale
