"""`compress`: the budget search, the Pareto front, --eval loading, and the report on a real small model."""

import json
import textwrap

import numpy as np
import pytest

from graphpress.cli import parse_budget
from graphpress.compress import load_evaluator
from graphpress.compress.search import SearchLog, Trial, most_aggressive_within, refined, smallest_within
from graphpress.errors import GraphpressError


def test_binary_search_finds_the_most_aggressive_setting_within_the_floor():
    scores = {"a": 0.99, "b": 0.98, "c": 0.97, "d": 0.90, "e": 0.80}
    tried = []

    def score(s):
        tried.append(s)
        return scores[s]

    assert most_aggressive_within(list(scores), score, floor=0.965) == "c"
    assert len(tried) <= 3
    assert most_aggressive_within(list(scores), scores.get, floor=0.995) is None
    assert most_aggressive_within(list(scores), scores.get, floor=0.0) == "e"


def test_unordered_settings_keep_the_smallest_within_the_floor():
    scores = {"mild": 0.99, "mixed": 0.985, "all": 0.90}
    sizes = {"mild": 30, "mixed": 40, "all": 20}
    assert smallest_within(list(scores), scores.get, sizes.get, floor=0.98) == "mild"
    assert smallest_within(list(scores), scores.get, sizes.get, floor=0.0) == "all"
    assert smallest_within(list(scores), scores.get, sizes.get, floor=0.995) is None


def test_refined_merges_options_into_the_last_pass_of_that_name():
    assert refined("fold,insert-qdq(method=mse)", "insert-qdq(int4-share=0.5)") == \
        "fold,insert-qdq(method=mse,int4-share=0.5)"
    assert refined("smooth-quant(alpha=0.75),insert-qdq", "insert-qdq(rounding=gptq)") == \
        "smooth-quant(alpha=0.75),insert-qdq(rounding=gptq)"
    with pytest.raises(GraphpressError, match="no insert-qdq pass"):
        refined("fold", "insert-qdq(int4-share=0.5)")


def test_pareto_front_drops_dominated_trials():
    log = SearchLog([Trial("p", "a", 100, 0.9), Trial("p", "b", 80, 0.9), Trial("p", "c", 60, 0.8),
                     Trial("p", "d", 70, 0.7), Trial("p", "e", 120, 0.95)])
    assert [t.pipeline for t in log.pareto_front()] == ["c", "b", "e"]


@pytest.mark.parametrize("text, value", [("1%", 0.01), ("1.0%", 0.01), ("0.02", 0.02), ("0", 0.0)])
def test_budget_parsing(text, value):
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-1%", "1%%"])
def test_bad_budget_is_refused(text):
    with pytest.raises(GraphpressError, match="--budget"):
        parse_budget(text)


def test_eval_loads_from_a_module_path_and_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_metric.py").write_text(textwrap.dedent("""
        def score(model):
            return float(model.run({})["y"].sum())
        def two_args(model, extra):
            return 0
        def not_a_number(model):
            return "high"
        CONSTANT = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    class Fake:
        def run(self, inputs):
            return {"y": np.ones(3)}

    assert load_evaluator("my_metric:score")(Fake()) == 3.0
    assert load_evaluator(f"{tmp_path / 'my_metric.py'}:score")(Fake()) == 3.0
    with pytest.raises(GraphpressError, match="not a number"):
        load_evaluator("my_metric:not_a_number")(Fake())


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected MODULE:FUNCTION"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("my_metric:missing", "has no 'missing'"),
    ("my_metric:CONSTANT", "is not a function"),
    ("my_metric:two_args", "must take one argument"),
    ("nowhere/file.py:f", "no such file"),
    ("broken_metric:f", "importing broken_metric failed: ZeroDivisionError"),
])
def test_bad_eval_specs_have_clear_errors(tmp_path, monkeypatch, spec, message):
    (tmp_path / "my_metric.py").write_text("CONSTANT = 3\ndef two_args(model, extra):\n    return 0\n")
    (tmp_path / "broken_metric.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(GraphpressError, match=message):
        load_evaluator(spec)


def test_compress_respects_the_budget_and_reports_every_stage(tmp_path):
    """End to end on the shipped digits CNN with its real held-out data (no compile: that is tested in
    the backend tests and the demo)."""
    from graphpress.compress import compress
    from graphpress.examples import evaluate_top1, example_data, example_model_path
    calibration, _, _ = example_data()
    budget = 0.01
    result = compress(example_model_path(), calibration, tmp_path, evaluator=evaluate_top1, budget=budget,
                      target=None, metric_name="top-1", log=lambda line: None)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pipeline"] == result["pipeline"] and report["pipeline"].startswith("fold")
    stages = [s["stage"] for s in report["stages"]]
    assert stages[:2] == ["float", "fold"] and stages[-1] == "compact"
    assert set(stages[2:-1]) <= {"prune", "svd", "int8", "int4"} and report["pipeline"].endswith(",compact")
    final = report["stages"][-1]
    assert final["metric"] >= report["float_metric"] - budget
    # the metric recorded for the written model is the model's real metric
    assert evaluate_top1(tmp_path / "model.onnx") == pytest.approx(final["metric"])
    assert final["size_bytes"] < report["stages"][-2]["size_bytes"] < report["stages"][0]["size_bytes"]
    accepted = [t for t in report["search"]["trials"] if t["accepted"]]
    assert all(t["metric"] >= report["float_metric"] - budget for t in accepted)
    assert report["search"]["pareto_front"]
    html = (tmp_path / "report.html").read_text()
    assert "Per stage" in html and html.count("data:image/png;base64,") == 2
    assert (tmp_path / "stages.png").stat().st_size > 0 and (tmp_path / "tradeoff.png").stat().st_size > 0


def test_compress_cli_with_a_user_metric_file(tmp_path):
    """`graphpress compress --eval file.py:function` on .npz calibration data; a zero budget keeps the metric."""
    from graphpress.cli import main
    from graphpress.examples import example_data, example_model_path
    calibration, _, _ = example_data()
    np.savez(tmp_path / "calib.npz", input=np.concatenate([b["input"] for b in calibration]))
    (tmp_path / "metric.py").write_text(textwrap.dedent("""
        from graphpress.examples import evaluate_top1
        def top1(model):
            return evaluate_top1(model)
    """))
    out = tmp_path / "out"
    code = main(["compress", str(example_model_path()), "--calib", str(tmp_path / "calib.npz"),
                 "--eval", f"{tmp_path / 'metric.py'}:top1", "--budget", "0%", "--target", "none", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][-1]["metric"] >= report["float_metric"]
    assert (out / "model.onnx").exists() and "artifact" not in report
