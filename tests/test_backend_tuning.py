"""MetaSchedule tuning: locally, and measured through a TVM RPC tracker and server on 127.0.0.1.

The tuning tests are slow: every MetaSchedule builder worker first imports TVM's tensor intrinsics
(tens of seconds).
"""

from __future__ import annotations

import json
import logging
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
from graphpress.backends.tuning import _unnamed_log_handlers_detached, tune
from graphpress.errors import BackendError
from test_backend_models import assert_close, conv_net, onnxruntime_outputs


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


def _compiled_and_checked(db, tmp_path, name: str) -> dict:
    """Compile conv_net with the database, check the outputs against onnxruntime; the tuning metadata."""
    artifact = compile(conv_net(), "x86", tmp_path / name, tuning_db=db, progress=False)
    loaded = runtime.load(artifact)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert_close(loaded.run({"x": x}), onnxruntime_outputs(conv_net(), {"x": x}))
    return loaded.metadata["tuning"]


def _check_tuned_artifact(db, tmp_path, name: str) -> None:
    """The database records, per task, the default and best tuned times measured side by side, and
    `compile` takes a tuned schedule exactly for the tasks where it was faster."""
    info_path = db / "graphpress-tuning.json"
    info = json.loads(info_path.read_text())
    assert info["trials"] >= 1
    rows = info["tasks"]
    assert rows and all(r["default_ms"] > 0 for r in rows) and any(r["tuned_ms"] for r in rows)
    faster = sum(1 for r in rows if r["tuned_ms"] is not None and r["tuned_ms"] < r["default_ms"])
    tuning = _compiled_and_checked(db, tmp_path, name)
    assert tuning["tasks"] == len(rows) and tuning["tasks_tuned"] == faster
    assert (tuning["tuned_functions"] >= 1) == (faster >= 1) and tuning["functions"] >= tuning["tuned_functions"]
    assert tuning["estimated_speedup_of_tasks"] >= 1.0
    # the choice follows the measurements: claim every tuned schedule slower, then every one faster
    for slower in (True, False):
        for r in rows:
            if r["tuned_ms"] is not None:
                r["tuned_ms"] = r["default_ms"] * (2.0 if slower else 0.5)
        info_path.write_text(json.dumps(info))
        tuning = _compiled_and_checked(db, tmp_path, f"{name}-{'slower' if slower else 'faster'}")
        if slower:
            assert tuning["tuned_functions"] == 0 and tuning["tasks_tuned"] == 0
        else:
            tuned_tasks = sum(1 for r in rows if r["tuned_ms"] is not None)
            assert tuning["tasks_tuned"] == tuned_tasks and tuning["tuned_functions"] >= tuned_tasks


@pytest.mark.slow
def test_tune_through_rpc_tracker_on_loopback(tracker, tmp_path):
    db = tmp_path / "rpc.db"
    info = tune(conv_net(), "x86", 8, db, rpc=tracker, key="loopback", progress=False)
    assert info["measured_by"] == f"rpc {tracker} key loopback"
    _check_tuned_artifact(db, tmp_path, "rpc-tuned")
    with pytest.raises(BackendError, match="no RPC server registered under key 'nope'.*loopback"):
        tune(conv_net(), "x86", 8, tmp_path / "x.db", rpc=tracker, key="nope", progress=False)


@pytest.mark.slow
def test_tune_locally_extends_the_database_and_refuses_another_target(tmp_path):
    db = tmp_path / "local.db"
    first = tune(conv_net(), "x86", 4, db, progress=False)
    second = tune(conv_net(), "x86", 4, db, progress=False)
    assert second["trials"] > first["trials"]
    _check_tuned_artifact(db, tmp_path, "local-tuned")
    with pytest.raises(BackendError, match="tuned for .* not for"):
        compile(conv_net(), "x86-64-v3", tmp_path / "other", tuning_db=db, progress=False)


def test_tuning_runs_with_unnamed_handlers_on_the_meta_schedule_logger(tmp_path):
    """TVM rebuilds its loggers from the names of the handlers on its logger, and failed on an unnamed
    one (as pytest attaches to every non-propagating logger) in the second tuning run of a process."""
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = logging.NullHandler()
    logger.addHandler(unnamed)
    try:
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'format'"):
            get_loggers_from_work_dir(str(tmp_path / "bare"), ["task"])
        with _unnamed_log_handlers_detached():
            get_loggers_from_work_dir(str(tmp_path / "detached"), ["task"])
        assert unnamed in logger.handlers
    finally:
        logger.removeHandler(unnamed)
