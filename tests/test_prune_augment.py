"""prune-channels(augment=...): mirrored and shifted calibration copies, their image axes found in the graph."""

from __future__ import annotations

import numpy as np
import pytest

from graphpress.errors import PassError
from graphpress.pruning.augment import augmented, image_axes
from tests.test_prune_channels import Builder, prune, weight


def nhwc_model():
    """An NHWC input (as TensorFlow converters leave it) transposed to NCHW before its Conv."""
    b = Builder(["N", 6, 5, 3])
    x = b.node("Transpose", ["x"], perm=[0, 3, 1, 2])
    return b.model(b.node("GlobalAveragePool", [b.conv(x, 3, 4, "conv")]))


def test_image_axes_follow_transposes_to_the_conv():
    assert image_axes(nhwc_model()) == {"x": (1, 2)}
    b = Builder(["N", 3, 6, 5])
    assert image_axes(b.model(b.node("GlobalAveragePool", [b.conv("x", 3, 4, "conv")]))) == {"x": (2, 3)}


def test_flip_mirrors_the_width_and_shift_moves_by_two_pixels_repeating_the_edge():
    x = np.arange(2 * 6 * 5 * 3, dtype=np.float32).reshape(2, 6, 5, 3)
    (batch,) = augmented(nhwc_model(), [{"x": x}], ["flip", "shift"])
    copies = batch["x"].reshape(6, 2, 6, 5, 3)  # the original, its mirror, then four shifts
    np.testing.assert_array_equal(copies[0], x)
    np.testing.assert_array_equal(copies[1], x[:, :, ::-1, :])          # width is axis 2, not the channels
    up = copies[2]                                                        # shifted by -2 rows
    np.testing.assert_array_equal(up[:, :4], x[:, 2:])
    np.testing.assert_array_equal(up[:, 4:], np.repeat(x[:, 5:], 2, axis=1))
    right = copies[5]                                                     # shifted by +2 columns
    np.testing.assert_array_equal(right[:, :, 2:], x[:, :, :3])
    np.testing.assert_array_equal(right[:, :, :2], np.repeat(x[:, :, :1], 2, axis=2))


def too_few_rows_model():
    """A Gemm after Flatten reads 36 features (27 after pruning one of 4 channels, plus its bias)."""
    b = Builder(["N", 3, 6, 6])
    y = b.node("Relu", [b.conv("x", 3, 4, "conv", stride=2)])
    flat = b.node("Flatten", [y], axis=1)
    return b.model(b.node("Gemm", [flat, b.weight("fc.w", (5, 36)), b.weight("fc.b", (5,))], name="fc", transB=1))


def test_augmented_copies_give_the_refit_the_rows_it_lacked():
    """Six images are six rows for 28 unknowns: the re-fit keeps the pruned weights. With their mirrors
    and shifts (36 rows) it re-fits and reproduces the original output better."""
    model = too_few_rows_model()
    data = [{"x": np.random.default_rng(5).standard_normal((6, 3, 6, 6)).astype(np.float32)}]
    plain, _ = prune(model, "prune-channels(ratio=0.25,reconstruct=false)")
    refit, report = prune(model, "prune-channels(ratio=0.25)", data)
    np.testing.assert_array_equal(weight(refit, "fc"), weight(plain, "fc"))
    more, report = prune(model, "prune-channels(ratio=0.25,augment=[flip,shift])", data)
    assert not np.array_equal(weight(more, "fc"), weight(plain, "fc"))
    (fit,) = report.reconstruction
    assert fit.error_after < 0.5 * fit.error_before


def test_bad_augment_options_are_clear_errors():
    model = too_few_rows_model()
    data = [{"x": np.zeros((2, 3, 6, 6), np.float32)}]
    with pytest.raises(PassError, match="unknown augmentation 'rotate'"):
        prune(model, "prune-channels(augment=[rotate])", data)
    with pytest.raises(PassError, match="augment needs calibration data"):
        prune(model, "prune-channels(augment=[flip])")
    b = Builder(["N", 8])
    dense = b.model(b.node("Gemm", [b.node("Relu", [b.node("Gemm", ["x", b.weight("a", (8, 8))])]),
                                    b.weight("b", (8, 4))]))
    with pytest.raises(PassError, match="augment needs an image input"):
        prune(dense, "prune-channels(augment=[flip])", [{"x": np.zeros((2, 8), np.float32)}])
