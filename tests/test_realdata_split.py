"""benchmarks/realdata.calibration_indices: MODELS.md's split, and larger sets that contain it."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.realdata import calibration_indices


def test_the_standard_split_is_unchanged():
    np.testing.assert_array_equal(calibration_indices("resnet8"), np.arange(1, 2000, 20))
    np.testing.assert_array_equal(calibration_indices("mobilenet_v2", 8), np.arange(5, 85, 10))


@pytest.mark.parametrize("key,n", [("resnet8", 400), ("mobilenet_v2", 300), ("minilm", 200), ("lenet", 1000)])
def test_larger_sets_contain_the_standard_one_and_spread_over_all_samples(key, n):
    standard, larger = calibration_indices(key), calibration_indices(key, n)
    assert len(larger) == len(np.unique(larger)) == n
    assert np.isin(standard, larger).all()
    assert larger.max() >= standard.max()  # not a prefix of the data (ImageNet's images are sorted by class)


def test_unknown_model_is_a_key_error():
    with pytest.raises(KeyError):
        calibration_indices("nope")
