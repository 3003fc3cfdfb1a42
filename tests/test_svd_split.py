"""The `svd-split` pass on small models built in code, checked against onnxruntime on the original."""

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress import ir
from graphpress.errors import PassError
from graphpress.passes import PassContext, PassManager, registry

RNG = np.random.default_rng(0)


def low_rank(k, n, rank, rng=RNG):
    """A k×n float32 matrix of exactly `rank` (singular values 10, 5, 2.5, ...)."""
    u, _ = np.linalg.qr(rng.standard_normal((k, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    return ((u * (10.0 * 0.5 ** np.arange(rank))) @ v.T).astype(np.float32)


def make_model(nodes, inputs, outputs, weights):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.load(onnx.shape_inference.infer_shapes(proto))   # types the outputs


def split(model, pipeline="svd-split(energy=1.0)", calibration=None):
    """Run `pipeline` on a copy; returns (new model, the pass report, its stats)."""
    result = model.copy()
    ctx = PassContext(calibration=calibration)
    manager = PassManager(pipeline)
    manager.run(result, ctx)
    onnx.checker.check_model(result.to_onnx())
    return result, ctx.reports["svd-split"], manager.records[-1].stats


def assert_same_outputs(original, changed, rtol=1e-4):
    comparison = ir.compare(original, changed)
    assert comparison.within(rtol, 1e-5), str(comparison)


def ops(model):
    return sorted(node.op for node in model.graph.nodes)


def matmul_model(x_shape=(2, 3, 32), w=None):
    w = low_rank(32, 24, 4) if w is None else w
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("x", list(x_shape))],
                      ["y"], {"w": w})


# ---- exactness at full rank --------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(32,), (5, 32), (2, 3, 32), (2, 2, 3, 32)])
def test_matmul_of_exact_low_rank_is_split_without_error(x_shape):
    model = matmul_model(x_shape)
    result, report, stats = split(model)
    assert stats["split"] == 1 and report["layers"][0]["rank"] == 4
    assert ops(result) == ["MatMul", "MatMul"]
    assert result.parameter_count() == 4 * (32 + 24)
    assert_same_outputs(model, result)


def test_weight_through_a_transpose_is_factored_and_the_transpose_goes():
    w = low_rank(24, 32, 4)
    model = make_model([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                        helper.make_node("MatMul", ["x", "wt"], ["y"])], [("x", [3, 32])], ["y"], {"w": w})
    result, _, stats = split(model)
    assert stats["split"] == 1 and ops(result) == ["MatMul", "MatMul"]
    assert_same_outputs(model, result)


def test_weight_as_first_matmul_input_is_factored():
    w = low_rank(24, 32, 4)
    model = make_model([helper.make_node("MatMul", ["w", "x"], ["y"])], [("x", [2, 32, 5])], ["y"], {"w": w})
    result, _, stats = split(model)
    assert stats["split"] == 1 and ops(result) == ["MatMul", "MatMul"]
    assert_same_outputs(model, result)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,bias", [(1.0, 1.0, True), (0.5, 2.0, True), (1.5, 1.0, False)])
def test_gemm_attribute_variants(trans_a, trans_b, alpha, beta, bias):
    w = low_rank(32, 24, 4)
    weights = {"w": w.T.copy() if trans_b else w}
    if bias:
        weights["c"] = RNG.standard_normal(24).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"] + (["c"] if bias else []), ["y"], transA=trans_a, transB=trans_b,
                            alpha=alpha, beta=beta)
    model = make_model([node], [("x", [32, 6] if trans_a else [6, 32])], ["y"], weights)
    result, _, stats = split(model)
    assert stats["split"] == 1 and ops(result) == ["Gemm", "Gemm"]
    assert_same_outputs(model, result)


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "dilations": [1, 2]}, {}])
def test_conv_splits_into_spatial_and_pointwise(attrs):
    w = (low_rank(16, 8 * 9, 3).reshape(16, 8, 3, 3))
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], [("x", [1, 8, 10, 10])], ["y"],
                       {"w": w, "b": RNG.standard_normal(16).astype(np.float32)})
    result, report, stats = split(model)
    assert stats["split"] == 1 and report["layers"][0]["rank"] == 3
    kernels = sorted(tuple(n.attrs["kernel_shape"]) for n in result.graph.nodes)
    assert kernels == [(1, 1), (3, 3)]
    assert_same_outputs(model, result)


