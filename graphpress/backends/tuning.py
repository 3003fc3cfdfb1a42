"""MetaSchedule tuning into a reusable database, measured locally or through a TVM RPC tracker.

    graphpress tune model.onnx --target x86 --trials 200 -o model.db
    graphpress compile model.onnx --target x86 --tuning-db model.db -o model-x86

The model is imported and lowered exactly as `compile` does (graphpress' channels-last layout and
fusion, `cpu.prepare`), so the tuned workloads are the functions `compile --tuning-db` schedules.
Tuning only improves on graphpress' default schedules: when tuning ends, every task's best tuned
schedule is measured again side by side with the default schedule `compile` would give it, on the
same runner, and `apply_database` uses a tuned schedule only where it measured faster; every other
function keeps its default schedule. Two pitfalls of TVM 0.27 are avoided here: its default builder
timeout (30 s) is shorter than a builder worker's start-up (its default build function imports TVM's
tensor intrinsics, 16-26 s, in every worker, and MetaSchedule starts new workers for every batch of
candidates), which makes every candidate fail and silently tunes nothing: builders here use `_build`,
which skips that import, and still get 300 s; and a run in which no candidate was measured is an
error, not an "untuned but fine" result.

Measuring on another machine: start `python -m tvm.exec.rpc_tracker --port 9190` somewhere, and on
each device `python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY`, then pass
`rpc="HOST:9190", key="KEY"`. Candidates are exported as .tar and linked on the device.

The database directory holds MetaSchedule's `database_workload.json` and
`database_tuning_record.json` plus `graphpress-tuning.json` (target, model, trial count, and per
task the default and best tuned times from that final comparison); it is
written in a staging directory and renamed into place when tuning ends. Tuning again into an
existing database for the same model and target adds to its records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from tqdm import tqdm

from ..errors import BackendError, GraphpressError
from . import targets as targets_mod
from ._tvm import summarize
from .artifact import replace_dir

INFO = "graphpress-tuning.json"
_RECORD_FILES = ("database_workload.json", "database_tuning_record.json")
BUILDER_TIMEOUT_SEC = 300
#: MetaSchedule's evolutionary search samples this many schedules per round to pick the candidates
#: from (TVM's default is 512). Graphpress budgets give each task a handful of candidates per round,
#: and sampling dominated a round: ~60 s per task with 512 on a loaded 2-core machine.
POPULATION = 128


def tune(model, target: str | None = "x86", trials: int = 64, output: str | os.PathLike = "tuning.db", *,
         arch: str | None = None, target_json: str | dict | None = None, shapes: dict | None = None,
         rpc: str | None = None, key: str | None = None, progress: bool = True) -> dict:
    """Tune `model` for `target` with up to `trials` measured candidates; return the database summary."""
    from tvm.s_tir import meta_schedule as ms

    from .tvm_compile import import_relax, input_specs, load_onnx, lower, tvm_failures

    if trials < 1:
        raise BackendError(f"--trials must be at least 1, got {trials}")
    spec = targets_mod.resolve(None if target_json is not None else target, arch, target_json)
    runner, threads = _runner(spec, rpc, key)
    proto, where, source = load_onnx(model, None)
    inputs, _ = input_specs(proto, shapes, where)
    mod = import_relax(proto, inputs, where)
    with tvm_failures(where, spec):
        mod = lower(mod, spec.tvm_target())
    tvm_target = _measuring_target(spec, threads)
    output = Path(output)
    previous = _read_info(output) if output.exists() else None
    if previous is not None:
        _check_same(previous, spec, source, output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent if output.parent.exists() else None))
    try:
        if previous is not None:
            for name in _RECORD_FILES:
                shutil.copy2(output / name, staging / name)
        builder = ms.builder.LocalBuilder(timeout_sec=BUILDER_TIMEOUT_SEC, f_build=_build)
        tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
        measured = _run_tuning(ms, mod, tvm_target, staging, trials, len(tasks), builder, runner, progress)
        if measured == 0:
            raise BackendError(f"{where}: tuning measured no candidate successfully (see {staging}/logs); "
                               "nothing was written")
        info = {"target": {"name": spec.name, "config": spec.config}, "source": source,
                "inputs": {t.name: t.shape for t in inputs},
                "trials": measured + (previous["trials"] if previous else 0),
                "measured_by": f"rpc {rpc} key {key}" if rpc else "local",
                "tasks": _compare_with_defaults(ms, tasks, tvm_target, staging, builder, runner)}
        (staging / INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(staging / "logs", ignore_errors=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _build(mod, target, _params):
    """Build one scheduled candidate in a builder worker: MetaSchedule's `default_build` without its
    import of `tvm.s_tir.tensor_intrin` (16-26 s per worker). Candidates arrive scheduled, with any
    tensorized block already replaced by its intrinsic's implementation, so building needs no
    registered intrinsic."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _measuring_target(spec: targets_mod.TargetSpec, threads: int):
    """The target MetaSchedule tunes for: CPU targets must state `num-cores` (the runtime's threads)."""
    if spec.kind != "llvm" or "num-cores" in spec.config:
        return spec.tvm_target()
    return targets_mod.TargetSpec(spec.name, {**spec.config, "num-cores": threads}).tvm_target()


