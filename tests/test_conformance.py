"""The ONNX conformance node cases: load -> save and load -> fold -> save must reproduce the expected outputs.

Every case of `onnx.backend.test.case.node.collect_testcases()` (and of the small model cases stored in
the wheel: PyTorch-converted layers and operators, simple graphs) that onnxruntime itself runs and passes
(with the case's rtol/atol, compared the way onnx's backend runner compares) is checked twice: after a
graphpress round trip and after the `fold` pipeline. Cases are split into a few chunks so that `-n 2`
spreads them over both cores; collecting the cases takes onnx ~10 s, so they are cached in the temp
directory (keyed by the onnx version) for later runs.

`python tests/test_conformance.py` runs the whole sweep once and writes
benchmarks/results/conformance.json (counts and every failure with its reason).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.backend.test.runner import Runner

import graphpress.ir as ir
from graphpress.passes import PassContext, get

CHUNKS = 8
CACHE = Path(tempfile.gettempdir()) / f"graphpress-onnx-node-cases-{onnx.__version__}.pkl"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "conformance.json"


def node_cases() -> list[dict[str, Any]]:
    """Every node case as {name, model (bytes), data_sets, rtol, atol}, from the cache when present."""
    if CACHE.exists():
        with CACHE.open("rb") as f:
            return pickle.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases
        cases = [{"name": c.name, "model": c.model.SerializeToString(), "data_sets": c.data_sets,
                  "rtol": c.rtol, "atol": c.atol} for c in collect_testcases()]
    fd, tmp = tempfile.mkstemp(dir=CACHE.parent, prefix=CACHE.name)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(cases, f)
    os.replace(tmp, CACHE)
    return cases


#: the model cases stored on disk in the onnx wheel (PyTorch exports, small graphs), beside the node cases
MODEL_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def disk_cases() -> list[dict[str, Any]]:
    """The model cases of MODEL_KINDS (with onnx's default tolerances), in the same form as `node_cases`."""
    cases = []
    for kind in MODEL_KINDS:
        for case_dir in sorted((DATA / kind).glob("*/model.onnx")):
            model = onnx.load(case_dir)
            data_sets = [([_read_value(f, t.type) for f, t in zip(sorted(d.glob("input_*.pb")), _real_inputs(model))],
                          [_read_value(f, t.type) for f, t in zip(sorted(d.glob("output_*.pb")), model.graph.output)])
                         for d in sorted(case_dir.parent.glob("test_data_set_*"))]
            cases.append({"name": f"{kind}/{case_dir.parent.name}", "model": model.SerializeToString(),
                          "data_sets": data_sets, "rtol": 1e-3, "atol": 1e-7})
    return cases


def _real_inputs(model: onnx.ModelProto) -> list:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _read_value(path: Path, type_proto: onnx.TypeProto):
    """A stored input/output: a tensor, a sequence or an optional, as onnxruntime takes and returns it."""
    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        return numpy_helper.to_list(onnx.SequenceProto.FromString(data))
    if type_proto.HasField("optional_type"):
        return numpy_helper.to_optional(onnx.OptionalProto.FromString(data))
    return numpy_helper.to_array(onnx.TensorProto.FromString(data))


def _feed(model: onnx.ModelProto, inputs: list) -> dict[str, Any]:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return {name: Runner._normalize_tensor(value) if isinstance(value, onnx.TensorProto) else value
            for name, value in zip(names, inputs) if value is not None}


def _run(model_bytes: bytes, feed: dict) -> list:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _reproduces(case: dict, model_bytes: bytes) -> str:
    """'' when `model_bytes` reproduces every expected output of the case, else why not."""
    model = onnx.load_from_string(case["model"])
    try:
        for inputs, expected in case["data_sets"]:
            outputs = _run(model_bytes, _feed(model, inputs))
            expected = [Runner._normalize_tensor(e) if isinstance(e, onnx.TensorProto) else e for e in expected]
            Runner.assert_similar_outputs(expected, outputs, case["rtol"], case["atol"])
    except Exception as exc:  # onnxruntime's errors and numpy's AssertionError alike
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return ""


def _through_graphpress(case: dict, pipeline: str | None, tmp: Path) -> tuple[bytes, bool]:
    """The case's model after load -> (pipeline) -> save, and whether the pipeline changed it."""
    model = ir.load(case["model"])
    changed = bool(pipeline) and get(pipeline)().run(model, PassContext()).changed
    path = ir.save(model, tmp / f"{case['name']}.onnx")
    data = path.read_bytes()
    path.unlink()
    return data, changed


def check_case(case: dict, tmp: Path) -> dict[str, str] | None:
    """None if onnxruntime does not pass the case itself; else {check: reason} for each check that
    failed ('' reasons are passes), for the checks 'round-trip' and 'fold', plus 'fold-changed'
    ('yes' when fold rewrote the model)."""
    if _reproduces(case, case["model"]):
        return None
    result = {}
    for check, pipeline in (("round-trip", None), ("fold", "fold")):
        try:
            data, changed = _through_graphpress(case, pipeline, tmp)
            result[check] = _reproduces(case, data)
            if pipeline:
                result["fold-changed"] = "yes" if changed else ""
        except Exception as exc:  # a graphpress failure is a failed check, with its reason
            result[check] = f"graphpress {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return result


def run_chunk(cases: list[dict], tmp: Path) -> dict[str, dict[str, str] | None]:
    return {case["name"]: check_case(case, tmp) for case in cases}


@pytest.fixture(scope="module")
def cases():
    return node_cases() + disk_cases()


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_conformance_chunk(chunk, cases, tmp_path):
    results = run_chunk(cases[chunk::CHUNKS], tmp_path)
    failures = {name: reasons for name, reasons in results.items()
                if reasons is not None and (reasons["round-trip"] or reasons["fold"])}
    passed_by_ort = sum(r is not None for r in results.values())
    assert passed_by_ort > len(results) // 2, "onnxruntime passes too few cases: is onnxruntime broken?"
    assert not failures, "\n".join(f"{name}: {reasons}" for name, reasons in sorted(failures.items()))


def write_report() -> dict:
    """Run every case once and write benchmarks/results/conformance.json."""
    from tqdm import tqdm

    cases = node_cases() + disk_cases()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in tqdm(cases, desc="conformance cases", unit="case"):
            results[case["name"]] = check_case(case, Path(tmp))
    runnable = {n: r for n, r in results.items() if r is not None}
    report = {
        "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "cases": f"collect_testcases() node cases, plus the {', '.join(MODEL_KINDS)} model cases in the wheel",
        "cases_total": len(results),
        "model_cases": sum("/" in name for name in results),
        "onnxruntime_passes": len(runnable),
        "round_trip_passed": sum(not r["round-trip"] for r in runnable.values()),
        "fold_passed": sum(not r["fold"] for r in runnable.values()),
        "fold_changed_the_model": sum(bool(r.get("fold-changed")) for r in runnable.values()),
        "failures": {n: {k: r[k] for k in ("round-trip", "fold") if r[k]} for n, r in sorted(runnable.items())
                     if r["round-trip"] or r["fold"]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    summary = write_report()
    print({k: v for k, v in summary.items() if k != "failures"}, f"{len(summary['failures'])} failing cases")
