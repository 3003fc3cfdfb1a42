"""The backend subcommands (compile, run, bench, tune): outputs, and one-line errors with exit status 2.

The parser is built here from `commands.register`, with the main CLI's contract (a GraphpressError is
printed on one line, exit status 2), so these tests do not depend on the rest of `graphpress.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx
import pytest

from graphpress.backends import commands
from graphpress.errors import GraphpressError
from test_backend_models import assert_close, conv_net, onnxruntime_outputs, unsupported_op_net


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="graphpress")
    commands.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GraphpressError as exc:
        print(f"graphpress: error: {exc}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "conv.onnx"
    onnx.save(conv_net(), path)
    return path


def test_compile_run_bench(model_file, tmp_path, capsys):
    artifact = tmp_path / "conv-x86"
    assert main(["compile", str(model_file), "--target", "x86", "-o", str(artifact)]) == 0
    assert f"wrote {artifact}" in capsys.readouterr().out
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert_close({"y": out["y"]}, onnxruntime_outputs(conv_net(), {"x": x}))
    assert main(["run", str(artifact), "--inputs", str(tmp_path / "in.npz")]) == 0
    assert "y: float32 [1, 5]" in capsys.readouterr().out
    assert main(["bench", str(artifact), "--repeat", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] >= 1 and result["tvm"]["median_ms"] > 0 and result["onnxruntime"]["p90_ms"] > 0
    assert result["tvm"]["p90_ms"] >= result["tvm"]["median_ms"]


def test_compile_with_target_json_and_shape(model_file, tmp_path):
    out = tmp_path / "a.tar"
    assert main(["compile", str(model_file), "--target-json", '{"kind": "llvm", "mcpu": "x86-64-v2"}',
                 "--shape", "x=2,3,16,16", "-o", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("argv, message", [
    (["compile", "{model}", "--target-json", '{"kind":"llvm","mcpu":"pentium9"}', "-o", "{tmp}/a"],
     "CPU 'pentium9' is unknown to LLVM"),
    (["compile", "{model}", "--target", "cuda", "--arch", "sm_1", "-o", "{tmp}/a"], "cuda arch"),
    (["compile", "{model}", "--target", "x86", "--shape", "x=1,a", "-o", "{tmp}/a"], "--shape 'x=1,a'"),
    (["compile", "{tmp}/missing.onnx", "--target", "x86", "-o", "{tmp}/a"], "missing.onnx: no such file"),
    (["compile", "{unsupported}", "--target", "x86", "-o", "{tmp}/a"], "still runs in onnxruntime"),
    (["run", "{tmp}/nothing", "--inputs", "{tmp}/in.npz"], "no such artifact"),
    (["tune", "{model}", "--target", "aarch64", "--trials", "4", "-o", "{tmp}/db"], "--rpc HOST:PORT --key KEY"),
    (["tune", "{model}", "--target", "x86", "--trials", "4", "-o", "{tmp}/db", "--rpc", "127.0.0.1:1",
      "--key", "k"], "cannot reach the TVM RPC tracker at 127.0.0.1:1"),
    (["compile", "{model}", "--target", "x86", "--tuning-db", "{tmp}", "-o", "{tmp}/a"],
     "not a tuning database written by `graphpress tune`"),
])
def test_errors_are_one_line_with_exit_status_2(model_file, tmp_path, capsys, argv, message):
    unsupported = tmp_path / "q.onnx"
    onnx.save(unsupported_op_net(), unsupported)
    fill = {"{model}": str(model_file), "{tmp}": str(tmp_path), "{unsupported}": str(unsupported)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists()
