"""Observers and calibration: running statistics, histogram range selectors, bounded-memory collection."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.errors import GraphpressError
from graphpress.ir import load
from graphpress.quant.calibrate import collect_ranges, require_calibration
from graphpress.quant.observers import (Histogram, MinMax, MovingAverageMinMax, entropy_range, mse_range,
                                        percentile_range)
from graphpress.quant.scales import fake_quantize, scale_zero_point


def test_minmax_accumulates_over_batches_and_ignores_non_finite():
    obs = MinMax()
    for batch in ([1.0, 2.0], [-3.0, np.inf], [0.5, np.nan]):
        obs.observe(np.array(batch, np.float32))
    assert obs.range() == (-3.0, 2.0)
    assert MinMax().range() == (0.0, 0.0)


def test_moving_average_follows_batches_with_momentum():
    obs = MovingAverageMinMax(momentum=0.5)
    obs.observe(np.array([-1.0, 1.0], np.float32))
    obs.observe(np.array([-3.0, 3.0], np.float32))
    assert obs.range() == (-2.0, 2.0)


def _heavy_tailed(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:5] = [40.0, -35.0, 30.0, 25.0, -20.0]  # rare outliers that min/max would stretch the grid for
    hist = Histogram(float(x.min()), float(x.max()))
    for chunk in np.array_split(x, 7):
        hist.observe(chunk)
    return x, hist


def test_histogram_counts_everything():
    x, hist = _heavy_tailed()
    assert hist.counts.sum() == x.size
    counts, upper = hist.magnitudes()
    assert counts.sum() == x.size and upper[-1] == pytest.approx(40.0)


def test_percentile_clips_the_rare_tails():
    x, hist = _heavy_tailed()
    lo, hi = percentile_range(hist, 99.9)
    assert np.quantile(x, 0.999) <= hi <= np.quantile(x, 0.999) + 0.1
    assert np.quantile(x, 0.001) - 0.1 <= lo <= np.quantile(x, 0.001)
    relu = Histogram(0.0, 4.0)
    relu.observe(np.linspace(0, 4, 10_001, dtype=np.float32))
    assert percentile_range(relu, 99.0)[0] == 0.0  # a non-negative tensor keeps its floor


def _quantization_mse(x, rng, where=slice(None)):
    scale, zero_point = scale_zero_point(*rng, "int8")
    return float(np.mean((fake_quantize(x, scale, zero_point) - x)[where] ** 2))


def test_entropy_ignores_rare_outliers_and_refines_the_bulk():
    x, hist = _heavy_tailed()
    lo, hi = entropy_range(hist, levels=128)
    assert 2.5 < hi < 20 and -20 < lo < -2.5
    bulk = np.abs(x) < 2.5
    assert _quantization_mse(x, (lo, hi), bulk) < 0.2 * _quantization_mse(x, (x.min(), x.max()), bulk)


def test_mse_range_has_the_least_error_on_a_heavy_tailed_tensor():
    x = np.random.default_rng(0).laplace(size=200_000).astype(np.float32)
    hist = Histogram(float(x.min()), float(x.max()))
    hist.observe(x)
    lo, hi = mse_range(hist, "int8")
    assert hi < 0.9 * x.max() and lo > 0.9 * x.min()
    best = _quantization_mse(x, (lo, hi))
    for other in ((x.min(), x.max()), entropy_range(hist), percentile_range(hist, 99.99)):
        assert best <= _quantization_mse(x, other)


def test_mse_keeps_the_full_range_of_a_uniform_tensor():
    hist = Histogram(-1.0, 1.0)
    hist.observe(np.random.default_rng(0).uniform(-1, 1, 100_000).astype(np.float32))
    lo, hi = mse_range(hist, "int8")
    assert hi >= 0.97 and lo <= -0.97


def _two_layer_model():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w])
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), numpy_helper.to_array(w)


class _CountingBatches:
    """A re-iterable of batches that counts how many batches were read."""

    def __init__(self, batches):
        self.batches, self.read = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.read += 1
            yield batch

    @property
    def passes(self) -> float:
        return self.read / len(self.batches)


def test_collect_ranges_matches_numpy_and_histogram_methods_take_two_passes():
    model, w = _two_layer_model()
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(3)]
    batches = _CountingBatches([{"x": x} for x in xs])
    ranges = collect_ranges(model, ["h", "y"], batches, "minmax")
    h = np.concatenate(xs) @ w
    assert ranges["h"] == pytest.approx((h.min(), h.max()), rel=1e-5)
    assert ranges["y"] == pytest.approx((max(h.min(), 0), h.max()), rel=1e-5)
    assert batches.passes == 1
    collect_ranges(model, ["h"], batches, "mse")
    assert batches.passes == 3


def test_calibration_errors_are_clear():
    model, _ = _two_layer_model()
    with pytest.raises(GraphpressError, match="empty"):
        collect_ranges(model, ["h"], [], "minmax")
    with pytest.raises(GraphpressError, match="unknown calibration method"):
        collect_ranges(model, ["h"], [{"x": np.zeros((1, 4), np.float32)}], "median")
    with pytest.raises(GraphpressError, match="--calib"):
        require_calibration(None, "insert-qdq")
