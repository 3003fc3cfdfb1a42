"""MetaSchedule tuning: locally, and measured through a TVM RPC tracker and server on 127.0.0.1.

Slow: every MetaSchedule builder worker first imports TVM's tensor intrinsics (tens of seconds).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from graphpress import runtime
from graphpress.backends import compile
from graphpress.backends.tuning import tune
from graphpress.errors import BackendError
from test_backend_models import assert_close, conv_net, onnxruntime_outputs

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracker():
    """A TVM RPC tracker and one CPU server registered under key "loopback", both on 127.0.0.1."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs the tornado package (pip install tornado)")
    from tvm import rpc

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(port), "--port-end", str(port + 1), "--silent"], start_new_session=True)]
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and procs[0].poll() is None, "the RPC tracker did not start"
                time.sleep(0.5)
        server_port = _free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                       "--port", str(server_port), "--port-end", str(server_port + 1),
                                       "--tracker", f"127.0.0.1:{port}", "--key", "loopback", "--silent"],
                                      start_new_session=True))
        while "loopback" not in rpc.connect_tracker("127.0.0.1", port).summary().get("queue_info", {}):
            assert time.time() < deadline and procs[1].poll() is None, "the RPC server did not register"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:  # each in a session of its own: stop the worker processes they forked as well
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _check_tuned_artifact(db, tmp_path, name: str) -> None:
    info = json.loads((db / "graphpress-tuning.json").read_text())
    assert info["trials"] >= 1
    artifact = compile(conv_net(), "x86", tmp_path / name, tuning_db=db, progress=False)
    loaded = runtime.load(artifact)
    tuning = loaded.metadata["tuning"]
    assert tuning["tuned_functions"] >= 1 and tuning["functions"] >= tuning["tuned_functions"]
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert_close(loaded.run({"x": x}), onnxruntime_outputs(conv_net(), {"x": x}))


def test_tune_through_rpc_tracker_on_loopback(tracker, tmp_path):
    db = tmp_path / "rpc.db"
    info = tune(conv_net(), "x86", 8, db, rpc=tracker, key="loopback", progress=False)
    assert info["measured_by"] == f"rpc {tracker} key loopback"
    _check_tuned_artifact(db, tmp_path, "rpc-tuned")
    with pytest.raises(BackendError, match="no RPC server registered under key 'nope'.*loopback"):
        tune(conv_net(), "x86", 8, tmp_path / "x.db", rpc=tracker, key="nope", progress=False)


def test_tune_locally_extends_the_database_and_refuses_another_target(tmp_path):
    db = tmp_path / "local.db"
    first = tune(conv_net(), "x86", 4, db, progress=False)
    second = tune(conv_net(), "x86", 4, db, progress=False)
    assert second["trials"] > first["trials"]
    _check_tuned_artifact(db, tmp_path, "local-tuned")
    with pytest.raises(BackendError, match="tuned for .* not for"):
        compile(conv_net(), "x86-64-v3", tmp_path / "other", tuning_db=db, progress=False)
