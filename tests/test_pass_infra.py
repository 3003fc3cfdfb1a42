"""Pass infrastructure: options, registry, pipeline strings, the manager, instruments, pattern rules."""

from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import graphpress.ir as ir
from graphpress.errors import PassError, PipelineError
from graphpress.passes import (Checker, FixedPoint, IRDump, NumericCheck, Pass, PassManager, PassResult, Rule,
                               apply_rules, format_pipeline, function_pass, get, parse_pipeline, register)
from graphpress.passes.registry import _PASSES


@register("test-options")
class OptionsPass(Pass):
    """A pass with one option of each kind."""

    ratio: float = 0.5                     # a share
    rounds: int = 1                        # a count
    enabled: bool = False                  # a switch
    method: Literal["minmax", "entropy"] = "minmax"   # a choice
    exclude: list[str] = ()                # names to leave alone
    limit: float | None = None             # optional cap
    preserves_analyses = True

    def run(self, model, ctx):
        return PassResult(False)


@register("test-drop-relu")
class DropOneRelu(Pass):
    """Remove one Relu per run (so a fixed point needs several rounds)."""

    def run(self, model, ctx):
        for node in model.nodes("Relu"):
            with ctx.at(node):
                ir.remove_node(model, node)
            model.cleanup()
            return PassResult(True, {"removed": 1})
        return PassResult(False)


@register("test-explode")
class Explode(Pass):
    """Fail on the first Relu."""

    def run(self, model, ctx):
        with ctx.at(next(model.nodes("Relu"))):
            raise ValueError("boom")


@register("test-negate")
class Negate(Pass):
    """Change the numerics: negate the model output."""

    def run(self, model, ctx):
        ir.insert_node_after(model, model.graph.outputs[0], "Neg")
        return PassResult(True)


@function_pass("test-count")
def count_nodes(model, ctx):
    """Count nodes without changing anything."""
    ctx.reports["test-count"] = len(model.graph.nodes)
    return False


def relu_chain(n: int = 3):
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"relu{i}") for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [2, 2])])
    return ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_options_are_typed_and_documented():
    specs = {s.key: s for s in OptionsPass.options()}
    assert specs["ratio"].type is float and specs["ratio"].default == 0.5 and specs["ratio"].help == "a share"
    p = parse_pipeline("test-options(ratio=30%,rounds=3,enabled=yes,method=entropy,exclude=[a,'b c'],limit=none)")[0]
    assert (p.ratio, p.rounds, p.enabled, p.method, p.exclude, p.limit) == (0.3, 3, True, "entropy", ["a", "b c"], None)
    assert OptionsPass(ratio=1).ratio == 1.0 and isinstance(OptionsPass(ratio=1).ratio, float)