# ---- rank choice -------------------------------------------------------------------------------------
def spectrum_weight(singular_values, k=40, n=30):
    u, _ = np.linalg.qr(RNG.standard_normal((k, len(singular_values))))
    v, _ = np.linalg.qr(RNG.standard_normal((n, len(singular_values))))
    return ((u * np.asarray(singular_values)) @ v.T).astype(np.float32)


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25] + [0.01] * 14   # cumulative energy .75 .94 .99 .998 ...


@pytest.mark.parametrize("pipeline,rank", [("svd-split(energy=0.9)", 2), ("svd-split(energy=0.95)", 3),
                                           ("svd-split(energy=0.99)", 4), ("svd-split(ratio=0.2)", 6)])
def test_rank_chosen_for_a_constructed_spectrum(pipeline, rank):
    model = matmul_model((4, 40), spectrum_weight(SPECTRUM))
    _, report, _ = split(model, pipeline)
    assert report["layers"][0]["rank"] == rank


def test_full_rank_weight_is_left_alone_with_the_reason_logged(caplog):
    model = matmul_model((4, 32), RNG.standard_normal((32, 24)).astype(np.float32))
    with caplog.at_level(logging.DEBUG, logger="graphpress.passes"):
        result, report, stats = split(model, "svd-split(energy=0.95)")
    assert stats["split"] == 0 and report["layers"][0]["rank"] is None
    assert ops(result) == ["MatMul"]
    assert "only ranks up to 12 save" in caplog.text


def test_margin_decides_whether_a_split_pays():
    model = matmul_model((4, 40), spectrum_weight(SPECTRUM))   # 40×30: break-even rank 17.1
    assert split(model, "svd-split(ratio=0.5,margin=0.0)")[2]["split"] == 1    # rank 15 < 17
    assert split(model, "svd-split(ratio=0.5,margin=0.2)")[2]["split"] == 0    # 15 > 13.7


def test_ops_that_cannot_be_factored_are_left(caplog):
    w = low_rank(8, 8, 2)
    model = make_model([helper.make_node("MatMul", ["x", "x2"], ["h"]),             # no constant
                        helper.make_node("Conv", ["img", "dw"], ["c"], group=4)],   # depthwise
                       [("x", [3, 8]), ("x2", [8, 8]), ("img", [1, 4, 5, 5])], ["h", "c"],
                       {"dw": RNG.standard_normal((4, 1, 3, 3)).astype(np.float32), "unused": w})
    with caplog.at_level(logging.DEBUG, logger="graphpress.passes"):
        result, _, stats = split(model)
    assert stats["split"] == 0 and ops(result) == ops(model)
    assert "neither input is a constant" in caplog.text and "grouped convolution" in caplog.text


# ---- shared weights ----------------------------------------------------------------------------------
def test_shared_weight_is_factored_once():
    w = low_rank(32, 24, 4)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y1"]), helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("MatMul", ["r", "w"], ["y2"])], [("x", [3, 32])], ["y1", "y2"], {"w": w})
    result, report, stats = split(model)
    assert stats["split"] == 1 and len(report["layers"]) == 1
    constants = [t for t in result.graph.tensors().values() if isinstance(t, gs.Constant)]
    assert len(constants) == 2 and result.parameter_count() == 4 * (32 + 24)
    assert ops(result) == ["MatMul"] * 4 + ["Relu"]
    assert_same_outputs(model, result)


def test_weight_also_read_by_another_op_is_left(caplog):
    w = low_rank(16, 16, 2)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "w"], ["z"])],
                       [("x", [16, 16])], ["z"], {"w": w})
    with caplog.at_level(logging.DEBUG, logger="graphpress.passes"):
        result, _, stats = split(model)
    assert stats["split"] == 0 and "also read by Add" in caplog.text


# ---- data-aware factorization ------------------------------------------------------------------------
def correlated_batches(rng, k, count, rows=64):
    """Calibration and held-out batches from one distribution with a few strong, mixed input directions."""
    mixing = rng.standard_normal((k, k)) * (0.05 + 3.0 * (rng.random(k) < 0.2))[:, None]
    batches = [{"x": (rng.standard_normal((rows, k)) @ mixing + 0.5).astype(np.float32)} for _ in range(2 * count)]
    return batches[:count], batches[count:]


def test_whitened_split_beats_plain_on_output_error():
    rng = np.random.default_rng(7)
    model = matmul_model((None, 48), rng.standard_normal((48, 40)).astype(np.float32))
    calibration, held_out = correlated_batches(rng, 48, 8)
    errors = {}
    for method in ("plain", "whitened"):
        result, _, stats = split(model, f"svd-split(ratio=0.2,method={method})", calibration)
        assert stats["split"] == 1
        errors[method] = max(ir.compare(model, result, batch).max_rel for batch in held_out)
    assert errors["whitened"] < 0.6 * errors["plain"], errors


def test_whitened_conv_and_gemm_stay_exact_at_full_rank():
    conv_w = low_rank(12, 6 * 9, 3).reshape(12, 6, 3, 3)
    model = make_model([helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
                        helper.make_node("Flatten", ["c"], ["f"]),
                        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1)],
                       [("x", [2, 6, 4, 4])], ["y"],
                       {"cw": conv_w, "gw": low_rank(10, 12 * 16, 5), "gb": np.ones(10, np.float32)})
    calibration = [ir.random_inputs(model, seed=s) for s in range(3)]
    result, report, stats = split(model, calibration=calibration)
    assert stats["split"] == 2 and [layer["rank"] for layer in report["layers"]] == [3, 5]
    assert_same_outputs(model, result)


# ---- global budget -----------------------------------------------------------------------------------
def two_layer_model():
    return make_model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                       helper.make_node("MatMul", ["r", "w2"], ["y"])], [("x", [4, 40])], ["y"],
                      {"w1": spectrum_weight(SPECTRUM, 40, 40), "w2": RNG.standard_normal((40, 30)).astype(np.float32)})


@pytest.mark.parametrize("budget_of", ["model", "layers"])
def test_target_params_keeps_the_budget_and_spends_it_where_the_spectrum_decays(budget_of):
    model = two_layer_model()
    result, report, _ = split(model, f"svd-split(target-params=0.7,budget-of={budget_of})")
    assert result.parameter_count() <= 0.7 * model.parameter_count()
    ranks = {layer["shape"][1]: layer["rank"] for layer in report["layers"]}
    assert ranks[30] is None and ranks[40] is not None       # the random weight is kept whole


def test_conflicting_options_are_an_error():
    with pytest.raises(PassError, match="either ratio or target-params"):
        split(matmul_model(), "svd-split(ratio=0.3,target-params=0.5)")


# ---- in a pipeline with quantization -----------------------------------------------------------------
def test_factors_are_quantized_by_insert_qdq_in_one_pipeline():
    if "insert-qdq" not in registry.all_passes():
        pytest.skip("insert-qdq is not available yet")
    model = matmul_model((8, 32))
    calibration = [ir.random_inputs(model, seed=s) for s in range(4)]
    result = model.copy()
    PassManager("svd-split(energy=1.0),insert-qdq").run(result, calibration=calibration)
    onnx.checker.check_model(result.to_onnx())
    matmuls = [n for n in result.graph.nodes if n.op == "MatMul"]
    assert len(matmuls) == 2
    for node in matmuls:
        assert all(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in node.inputs), node.name
    assert ir.compare(model, result).max_rel < 0.05


def two_branch_model(loudness):
    """y = loudness·(x·w_loud) + x·w_quiet, both weights equal: only measurement tells the branches apart."""
    w = spectrum_weight(np.linspace(2.0, 1.0, 20), 40, 40)
    return make_model([helper.make_node("MatMul", ["x", "w_loud"], ["a"]), helper.make_node("Mul", ["a", "gain"], ["b"]),
                       helper.make_node("MatMul", ["x", "w_quiet"], ["c"]), helper.make_node("Add", ["b", "c"], ["y"])],
                      [("x", [8, 40])], ["y"], {"w_loud": w, "w_quiet": w.copy(), "gain": np.float32([loudness])})


def test_measured_sensitivity_spares_the_layer_the_outputs_depend_on_most():
    """Two branches with the same spectrum, one scaled by 50 before the sum: only measurement tells them apart."""
    model = two_branch_model(50.0)
    calibration = [ir.random_inputs(model, seed=s) for s in range(3)]
    pipeline = "svd-split(target-params=0.85,budget-of=layers,sensitivity={})"
    _, measured, _ = split(model, pipeline.format("measured"), calibration)
    ranks = {layer["weight"]: layer["rank"] for layer in measured["layers"]}
    assert ranks["w_loud"] is None and ranks["w_quiet"] is not None, ranks


