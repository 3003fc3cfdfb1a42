"""Scale/zero-point math against hand-computed values, and per-channel axis handling."""

import numpy as np
import pytest

from graphpress.quant.scales import (channel_ranges, dequantize, fake_quantize, quantize, quantize_bias,
                                     quantize_weight, scale_zero_point)


@pytest.mark.parametrize("rmin,rmax,qtype,symmetric,scale,zero_point", [
    (-1.0, 3.0, "uint8", False, 4 / 255, 64),      # zp = round(0 + 1 / (4/255)) = round(63.75)
    (-1.0, 3.0, "int8", False, 4 / 255, -64),      # zp = round(-128 + 63.75) = round(-64.25)
    (-1.0, 3.0, "int8", True, 3 / 127, 0),
    (-1.0, 3.0, "uint8", True, 3 / 127, 128),
    (2.0, 5.0, "uint8", False, 5 / 255, 0),        # the range is widened to contain 0
    (-6.0, -2.0, "int8", False, 6 / 255, 127),
    (0.0, 0.0, "int8", False, 1.0, -128),          # degenerate: scale 1, never a division by zero
])
def test_scale_zero_point_hand_computed(rmin, rmax, qtype, symmetric, scale, zero_point):
    s, z = scale_zero_point(rmin, rmax, qtype, symmetric)
    assert s.dtype == np.float32 and s.shape == ()
    assert float(s) == pytest.approx(scale, rel=1e-6)
    assert z.dtype == {"int8": np.int8, "uint8": np.uint8}[qtype] and int(z) == zero_point


def test_range_ends_and_zero_are_representable():
    s, z = scale_zero_point(-0.7, 2.3, "uint8")
    x = np.array([-0.7, 0.0, 2.3], np.float32)
    assert np.abs(fake_quantize(x, s, z) - x).max() <= float(s) / 2 + 1e-7
    assert fake_quantize(np.zeros(1, np.float32), s, z)[0] == 0.0


def test_quantize_rounds_half_to_even_and_saturates():
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, 300.0, -300.0], np.float32), np.float32(1.0), np.int8(0))
    assert q.tolist() == [0, 2, 2, 0, 127, -128]
    assert dequantize(np.array([10], np.uint8), np.float32(0.5), np.uint8(4)).tolist() == [3.0]


def test_per_channel_weights_along_axis_0_and_1():
    w = np.array([[1.0, -2.0, 0.5], [0.1, 0.2, -0.4]], np.float32)
    _, s0, z0 = quantize_weight(w, axis=0)
    np.testing.assert_allclose(s0, [2.0 / 127, 0.4 / 127], rtol=1e-6)
    assert z0.tolist() == [0, 0] and z0.dtype == np.int8
    q1, s1, _ = quantize_weight(w, axis=1)
    np.testing.assert_allclose(s1, [1.0 / 127, 2.0 / 127, 0.5 / 127], rtol=1e-6)
    assert q1[:, 0].tolist() == [127, 13] and q1[:, 1].tolist() == [-127, 13]  # 0.1*127 = 12.7 -> 13
    _, st, _ = quantize_weight(w, axis=None)
    assert st.shape == () and float(st) == pytest.approx(2.0 / 127)


def test_per_channel_4d_conv_and_conv_transpose_axes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    lo, hi = channel_ranges(w, 0)
    np.testing.assert_array_equal(hi, w.reshape(4, -1).max(1))
    lo1, _ = channel_ranges(w, 1)
    np.testing.assert_array_equal(lo1, w.transpose(1, 0, 2, 3).reshape(3, -1).min(1))
    for axis in (0, 1):
        q, s, z = quantize_weight(w, axis)
        error = np.abs(dequantize(q, s, z, axis) - w)
        step = np.expand_dims(s, tuple(i for i in range(4) if i != axis))
        assert (error <= step / 2 + 1e-7).all()


def test_reduced_range_weights_use_seven_bits():
    q, s, _ = quantize_weight(np.array([-1.0, 0.25, 1.0], np.float32), axis=None, reduce_range=True)
    assert q.tolist() == [-63, 16, 63] and float(s) == pytest.approx(1 / 63)


def test_int32_bias_scale_is_input_times_weight_scale():
    q, scale = quantize_bias(np.array([0.5, -1.0], np.float32), np.float32(0.1), np.array([0.01, 0.02], np.float32))
    np.testing.assert_allclose(scale, [0.001, 0.002], rtol=1e-6)
    assert q.dtype == np.int32 and q.tolist() == [500, -500]
    q_tensor, s_tensor = quantize_bias(np.array([1.0], np.float32), np.float32(0.5), np.float32(0.25))
    assert s_tensor.shape == () and q_tensor.tolist() == [8]