def _runner(spec: targets_mod.TargetSpec, rpc: str | None, key: str | None) -> tuple:
    """The MetaSchedule runner and the measuring machine's TVM runtime thread count."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if rpc is None:
        if key is not None:
            raise BackendError("--key needs --rpc HOST:PORT")
        if not spec.runs_here():
            raise BackendError(f"candidates for {spec.name} cannot be measured on this machine; "
                               "measure on the device with --rpc HOST:PORT --key KEY")
        return ms.runner.LocalRunner(evaluator_config=evaluator), tvm_ffi.get_global_func("runtime.NumThreads")()
    host, _, port = rpc.rpartition(":")
    if not host or not port.isdigit() or key is None:
        raise BackendError(f"--rpc must be HOST:PORT of a TVM RPC tracker and needs --key, got {rpc!r}")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator), _remote_threads(config, rpc, key)


def _remote_threads(config, rpc: str, key: str) -> int:
    """Ask a device behind the tracker for its runtime thread count; fail clearly if there is none."""
    try:  # TVM's own connect retries for 60 s, logging a warning every 5 s
        socket.create_connection((config.tracker_host, config.tracker_port), timeout=10).close()
    except OSError as exc:
        raise BackendError(f"cannot reach the TVM RPC tracker at {rpc} ({exc.strerror or exc})") from exc
    try:
        summary = config.connect_tracker().summary()
    except Exception as exc:  # socket errors and TVMError from the RPC layer
        raise BackendError(f"cannot reach the TVM RPC tracker at {rpc} ({summarize(exc)})") from exc
    keys = set(summary.get("queue_info", {}))
    if key not in keys:
        raise BackendError(f"the tracker at {rpc} has no RPC server registered under key {key!r} "
                           f"(keys: {', '.join(sorted(keys)) or 'none'})")
    try:
        session = config.connect_server()
        return int(session.get_function("runtime.NumThreads")())
    except Exception as exc:  # TVMError / socket errors from the RPC session
        raise BackendError(f"the RPC server {key!r} at {rpc} does not answer ({summarize(exc)})") from exc


def _run_tuning(ms, mod, target, work_dir: Path, trials: int, tasks: int, builder, runner, progress: bool) -> int:
    """Run MetaSchedule with a progress bar; return the number of successfully measured candidates."""
    from tvm.ir.utils import derived_object

    bar = tqdm(total=trials, desc="tune", unit="trial", disable=None if progress else True)
    counts = {"measured": 0}

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            ok = sum(1 for r in runner_results if r.error_msg is None)
            counts["measured"] += ok
            bar.update(len(runner_results))
            bar.set_postfix_str(f"task {task_id}, ok {counts['measured']}")

    try:
        with _unnamed_log_handlers_detached():
            # MetaSchedule's first round gives every task `num_trials_per_iter` trials: share the budget
            ms.relax_integration.tune_relax(
                mod=mod, params={}, target=target, work_dir=str(work_dir), max_trials_global=trials,
                num_trials_per_iter=max(1, min(64, trials // max(tasks, 1))), builder=builder,
                strategy=ms.search_strategy.EvolutionarySearch(population_size=POPULATION),
                runner=runner, measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), Progress()],
            )
    except GraphpressError:
        raise
    except Exception as exc:  # MetaSchedule raises TVMError subclasses
        raise BackendError(f"MetaSchedule tuning failed ({summarize(exc)})") from exc
    finally:
        bar.close()
    return counts["measured"]


@contextlib.contextmanager
def _unnamed_log_handlers_detached():
    """Take handlers without a name off MetaSchedule's logger for the duration, then put them back.

    Each tuning run, TVM 0.27 rebuilds its loggers with `logging.config.dictConfig`, listing the
    names of the handlers already on the "tvm.s_tir.meta_schedule" logger, and fails on an unnamed
    one ("'NoneType' object has no attribute 'format'"). After a first run that logger no longer
    propagates, and pytest (like any application that does so) attaches its unnamed capture
    handlers to every non-propagating logger, so a second tuning run in a test session failed.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)


