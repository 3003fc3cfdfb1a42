"""The `graphpress` command: output, exit codes, one-line errors, the input never modified."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphpress.cli import main


def write_model(path: Path) -> Path:
    """x -> Identity -> MatMul(W) -> Relu -> y (a model that `fold` has something to do on)."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12, dtype=np.float32))
    nodes = [helper.make_node("Identity", ["x"], ["xi"], name="id"),
             helper.make_node("MatMul", ["xi", "W"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_passes_lists_and_describes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "pass" in out and "what it does" in out


def test_inspect(tmp_path, capsys):
    model = write_model(tmp_path / "m.onnx")
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "MatMul" in out and "12 parameters" in out and "input" in out
    assert main(["inspect", str(model), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == 12 and summary["ops"]["MatMul"] == 1


def test_optimize_checks_and_never_touches_the_input(tmp_path, capsys):
    model = write_model(tmp_path / "m.onnx")
    before = digest(model)
    out = tmp_path / "out" / "o.onnx"
    code = main(["optimize", str(model), "-p", "eliminate-identity", "-o", str(out), "--check",
                 "--check-rtol", "1e-6"])
    assert code == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert "eliminate-identity" in text and "max abs 0" in text
    assert digest(model) == before and out.exists()
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Relu"]


@pytest.mark.parametrize("args, message", [
    (["inspect", "missing.onnx"], "no such file"),
    (["optimize", "notonnx.txt", "-p", "fold", "-o", "x.onnx"], "not an ONNX model"),
    (["optimize", "m.onnx", "-p", "fold,warp-drive", "-o", "x.onnx"], "unknown pass 'warp-drive'"),
    (["optimize", "m.onnx", "-p", "eliminate-identity(speed=3)", "-o", "x.onnx"], "has no option 'speed'"),
    (["optimize", "m.onnx", "-p", "fold", "-o", "m.onnx"], "refusing to overwrite the input"),
    (["passes", "no-such-pass"], "unknown pass"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_model(tmp_path / "m.onnx")
    (tmp_path / "notonnx.txt").write_text("hello, this is not a model\n" * 20)
    before = digest(tmp_path / "m.onnx")
    result = subprocess.run([sys.executable, "-m", "graphpress.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert digest(tmp_path / "m.onnx") == before
    assert not (tmp_path / "x.onnx").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "graphpress.cli", "--debug", "inspect", str(tmp_path / "nope.onnx")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr
