"""`compress`: fold → prune-channels → svd-split → insert-qdq → compact → compile, measured after every stage.

Each compression stage is searched (see `search.py`) for its most aggressive setting whose metric stays
within `budget` of the float model's; a stage that cannot stay within budget is skipped, and says so.
`compact` (on by default) then shortens internal tensor/node names and drops intermediate shapes: the
outputs are unchanged, graph input/output names too, and the file is smaller (converted TF models
carry names of ~100 characters on every edge).
The result is a directory: `model.onnx`, the compiled `artifact/`, `report.json`, `report.html` and the
plots.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import BackendError, GraphpressError
from ..ir import Model, load, save
from ..machine import describe
from ..summary import summarize
from ..ir.execute import model_size_bytes
from ..passes import PassManager
from . import report
from .evaluate import Agreement, Evaluator, Runnable
from .measure import StageMeasure, latency_ms, measure_model
from .search import Knob, SearchLog, Trial, most_aggressive_within, refined, smallest_within

DEFAULT_KNOBS = (
    Knob("prune", tuple(f"prune-channels(ratio={r})" for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)), 0.3),
    # plain SVD: whitened factors carry large weights on low-variance inputs and quantize badly (issue 5 note)
    Knob("svd", tuple(f"svd-split(energy={e},method=plain)" for e in (0.995, 0.99, 0.98, 0.95, 0.9)), 0.5),
    # four recipes, all tried, the smallest within budget kept (the better metric among equal sizes): the
    # transformer one (only Linear MatMuls and embedding tables int8, SmoothQuant first; measured on MiniLM),
    # layers kept float by sensitivity, all int8 with min/max or MSE-chosen activation ranges
    Knob("int8", ("smooth-quant(alpha=0.75),insert-qdq(ops=[MatMul,Gather],outputs=false,activation-matmul=false)",
                  "insert-qdq(keep-float=auto)", "insert-qdq", "insert-qdq(method=mse)"), 1.0, ordered=False),
    # then weights to 4 bits, least output noise per byte saved first (scored on 6 calibration batches: 2
    # ranked MobileNetV2's layers noticeably worse), GPTQ-rounded
    Knob("int4", tuple(f"insert-qdq(int4-share={share},rounding=gptq,sensitivity-batches=6)"
                       for share in (0.25, 0.5, 0.65, 0.8, 0.9, 0.95)), 1.0, refines="int8"),
)
#: every HOLDOUT_EVERY-th calibration batch is held out for the agreement metric when no --eval is given
HOLDOUT_EVERY = 4


def compress(model, calibration: Sequence[dict[str, np.ndarray]], output_dir: str | Path,
             evaluator: Evaluator | None = None, budget: float = 0.01, target: str | None = "x86",
             threads: int = 1, knobs: Sequence[Knob] = DEFAULT_KNOBS, metric_name: str = "metric (--eval)",
             log: Callable[[str], None] = lambda line: print(line, file=sys.stderr), compact: bool = True) -> dict:
    """Compress `model` within `budget` (absolute metric drop), write OUT/, return the report dict."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    original = load(model)
    calibration = list(calibration)
    if not calibration:
        raise GraphpressError("compress needs calibration data (--calib)")
    if evaluator is None:
        held_out = calibration[HOLDOUT_EVERY - 1::HOLDOUT_EVERY]
        calibration = [b for i, b in enumerate(calibration) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
        evaluator = Agreement.against(original, held_out)
        metric_name = f"{evaluator.kind} with float ({sum(len(next(iter(b.values()))) for b in held_out)} held-out samples)"

    stages = [measure_model("float", "", original, evaluator, threads=threads)]
    floor = stages[0].metric - budget
    log(f"float: {metric_name} {stages[0].metric:.4f}; budget {budget:.4f} → floor {floor:.4f}")

    pipeline = ["fold"]
    start = time.perf_counter()
    current = _apply(original, "fold", calibration)
    stages.append(measure_model("fold", "fold", current, evaluator, time.perf_counter() - start, threads))

    search = SearchLog()
    last_stage, last_input = "", current   # the stage a refining knob may re-run, and its input model
    for knob in knobs:
        start = time.perf_counter()
        stage_floor = stages[0].metric - budget * knob.budget_share
        if knob.refines:
            if knob.refines != last_stage:
                log(f"{knob.stage}: stage {knob.refines} was not the last one applied; nothing to refine")
                continue
            settings = tuple(refined(pipeline[-1], s) for s in knob.settings)
            chosen = _search_knob(knob, settings, last_input, calibration, evaluator, stage_floor, search, log,
                                  must_beat=model_size_bytes(current))
            if chosen is not None:
                pipeline.pop()
        else:
            chosen = _search_knob(knob, knob.settings, current, calibration, evaluator, stage_floor, search, log,
                                  must_beat=model_size_bytes(current))
        if chosen is None:
            log(f"{knob.stage}: no setting both stays within the floor {stage_floor:.4f} and makes the model "
                "smaller; stage skipped")
            continue
        if not knob.refines:
            last_stage, last_input = knob.stage, current
        setting, current, metric = chosen
        pipeline.append(setting)
        stages.append(measure_model(knob.stage, ",".join(pipeline), current, None,
                                    time.perf_counter() - start, threads, metric=metric))

    if compact:   # computes the same outputs (tests/test_cleanup.py): the metric carries over
        start = time.perf_counter()
        current = _apply(current, "compact", calibration)
        pipeline.append("compact")
        stages.append(measure_model("compact", ",".join(pipeline), current, None, time.perf_counter() - start,
                                    threads, metric=stages[-1].metric))
    final_path = save(current, output_dir / "model.onnx")
    result = {
        "model": str(model) if not isinstance(model, Model) else "model",
        "pipeline": ",".join(pipeline),
        "metric_name": metric_name,
        "float_metric": stages[0].metric,
        "budget": budget,
        "metric_floor": floor,
        "threads": threads,
        "machine": describe(),
        "onnx": str(final_path),
    }
    if target:
        try:
            stages.append(_compile_stage(current, target, output_dir / "artifact", result["pipeline"], evaluator,
                                         threads))
            result["artifact"] = str(output_dir / "artifact")
        except BackendError as exc:
            # the compressed ONNX model is still the main result: report why there is no artifact
            result["compile_error"] = str(exc)
            log(f"compile for {target} failed: {exc}")
    result["stages"] = [s.as_dict() for s in stages]
    result["search"] = {"trials": [asdict(t) for t in search.trials],
                        "pareto_front": [asdict(t) for t in search.pareto_front()]}
    plots = report.plot(result, output_dir)
    result["plots"] = {name: str(p) for name, p in plots.items()}
    report.write_json(result, output_dir / "report.json")
    report.write_html(result, plots, output_dir / "report.html")
    return result


def _apply(model: Model, pipeline: str, calibration) -> Model:
    candidate = model.copy()
    PassManager(pipeline).run(candidate, calibration=calibration)
    return candidate


def _search_knob(knob: Knob, settings: tuple[str, ...], current: Model, calibration, evaluator: Evaluator,
                 floor: float, search: SearchLog, log, must_beat: int) -> tuple[str, Model, float] | None:
    """The chosen setting within `floor` (most aggressive, or smallest for an unordered knob), with its
    model and metric; None if none is, or if it is not smaller than `must_beat` bytes."""
    from .evaluate import OnnxRunnable
    passing: dict[str, tuple[Model, float]] = {}  # only candidates within the floor are kept in memory
    sizes: dict[str, int] = {}

    def score(setting: str) -> float:
        candidate = _apply(current, setting, calibration)
        metric = evaluator(OnnxRunnable(candidate))
        if metric >= floor:
            passing[setting] = (candidate, metric)
        size = sizes[setting] = model_size_bytes(candidate)
        search.trials.append(Trial(knob.stage, setting, size, metric))
        log(f"{knob.stage}: {setting}: metric {metric:.4f}, {size / 1e6:.3f} MB, "
            f"{'within' if metric >= floor else 'below'} the stage floor {floor:.4f}")
        return metric

    if knob.ordered:
        chosen = most_aggressive_within(settings, score, floor)
    else:
        chosen = smallest_within(settings, score, sizes.__getitem__, floor)
    if chosen is None:
        return None
    if sizes[chosen] >= must_beat:
        log(f"{knob.stage}: {chosen} is not smaller than the model so far ({sizes[chosen] / 1e6:.3f} MB vs "
            f"{must_beat / 1e6:.3f} MB)")
        return None
    for trial in search.trials:
        if trial.stage == knob.stage and trial.pipeline == chosen:
            trial.accepted = True
    return chosen, *passing[chosen]


class CompiledRunnable:
    """A compiled artifact behind the `Runnable` interface; batches are fed one sample at a time
    because the artifact's shapes are fixed at compile time (batch 1)."""

    def __init__(self, path: Path):
        from .. import runtime
        self.model = runtime.load(path)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(inputs.values())))
        rows = [self.model.run({k: v[i:i + 1] for k, v in inputs.items()}) for i in range(batch)]
        return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


def _compile_stage(model: Model, target: str, path: Path, pipeline: str, evaluator: Evaluator,
                   threads: int) -> StageMeasure:
    import os
    from ..backends import compile as compile_model
    from ..ir import random_inputs
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    start = time.perf_counter()
    compile_model(model, target, path, pipeline=None)
    seconds = time.perf_counter() - start
    runnable: Runnable = CompiledRunnable(path)
    sample = {k: v[:1] for k, v in random_inputs(model, seed=1).items()}
    static = summarize(model, size_bytes=0)  # the model's own facts; the size is the artifact's
    return StageMeasure(f"{target} artifact", pipeline, _tree_size(path), static.parameters, static.total_macs,
                        static.nodes, latency_ms(runnable, sample), evaluator(runnable), seconds)


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