def _workload_key(database, mod) -> str:
    """The structural hash MetaSchedule's `database` keeps for the workload `mod` (a one-function
    IRModule), as written in `database_workload.json`: the key of its task in `graphpress-tuning.json`."""
    return str(database.commit_workload(mod).as_json()[0])


def _compare_with_defaults(ms, tasks, target, work_dir: Path, builder, runner) -> list[dict]:
    """Measure every task's best tuned schedule and graphpress' default schedule side by side.

    Both are built and run by the same builder and runner (interleaved, one task after the other),
    so the choice `apply_database` makes between them does not depend on when during tuning a
    record was measured. Returns, per task: its name, workload key, call count (weight), and the
    mean run time in milliseconds of the default and of the tuned schedule (None: no tuned record).
    """
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    database = ms.database.JSONDatabase(*(str(work_dir / name) for name in _RECORD_FILES), allow_missing=False)
    rows = [{"task": t.task_name, "workload": _workload_key(database, t.dispatched[0]), "weight": int(t.weight),
             "default_ms": None, "tuned_ms": None} for t in tasks]
    candidates, owners = [], []
    for i, task in enumerate(tasks):
        workload = task.dispatched[0]
        tuned = database.query_ir_module(workload, target, "main")
        # DLight's ApplyDefaultSchedule updates the module it is given in place: schedule a copy
        default = _default_schedule(tvm.IRModule(dict(workload.functions.items())), target)
        for which, scheduled in (("default", default), ("tuned", tuned)):
            if scheduled is not None:
                candidates.append(scheduled)
                owners.append((i, which))
    builds = builder.build([ms.builder.BuilderInput(m, target) for m in candidates])
    runs = [None] * len(candidates)
    ready = [j for j, b in enumerate(builds) if b.error_msg is None]
    device = str(tvm.runtime.device(target.get_target_device_type())).split(":")[0]  # "cpu", "cuda"...
    futures = runner.run([ms.runner.RunnerInput(builds[j].artifact_path, device,
                                                ArgInfo.from_prim_func(candidates[j]["main"])) for j in ready])
    for j, future in zip(ready, futures):
        result = future.result()
        if result.error_msg is None:
            runs[j] = 1e3 * sum(float(t) for t in result.run_secs) / len(result.run_secs)
    for b in builds:
        if b.artifact_path is not None:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    for (i, which), elapsed in zip(owners, runs):
        rows[i][f"{which}_ms"] = elapsed
    return rows


