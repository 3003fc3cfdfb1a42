"""The ONNX conformance node cases (onnx.backend.test) through the TVM backend on x86.

Each case is imported, lowered and compiled exactly as `graphpress compile` does, run on the case's
first data set, and compared with the case's expected outputs at the case's own tolerances. The
sweep writes benchmarks/results/tvm_conformance.json: the pass rate, every case's outcome, and the
ops TVM 0.27 cannot import. Cases run in worker processes, so a crash inside TVM fails one case.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tvm_conformance.json"
CASE_TIMEOUT_SEC = 180


def run_case(case) -> dict:
    """Outcome of one node case: status in pass/mismatch/unsupported_op/not_tensor/import_error/
    compile_error/run_error, with the first line of the reason."""
    import tvm
    from tvm import relax

    from graphpress.backends import targets
    from graphpress.backends._tvm import summarize
    from graphpress.backends.tvm_compile import build, import_relax, input_specs, lower, unsupported_nodes

    model = case.model
    ops = sorted({n.op_type for n in model.graph.node})
    result = {"name": case.name, "ops": ops}
    missing = sorted({op for _, op in unsupported_nodes(model)})
    if missing:
        return {**result, "status": "unsupported_op", "unsupported": missing}
    inputs, expected = case.data_sets[0]
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    if (len(inputs) != len(graph_inputs) or not all(v.type.HasField("tensor_type") for v in graph_inputs)
            or not all(isinstance(a, np.ndarray) for a in inputs)):
        return {**result, "status": "not_tensor", "detail": "optional, sequence or omitted inputs"}
    names = [v.name for v in graph_inputs]
    feeds = dict(zip(names, inputs))
    spec = targets.resolve("x86-64-v3")
    stage = "import_error"
    try:
        specs, _ = input_specs(model, {n: list(a.shape) for n, a in feeds.items()}, case.name)
        mod = import_relax(model, specs, case.name)
        stage = "compile_error"
        target = spec.tvm_target()
        executable = build(lower(mod, target), spec, target, case.name)
        stage = "run_error"
        vm = relax.VirtualMachine(executable, tvm.cpu())
        out = vm["main"](*[tvm.runtime.tensor(np.asarray(feeds[n], order="C")) for n in names])
        outs = [out] if len(expected) == 1 else list(out)
        got = [o.numpy() if hasattr(o, "numpy") else np.asarray(o if isinstance(o, int) else list(o)) for o in outs]
    except Exception as exc:  # everything TVM raises counts against the case
        return {**result, "status": stage, "detail": summarize(exc)[:300]}
    if len(got) != len(expected):
        return {**result, "status": "mismatch", "detail": f"{len(got)} outputs, expected {len(expected)}"}
    for g, e in zip(got, expected):
        e = np.asarray(e)
        try:
            if e.dtype.kind in "fc":
                np.testing.assert_allclose(g, e, rtol=case.rtol, atol=case.atol)
            else:
                np.testing.assert_array_equal(g, e)
        except (AssertionError, TypeError, ValueError) as exc:
            return {**result, "status": "mismatch", "detail": str(exc).strip().splitlines()[0][:300]}
    return {**result, "status": "pass"}


def _serve(conn) -> None:
    """Worker process: run the cases it is sent, one at a time, until it receives None."""
    while (case := conn.recv()) is not None:
        conn.send(run_case(case))


class _Worker:
    """A worker process and the case it is running, so that a crash is charged to that case."""

    def __init__(self, context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.case, self.since = None, 0.0

    def give(self, case) -> None:
        self.case, self.since = case, time.perf_counter()
        self.conn.send(case)

    def stop(self) -> None:
        self.process.kill()
        self.process.join()


def _lost(case, status: str) -> dict:
    return {"name": case.name, "ops": sorted({n.op_type for n in case.model.graph.node}), "status": status}


def sweep(workers: int = 2) -> dict:
    from onnx.backend.test.case.node import collect_testcases

    todo = [c for c in collect_testcases(None) if c.kind == "node"]
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    pool = [_Worker(context) for _ in range(workers)]
    outcomes = []
    total = len(todo)
    while len(outcomes) < total:
        for worker in pool:
            if worker.case is None and todo:
                worker.give(todo.pop())
        busy = {w.conn: w for w in pool if w.case is not None}
        for conn in multiprocessing.connection.wait(list(busy), timeout=5):
            worker = busy[conn]
            try:
                outcomes.append(conn.recv())
                worker.case = None
            except EOFError:  # the worker died inside TVM (e.g. SIGFPE): charge its case, replace it
                outcomes.append(_lost(worker.case, "crash"))
                worker.stop()
                pool[pool.index(worker)] = _Worker(context)
        for i, worker in enumerate(pool):
            if worker.case is not None and time.perf_counter() - worker.since > CASE_TIMEOUT_SEC:
                outcomes.append(_lost(worker.case, "timeout"))
                worker.stop()
                pool[i] = _Worker(context)
    for worker in pool:
        worker.conn.send(None)
        worker.process.join(timeout=10)
    counts = Counter(o["status"] for o in outcomes)
    importable = [o for o in outcomes if o["status"] not in ("unsupported_op", "not_tensor")]
    unsupported = Counter(op for o in outcomes for op in o.get("unsupported", []))
    failing_ops = Counter(op for o in outcomes if o["status"] not in ("pass", "unsupported_op") for op in o["ops"])
    return {
        "what": "ONNX node conformance cases (onnx.backend.test.case.node) compiled with graphpress's TVM "
                "path for x86-64-v3 and run on their first data set at each case's rtol/atol",
        "onnx_cases": len(outcomes),
        "passed": counts["pass"],
        "pass_rate": counts["pass"] / max(len(outcomes), 1),
        "pass_rate_where_importer_has_the_ops": counts["pass"] / max(len(importable), 1),
        "status_counts": dict(counts),
        "unsupported_ops": dict(sorted(unsupported.items())),
        "ops_in_failing_cases": dict(failing_ops.most_common()),
        "seconds": round(time.perf_counter() - started, 1),
        "cases": outcomes,
    }


def test_conformance_sweep_reports_pass_rate_and_unsupported_ops():
    import onnx
    import tvm

    report = {"versions": {"tvm": tvm.__version__, "onnx": onnx.__version__}, **sweep()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.part")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(RESULTS)
    print(f"TVM conformance: {report['passed']}/{report['onnx_cases']} node cases pass "
          f"({report['pass_rate']:.1%}; {report['pass_rate_where_importer_has_the_ops']:.1%} of the cases whose ops "
          f"the importer knows and whose inputs are tensors); statuses {report['status_counts']}; "
          f"unsupported ops: {', '.join(report['unsupported_ops'])}")
    assert report["onnx_cases"] > 1000
    assert report["pass_rate"] > 0.3  # 0.32 when first measured (TVM 0.27, onnx 1.23): guards against regressions