@pytest.mark.parametrize("text, message", [
    ("test-options(ratio=abc)", "is not a float"),
    ("test-options(method=kl)", "not one of"),
    ("test-options(rounds=1.5)", "is not a int"),
    ("test-options(speed=1)", "has no option 'speed'"),
    ("test-options(ratio=1,ratio=2)", "given twice"),
    ("test-optoins", "did you mean test-options"),
    ("", "empty pipeline"),
    ("test-count,", "expected word"),
    ("(test-count", "expected \\)"),
    ("(test-count)*0", "positive integer"),
])
def test_pipeline_errors_point_at_the_problem(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_python_options_are_checked_like_pipeline_options():
    with pytest.raises(PipelineError, match="not one of"):
        OptionsPass(method="kl")


def test_pipeline_round_trips():
    text = "test-options(ratio=0.3,exclude=[a,b]),(test-drop-relu,test-count)*4"
    elements = parse_pipeline(text)
    assert isinstance(elements[1], FixedPoint) and elements[1].max_iterations == 4
    assert format_pipeline(elements) == text
    assert format_pipeline(parse_pipeline(format_pipeline(elements))) == text


def test_registry_rejects_duplicates_and_non_passes():
    with pytest.raises(ValueError, match="already registered"):
        @register("test-options")
        class Other(Pass):
            def run(self, model, ctx):
                return PassResult(False)
    with pytest.raises(TypeError):
        register("not-a-pass")(object)
    assert get("test-count").summary() == "Count nodes without changing anything."


def test_fixed_point_runs_until_nothing_changes():
    model = relu_chain(3)
    manager = PassManager("(test-drop-relu)")
    manager.run(model)
    assert not list(model.nodes("Relu"))
    assert [r.changed for r in manager.records] == [True, True, True, False]
    assert [r.iteration for r in manager.records] == [1, 2, 3, 4]


def test_fixed_point_respects_its_cap():
    model = relu_chain(5)
    manager = PassManager("(test-drop-relu)*2")
    manager.run(model)
    assert len(list(model.nodes("Relu"))) == 3 and len(manager.records) == 2


def test_errors_name_pass_node_and_history():
    with pytest.raises(PassError) as info:
        PassManager("test-count,test-options,test-explode").run(relu_chain())
    message = str(info.value)
    assert "pass test-explode failed on node 'relu0' (Relu)" in message
    assert "ValueError: boom" in message and "passes before it: test-count, test-options" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_numeric_check_catches_the_pass_that_breaks_outputs():
    model = relu_chain()
    PassManager("test-drop-relu", instruments=[NumericCheck()]).run(model)  # relu(relu(x)) == relu(x)...
    with pytest.raises(PassError, match="pass test-negate changed the outputs"):
        PassManager("test-count,test-negate", instruments=[NumericCheck()]).run(relu_chain())


def test_checker_and_dump(tmp_path):
    model = relu_chain()
    PassManager("test-drop-relu,test-count", instruments=[Checker(), IRDump(tmp_path)]).run(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.onnx", "01-test-drop-relu.onnx",
                                                          "02-test-count.onnx"]

    @register("test-break-graph")
    class BreakGraph(Pass):
        """Leave a node with an unknown op in the default domain."""

        def run(self, model, ctx):
            node = next(model.nodes("Relu"))
            node.op = "NoSuchOp"
            return PassResult(True)

    try:
        with pytest.raises(PassError, match="produced an invalid model"):
            PassManager("test-break-graph", instruments=[Checker()]).run(relu_chain())
    finally:
        _PASSES.pop("test-break-graph")


def test_env_instruments(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHPRESS_CHECK_NUMERICS", "1e-5")
    with pytest.raises(PassError, match="changed the outputs"):
        PassManager("test-negate").run(relu_chain())


def test_analyses_are_cached_until_a_pass_changes_the_graph():
    model = relu_chain(2)
    calls = []

    @register("test-use-analysis")
    class UseAnalysis(Pass):
        """Read a cached analysis."""

        preserves_analyses = True

        def run(self, model, ctx):
            ctx.analysis("n", lambda: calls.append(1) or len(model.graph.nodes))
            return PassResult(False)

    try:
        PassManager("test-use-analysis,test-use-analysis,test-drop-relu,test-use-analysis").run(model)
    finally:
        _PASSES.pop("test-use-analysis")
    assert len(calls) == 2


def square_model():
    """x -> Mul(x, x) -> Relu -> y; the rule below turns Mul+Relu into Mul (x*x >= 0)."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["m"], name="mul"), helper.make_node("Relu", ["m"], ["y"], name="r"),
             helper.make_node("Mul", ["x", "c"], ["m2"], name="mul2"), helper.make_node("Relu", ["m2"], ["z"], name="r2")]
    graph = helper.make_graph(nodes, "sq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
                              [helper.make_tensor("c", TensorProto.FLOAT, [3], [1.0, -1.0, 2.0])])
    return ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


SQUARE_IS_NONNEGATIVE = Rule(
    name="square-relu",
    ops=("Mul", "Relu"),
    check=lambda model, nodes: None if nodes[0].inputs[0] is nodes[0].inputs[1] else "not a square",
    rewrite=lambda model, nodes: (lambda out: ([gs.Node("Mul", inputs=list(nodes[0].inputs), outputs=[out])], out))(
        gs.Variable(model.unique_name("sq"), dtype=np.float32)),
)


def test_pattern_rule_rewrites_only_where_its_check_passes(caplog):
    from graphpress.passes import PassContext
    model = square_model()
    before = model.to_onnx()
    with caplog.at_level("DEBUG", logger="graphpress.passes"):
        counts = apply_rules(model, [SQUARE_IS_NONNEGATIVE], PassContext())
    assert counts == {"square-relu": 1}
    assert [n.op for n in model.graph.nodes].count("Relu") == 1
    assert "skip Mul 'mul2': not a square" in caplog.text
    assert ir.compare(before, model).max_abs == 0
    made = [n for n in model.to_onnx().graph.node if n.doc_string]
    assert len(made) == 1 and "square-relu" in made[0].doc_string
    assert [t.name for t in model.graph.outputs] == ["y", "z"]


def test_function_pass_reports():
    from graphpress.passes import PassContext
    ctx = PassContext()
    PassManager("test-count").run(relu_chain(2), ctx)
    assert ctx.reports["test-count"] == 2 and ctx.history == ["test-count"]