def _default_schedule(mod, target):
    """`mod` scheduled as `compile` schedules functions without a tuned schedule: graphpress' CPU
    rules for llvm targets, and for cuda the DLight GPU rules of TVM's own cuda pipeline."""
    if target.kind.name == "llvm":
        from .cpu import schedule

        return schedule(mod, target)
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                       dl.gpu.Fallback())(mod)


def tuned_is_faster(row: dict) -> bool:
    """Whether a task's tuned schedule measured faster than its default one (both measured)."""
    return row["tuned_ms"] is not None and row["default_ms"] is not None and row["tuned_ms"] < row["default_ms"]


def _read_info(db: Path) -> dict:
    info = db / INFO
    if not db.is_dir() or not info.is_file() or not all((db / name).is_file() for name in _RECORD_FILES):
        raise BackendError(f"{db}: not a tuning database written by `graphpress tune`")
    return json.loads(info.read_text())


def _check_target(info: dict, spec: targets_mod.TargetSpec, db: Path) -> None:
    if info["target"]["config"] != spec.config:
        raise BackendError(f"{db}: tuned for {json.dumps(info['target']['config'])}, not for "
                           f"{json.dumps(spec.config)}; its records would not apply")


def _check_same(info: dict, spec: targets_mod.TargetSpec, source: dict, db: Path) -> None:
    _check_target(info, spec, db)
    if source.get("sha256") and info["source"].get("sha256") and info["source"]["sha256"] != source["sha256"]:
        raise BackendError(f"{db}: tuned for another model ({info['source']['path']})")


def apply_database(mod, spec: targets_mod.TargetSpec, db: str | os.PathLike) -> tuple:
    """Apply a tuning database to a lowered module where it beats the default schedules.

    A function gets its task's best tuned schedule only if `tune`'s final side-by-side measurement
    found it faster than graphpress' default schedule; all others are left unscheduled here, and
    `build` gives them the default schedules. Returns the module and a summary for the metadata:
    functions scheduled by tuning, tasks tuned/kept default, and the estimated speed-up of the
    tuned tasks (measured times weighted by call counts).
    """
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    db = Path(db)
    info = _read_info(db)
    _check_target(info, spec, db)
    faster = {row["workload"] for row in info.get("tasks", []) if tuned_is_faster(row)}
    database = ms.database.JSONDatabase(*(str(db / name) for name in _RECORD_FILES), allow_missing=False)
    chosen = ms.database.MemoryDatabase()
    for line in (db / _RECORD_FILES[0]).read_text().splitlines():
        entry = json.loads(line) if line.strip() else None
        if entry is None or str(entry[0]) not in faster:
            continue
        workload = database.commit_workload(ms.database.Workload.from_json(entry).mod)
        for best in database.get_top_k(workload, 1):
            chosen.commit_tuning_record(ms.database.TuningRecord(
                best.trace, chosen.commit_workload(workload.mod), best.run_secs, best.target, best.args_info))
    with spec.tvm_target(), chosen:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    prims = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    tuned = sum(1 for f in prims if f.attrs is not None and "tirx.is_scheduled" in f.attrs)
    return mod, {"db": str(db.resolve()), "trials": info["trials"], "tuned_functions": tuned, "functions": len(prims),
                 **_estimate(info.get("tasks", []))}


def _estimate(rows: list[dict]) -> dict:
    """Tasks tuned / kept default, and sum(weight x default) / sum(weight x chosen) over the measured tasks."""
    measured = [r for r in rows if r["default_ms"] is not None]
    default = sum(r["weight"] * r["default_ms"] for r in measured)
    chosen = sum(r["weight"] * (r["tuned_ms"] if tuned_is_faster(r) else r["default_ms"]) for r in measured)
    return {"tasks": len(rows), "tasks_tuned": sum(map(tuned_is_faster, rows)),
            "estimated_speedup_of_tasks": round(default / chosen, 4) if chosen else None}