def test_trial_split_restores_the_graph_exactly():
    from graphpress.lowrank.factorize import decompose
    from graphpress.lowrank.groups import group_sites
    from graphpress.lowrank.sensitivity import trial_split
    from graphpress.lowrank.sites import find_site
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transA=1, alpha=0.5)], [("x", [32, 4])], ["y"],
                       {"w": low_rank(32, 24, 4)})
    before = model.to_onnx().SerializeToString()
    groups, _ = group_sites(model, [find_site(model, node) for node in model.graph.nodes])
    with trial_split(model, groups[0], decompose(groups[0].matrix), 2):
        assert ops(model) == ["Gemm", "Gemm"]
    assert model.to_onnx().SerializeToString() == before


def test_conv_without_patch_statistics_falls_back_to_plain_svd(caplog):
    w = low_rank(8, 4 * 9, 2).reshape(8, 4, 3, 3)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")], [("x", [1, 4, 6, 6])],
                       ["y"], {"w": w})
    with caplog.at_level(logging.DEBUG, logger="graphpress.passes"):
        result, _, stats = split(model, calibration=[ir.random_inputs(model)])
    assert stats["split"] == 1 and "plain SVD for" in caplog.text and "auto_pad=SAME_UPPER" in caplog.text
    assert_same_outputs(model, result)


def test_measured_curves_give_the_more_sensitive_layer_more_rank():
    """Both branches must be split; only the measured output error says which one the rank is worth more in."""
    model = two_branch_model(5.0)
    calibration = [ir.random_inputs(model, seed=s) for s in range(3)]
    ranks = {}
    for sensitivity in ("spectrum", "measured"):
        _, report, _ = split(model, f"svd-split(target-params=0.5,budget-of=layers,sensitivity={sensitivity})",
                             calibration)
        assert report["params_after"] <= 0.5 * report["params_before"]
        ranks[sensitivity] = {layer["weight"]: layer["rank"] for layer in report["layers"]}
    assert ranks["spectrum"]["w_loud"] == ranks["spectrum"]["w_quiet"], ranks
    assert ranks["measured"]["w_loud"] > ranks["measured"]["w_quiet"] > 0, ranks


# ---- sequential factorization ------------------------------------------------------------------------
def test_stages_follow_the_dependencies_between_weights():
    from graphpress.lowrank.groups import group_sites, stages
    from graphpress.lowrank.sites import find_site
    weights = {name: RNG.standard_normal((8, 8)).astype(np.float32) for name in ("w1", "w2", "w3", "w4")}
    model = make_model([helper.make_node("MatMul", ["h", "w4"], ["y"]),         # listed out of order on purpose
                        helper.make_node("MatMul", ["x", "w1"], ["a"]),
                        helper.make_node("MatMul", ["a", "w2"], ["b"]), helper.make_node("MatMul", ["a", "w3"], ["c"]),
                        helper.make_node("Add", ["b", "c"], ["h"])], [("x", [2, 8])], ["y"], weights)
    groups, _ = group_sites(model, [find_site(model, node) for node in model.graph.nodes if node.op == "MatMul"])
    order = [sorted(groups[i].sites[0].source.name for i in stage) for stage in stages(model, groups)]
    assert order == [["w1"], ["w2", "w3"], ["w4"]]


def residual_model(w1, w2):
    """y = (x + x·w1)·w2: what the truncated w1 loses stays recoverable from the residual sum."""
    return make_model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["x", "h"], ["r"]),
                       helper.make_node("MatMul", ["r", "w2"], ["y"])], [("x", [None, 48])], ["y"], {"w1": w1, "w2": w2})


def relative_error(model, result, batches):
    """||y - y'||² / ||y||² over the batches, both models run in onnxruntime."""
    pairs = [(ir.run(model, batch)["y"], ir.run(result, batch)["y"]) for batch in batches]
    return sum(float(np.sum((a - b) ** 2)) for a, b in pairs) / sum(float(np.sum(a ** 2)) for a, _ in pairs)


