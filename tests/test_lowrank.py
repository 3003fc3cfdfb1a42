"""Unit tests of the low-rank pieces: rank selection, factorization (plain and whitened), conv patches."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress import ir
from graphpress.errors import GraphpressError
from graphpress.lowrank.conv import ConvGeometry, conv_matrix, pointwise_weight, spatial_weight
from graphpress.lowrank.factorize import InputGram, PairedGram, decompose, refit_weight, thin_svd, whitening_factor
from graphpress.lowrank.rank import (LayerCost, allocate_budget, dropped_energy, energy_rank, max_useful_rank,
                                     ratio_rank)


# ---- rank selection ----------------------------------------------------------------------------------
def test_max_useful_rank_is_below_break_even():
    assert max_useful_rank(4, 4) == 1            # k·n/(k+n) = 2: only rank 1 saves
    assert max_useful_rank(384, 384) == 191      # 192 would hold exactly as many parameters
    assert max_useful_rank(384, 384, margin=0.25) == 143
    assert max_useful_rank(1, 100) == 0          # a vector never pays


def test_energy_rank_on_constructed_spectrum():
    s = np.array([3.0, 2.0, 1.0, 0.5])           # squares 9, 4, 1, 0.25 -> cumulative .632 .912 .982 1
    assert energy_rank(s, 0.6) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 4
    with pytest.raises(GraphpressError):
        energy_rank(s, 1.5)


def test_ratio_rank():
    assert ratio_rank(100, 40, 0.25) == 10
    assert ratio_rank(100, 40, 0.01) == 1


def test_dropped_energy():
    np.testing.assert_allclose(dropped_energy(np.array([2.0, 1.0, 1.0])), [1.0, 2 / 6, 1 / 6, 0.0])


def _cost(spectrum, k, n):
    """What the budget search sees of a k×n weight with this spectrum, without measurements."""
    return LayerCost(k * n, k + n, max_useful_rank(k, n), dropped_energy(np.asarray(spectrum, dtype=float)))


def test_budget_compresses_the_layer_with_the_decaying_spectrum_more():
    decaying = _cost(0.5 ** np.arange(32), 32, 32)
    flat = _cost(np.ones(32), 32, 32)
    budget = 0.75 * 2 * 32 * 32
    ranks = allocate_budget([decaying, flat], budget)
    assert sum(layer.kept(r) for layer, r in zip([decaying, flat], ranks)) <= budget
    assert ranks[1] is None                       # the flat spectrum would lose far more
    assert ranks[0] == 8                          # the budget's remaining room, spent on the cheap layer


def test_budget_that_is_already_met_splits_nothing():
    assert allocate_budget([_cost(np.ones(8), 8, 8)], budget=64) == [None]


def test_unreachable_budget_is_an_error():
    with pytest.raises(GraphpressError, match="cannot be met"):
        allocate_budget([_cost(np.ones(8), 8, 8)], budget=10)


# ---- factorization -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
def test_thin_svd_matches_lapack(shape):
    m = np.random.default_rng(0).standard_normal(shape)
    u, s, vt = thin_svd(m)
    np.testing.assert_allclose(s, np.linalg.svd(m, compute_uv=False), rtol=1e-10)
    np.testing.assert_allclose((u * s) @ vt, m, atol=1e-12)
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)


@pytest.mark.parametrize("whitened", [False, True])
def test_full_rank_factors_reconstruct_exactly(whitened):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((20, 14))
    x = rng.standard_normal((200, 20))
    gram = InputGram(20)
    gram.add(x)
    decomposition = decompose(w, whitening_factor(gram.value, 1e-3) if whitened else None)
    a, b = decomposition.factors(14)
    np.testing.assert_allclose(a @ b, w, atol=1e-9)


def test_truncated_plain_factors_are_the_best_rank_r_approximation():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 18))
    a, b = decompose(w).factors(5)
    s = np.linalg.svd(w, compute_uv=False)
    assert np.linalg.norm(w - a @ b) == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-9)


def _correlated_sampler(rng, k):
    """Draws inputs whose covariance is far from isotropic (a few strong, mixed directions), as activations are."""
    mixing = rng.standard_normal((k, k)) * (0.05 + 3.0 * (rng.random(k) < 0.2))[:, None]
    return lambda rows: rng.standard_normal((rows, k)) @ mixing + 0.5


def test_whitened_factors_have_less_output_error_on_correlated_inputs():
    rng = np.random.default_rng(3)
    k, n, rank = 48, 40, 8
    w = rng.standard_normal((k, n))
    sample = _correlated_sampler(rng, k)
    train, test = sample(4000), sample(4000)       # the same distribution, different samples
    gram = InputGram(k)
    for chunk in np.array_split(train, 10):   # accumulated batch by batch
        gram.add(chunk)
    errors = {}
    for name, whitening in (("plain", None), ("whitened", whitening_factor(gram.value, 1e-4))):
        a, b = decompose(w, whitening).factors(rank)
        errors[name] = np.linalg.norm(test @ w - test @ a @ b) / np.linalg.norm(test @ w)
    assert errors["whitened"] < 0.5 * errors["plain"], errors


def test_refit_weight_reproduces_the_original_outputs_from_perturbed_inputs():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((500, 12))
    w = rng.standard_normal((12, 8))
    seen = x @ (np.eye(12) + 0.3 * rng.standard_normal((12, 12)))     # what an upstream truncation did
    gram = PairedGram(12)
    for rows, original in zip(np.array_split(seen, 5), np.array_split(x, 5)):
        gram.add_pair(rows, original)
    refit = refit_weight(w, whitening_factor(gram.value, 1e-10), gram.value, gram.cross)
    assert np.linalg.norm(seen @ w - x @ w) > 0.5 * np.linalg.norm(x @ w)
    np.testing.assert_allclose(seen @ refit, x @ w, rtol=1e-3, atol=1e-3)   # seen: an invertible map of x
    unchanged = x.T @ x
    np.testing.assert_allclose(refit_weight(w, whitening_factor(unchanged, 0.01), unchanged, unchanged), w)


def test_whitening_survives_a_rank_deficient_gram_and_refuses_a_zero_one():
    x = np.random.default_rng(4).standard_normal((3, 10))     # 3 rows: Gram of rank 3
    factor = whitening_factor(x.T @ x, 0.0)
    assert np.all(np.isfinite(factor))
    with pytest.raises(GraphpressError, match="zero"):
        whitening_factor(np.zeros((4, 4)), 0.01)


# ---- conv as a matrix ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", [{}, {"pads": [1, 2, 1, 0], "strides": [2, 1]}, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}])
def test_conv_patches_times_matrix_is_the_conv(attrs):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    expected = ir.run(helper.make_model(graph), {"x": x})["y"]
    geometry = ConvGeometry.of(attrs, w.shape)
    rows = geometry.patches(x) @ conv_matrix(w)
    n, o, ho, wo = expected.shape
    np.testing.assert_allclose(rows.reshape(n, ho, wo, o).transpose(0, 3, 1, 2), expected, atol=1e-4)


def test_conv_factor_layouts_round_trip():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((5, 3, 3, 3))
    a, b = decompose(conv_matrix(w)).factors(5)
    spatial, pointwise = spatial_weight(a, w.shape), pointwise_weight(b, 4)
    assert spatial.shape == (5, 3, 3, 3) and pointwise.shape == (5, 5, 1, 1)
    np.testing.assert_allclose(np.einsum("or,rckl->ockl", pointwise[:, :, 0, 0], spatial), w, atol=1e-9)


def test_conv_geometry_refuses_auto_pad_same():
    assert "auto_pad" in ConvGeometry.of({"auto_pad": "SAME_UPPER"}, (4, 3, 3, 3))
    assert "1-D" in ConvGeometry.of({}, (4, 3, 3))
