"""prune-channels(allocate=held-out-error): error curves measured on calibration batches the fit left out."""

from __future__ import annotations

import numpy as np

from graphpress.ir.cost import macs, tensor_shapes
from graphpress.pruning.groups import analyze
from graphpress.pruning.obs import eliminate
from tests.test_prune_channels import Builder, calibration, chain_model, prune, weight


def mlp():
    """16 hidden channels behind a Relu, read by a 16-input Gemm: 17 unknowns per output to re-fit."""
    b = Builder(["N", 16])
    hidden = b.node("Relu", [b.node("Gemm", ["x", b.weight("a.w", (16, 16)), b.weight("a.b", (16,))], name="a")])
    return b.model(b.node("Gemm", [hidden, b.weight("b.w", (16, 8)), b.weight("b.b", (8,))], name="b"))


def batches(count, rows=4, seed=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 16)).astype(np.float32)} for _ in range(count)]


def test_held_out_curve_sees_the_error_an_overfitted_refit_hides():
    """20 fitted rows for 17 unknowns: the in-sample curve after removing half the channels is a fraction
    of what the same re-fit leaves on rows it did not see; with plenty of rows the two agree."""
    model = mlp()
    cg = analyze(model, tensor_shapes(model))
    (group,) = cg.prunable()
    few = batches(6)  # batch 1 held out: 20 rows fit, 4 held out
    in_sample = eliminate(model, cg, few).curves[group.id][8]
    held_out = eliminate(model, cg, few, held_out=True).curves[group.id][8]
    assert held_out > 3 * in_sample
    many = batches(6, rows=400)
    in_sample, held_out = (eliminate(model, cg, many, held_out=h).curves[group.id][8] for h in (False, True))
    assert abs(held_out - in_sample) < 0.2 * in_sample


def test_held_out_allocation_meets_the_target_and_keeps_the_refit():
    model = chain_model()
    pipeline = "prune-channels(target-macs=0.6,criterion=reconstruction,allocate=held-out-error)"
    pruned, report = prune(model, pipeline, calibration(10))
    assert macs(pruned).total <= 0.6 * macs(model).total
    assert weight(pruned, "first").shape[0] < 8
    assert all(f.error_after < f.error_before for f in report.reconstruction)