def test_sequential_refit_reduces_the_output_error():
    """The second layer, re-fitted on the inputs the truncated first layer gives it, makes up for its error
    (w2 has rank 10, so its own split at rank 12 would lose nothing)."""
    rng = np.random.default_rng(11)
    model = residual_model(rng.standard_normal((48, 48)).astype(np.float32), low_rank(48, 40, 10, rng))
    calibration, held_out = correlated_batches(rng, 48, 8)
    errors = {}
    for sequential in ("false", "true"):
        result, report, _ = split(model, f"svd-split(ratio=0.3,damping=1e-5,sequential={sequential})", calibration)
        assert [layer["rank"] for layer in report["layers"]] == [15, 12]
        errors[sequential] = relative_error(model, result, held_out)
    assert errors["true"] < 0.5 * errors["false"], errors


def test_refit_unsplit_corrects_a_whole_layer_behind_a_split_one():
    rng = np.random.default_rng(12)
    model = residual_model(spectrum_weight(SPECTRUM, 48, 48), rng.standard_normal((48, 40)).astype(np.float32))
    w2 = ir.Model.constant_value(model.tensors()["w2"])
    calibration, held_out = correlated_batches(rng, 48, 8)
    errors = {}
    for refit in ("false", "true"):
        # w2's flat spectrum needs a rank beyond break-even for 99.9%: only w1 is split
        result, report, _ = split(model, f"svd-split(energy=0.999,sequential=true,refit-unsplit={refit})",
                                  calibration)
        assert report["layers"][0]["rank"] is not None and report["layers"][1]["rank"] is None, report
        errors[refit] = relative_error(model, result, held_out)
        changed = not np.array_equal(ir.Model.constant_value(result.tensors()["w2"]), w2)
        assert changed == (refit == "true")
    assert errors["true"] < 0.5 * errors["false"], errors


def test_refit_unsplit_writes_each_layout_back_in_place():
    """An exact (rank-1) split first leaves every later layer's inputs as they were: each refit weight (conv,
    Gemm transB, weight-first MatMul) must come back as itself, in its own layout."""
    model = make_model([helper.make_node("Conv", ["x", "pw"], ["p"]),
                        helper.make_node("Conv", ["p", "cw"], ["c"], pads=[1, 1, 1, 1]),
                        helper.make_node("Flatten", ["c"], ["f"]),
                        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1),
                        helper.make_node("MatMul", ["mw", "g"], ["y"])],
                       [("x", [8, 6, 4, 4])], ["y"],
                       {"pw": low_rank(6, 6, 1).reshape(6, 6, 1, 1),
                        "cw": RNG.standard_normal((12, 6, 3, 3)).astype(np.float32),
                        "gw": RNG.standard_normal((10, 12 * 16)).astype(np.float32),
                        "gb": np.ones(10, np.float32), "mw": RNG.standard_normal((5, 8)).astype(np.float32)})
    calibration = [ir.random_inputs(model, seed=s) for s in range(4)]
    result, _, stats = split(model, "svd-split(energy=1.0,sequential=true,refit-unsplit=true)", calibration)
    assert stats["split"] == 1 and stats["refit_whole"] == 3
    assert_same_outputs(model, result)


def test_measured_curve_of_a_lone_layer_is_its_whitened_dropped_energy():
    """For y = x·W the model's relative output error at rank r is exactly the whitened spectrum's dropped share."""
    from graphpress.lowrank.factorize import InputGram, decompose, whitening_factor
    from graphpress.lowrank.groups import group_sites
    from graphpress.lowrank.rank import dropped_energy, max_useful_rank
    from graphpress.lowrank.sensitivity import measured_costs
    from graphpress.lowrank.sites import find_site
    rng = np.random.default_rng(13)
    model = matmul_model((None, 48), rng.standard_normal((48, 40)).astype(np.float32))
    batches, _ = correlated_batches(rng, 48, 4)
    groups, _ = group_sites(model, [find_site(model, node) for node in model.graph.nodes])
    gram = InputGram(48)
    for batch in batches:
        gram.add(batch["x"])
    decomposition = decompose(groups[0].matrix, whitening_factor(gram.value, 1e-9))
    limit = max_useful_rank(48, 40)
    curve = measured_costs(model, groups, [decomposition], [limit], batches, probes=3, progress=False)[0]
    dropped = dropped_energy(decomposition.s)
    for rank in (limit // 4, limit // 2, 3 * limit // 4):
        assert curve[rank] == pytest.approx(dropped[rank], rel=0.02), rank
