"""prune-channels on the real models: metric vs MACs kept, with and without reconstruction, ORT latency.

For ResNet-8 (CIFAR-10 top-1 on 2000 test images), MobileNetV2 (ImageNet-sample top-1 on 1000 images)
and the MNIST LeNet (accuracy on 10000 digits), every MACs target is pruned these ways in one process:
- `l1`: group L1 magnitude, no reconstruction. This is Torch-Pruning's default (MagnitudeImportance over
  DepGraph groups), the peer a user would reach for; Torch-Pruning itself only takes PyTorch modules,
  so it is reproduced here on the same dependency groups.
- `l1+refit`: the same channels, consumers re-fitted by least squares on calibration data;
- `reconstruction+refit`: channels chosen by the re-fit-aware greedy criterion, then re-fitted;
- `blocks`: the same, but only channels inside blocks (`scope=blocks`: MobileNetV2's expanded channels,
  a ResNet block's inner ones; residual streams and linear bottlenecks stay whole);
- `blocks+alloc`: as `blocks`, with the target spread by the consumers' post-refit error curves
  (`allocate=refit-error`) instead of one ratio for all groups;
- `blocks+alloc+downstream`: as `blocks+alloc`, also re-fitting every later layer (`refit=downstream`)
  with ridge strengths chosen on held-out calibration batches (`ridge=none`);
- `blocks+round8`: as `blocks`, kept channel counts multiples of 8 (`round-to=8`), for the latency;
- `...+flip`, `...+flip+shift`: also calibrating on the mirrored (and 2-pixel shifted) copies of the calibration images
  (`augment=[flip]`: 2 images per image, `[flip,shift]`: 6; a mirrored digit is no natural MNIST input);
- `blocks+heldout...`: as `blocks+alloc...`, the error curves measured on calibration batches left out of
  the fit (`allocate=held-out-error`);
- `...@300`, `...@500`: calibrating on 300 / 500 samples instead of 100 (the metric then on the others).
Calibration: benchmarks/realdata.py's split (100 samples: every 20th CIFAR image from index 1, every 10th
ImageNet image from index 5, every 100th MNIST digit from index 3; `--calibration N` takes more, see
`realdata.calibration_indices`). The metric (`metric`, and the float model's `float_metric`) is on the
other samples only: a re-fit fitted on an image reproduces the original model there better than elsewhere
(MobileNetV2: 0.683 on all 1000 images vs 0.663 on the 900 others). `metric_all_samples` keeps the
earlier protocol's figure (calibration samples included) for comparison.
Latency: onnxruntime, all graph optimizations, one thread, batch 1, median thread CPU time (and wall time)
of interleaved rounds of the original and the pruned model; `speedup` is the thread CPU ratio (the
1-minute load average is recorded beside it).

    .venv/bin/python -m benchmarks.bench_prune [--models resnet8,lenet] [--quick]

Each model writes benchmarks/results/prune_<key>.json (models can run in parallel processes); the combined
benchmarks/results/prune.json and prune.png are written from whatever per-model files exist.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

from benchmarks import realdata
from benchmarks.bench_svd import latency_ms
from graphpress import ir
from graphpress.ir.cost import macs
from graphpress.passes import PassContext, PassManager

RESULTS = Path(__file__).resolve().parent / "results"
_BLOCKS = "criterion=reconstruction,scope=blocks,allocate=refit-error"
_DOWNSTREAM = f"{_BLOCKS},refit=downstream,ridge=none"
_HELD = "criterion=reconstruction,scope=blocks,allocate=held-out-error"
#: method -> prune-channels options; a name ending in @N calibrates on N samples instead of the case's count
METHODS = {
    "l1": "criterion=l1,reconstruct=false",
    "l1+refit": "criterion=l1",
    "reconstruction+refit": "criterion=reconstruction",
    "blocks": "criterion=reconstruction,scope=blocks",
    "blocks+alloc": _BLOCKS,
    "blocks+alloc+downstream": _DOWNSTREAM,
    "blocks+round8": "criterion=reconstruction,scope=blocks,round-to=8",
    "blocks+alloc+flip": f"{_BLOCKS},augment=[flip]",
    "blocks+alloc+flip+shift": f"{_BLOCKS},augment=[flip,shift]",
    "blocks+alloc+downstream+flip+shift": f"{_DOWNSTREAM},augment=[flip,shift]",
    "blocks+alloc@300": _BLOCKS,
    "blocks+alloc+flip@300": f"{_BLOCKS},augment=[flip]",
    "blocks+alloc+flip@500": f"{_BLOCKS},augment=[flip]",
    "blocks+heldout": _HELD,
    "blocks+heldout+flip": f"{_HELD},augment=[flip]",
    "blocks+heldout+downstream": f"{_HELD},refit=downstream,ridge=none",
    "blocks+heldout@300": _HELD,
    "blocks+alloc+flip+shift@300": f"{_BLOCKS},augment=[flip,shift]",
    "blocks+alloc+downstream@300": _DOWNSTREAM,
}
CASES = {
    "resnet8": {"targets": [0.9, 0.8, 0.7, 0.6], "calibration": (100, 10)},
    "mobilenet_v2": {"targets": [0.8], "calibration": (100, 10)},  # the goal point only: re-fits are slow here
    "lenet": {"targets": [0.8, 0.6, 0.4, 0.2], "calibration": (100, 25)},
}
#: the issue's goals: at this share of the MACs, within this many points of the float metric
GOALS = {"resnet8": (0.7, 0.015), "mobilenet_v2": (0.8, 0.02)}


def _samples(method: str, default: int) -> int:
    return int(method.rpartition("@")[2]) if "@" in method else default


def run_case(key: str, quick: bool, methods: list[str], samples: int | None = None,
             save: Callable[[dict], None] = lambda result: None) -> dict:
    """Every target x method of one model; `save(result)` after each run (a long run is never lost)."""
    case = CASES[key]
    base = ir.load(realdata.model_path(key))
    count, batch = case["calibration"]
    count = samples or (count // 2 if quick else count)
    limit = 300 if quick else None
    feed = realdata.calibration_batches(key, 1, 1)[0]
    base_macs = macs(base).total
    floats: dict[int, float] = {}

    def float_metric(n: int) -> float:
        if n not in floats:
            floats[n] = realdata.evaluate(key, base, limit=limit, skip=realdata.calibration_indices(key, n))
        return floats[n]

    result = {"model": realdata.MODELS[key].file, "metric_name": realdata.MODELS[key].metric,
              "float_metric": float_metric(count),
              "float_metric_all_samples": realdata.evaluate(key, base, limit=limit), "macs": base_macs,
              "params": base.parameter_count(), "calibration_samples": count,
              "calibration": f"realdata.calibration_indices({key!r}, n) in batches of {batch}; n = "
                             f"{count} unless the method name ends in @n",
              "evaluated_samples": f"{'the first 300' if quick else 'all'} but the calibration samples", "runs": []}
    for target in case["targets"]:
        for method in methods:
            options, n = METHODS[method], _samples(method, count)
            ctx = PassContext(calibration=realdata.calibration_batches(key, n, batch))
            start = time.perf_counter()
            pruned = PassManager(f"prune-channels(target-macs={target},{options})").run(base.copy(), ctx)
            seconds = time.perf_counter() - start
            metric = realdata.evaluate(key, pruned, limit=limit, skip=realdata.calibration_indices(key, n))
            original_ms, pruned_ms = latency_ms([base.to_onnx(), pruned.to_onnx()], feed)
            run = {"target_macs": target, "method": method, "calibration_samples": n,
                   "pipeline": f"prune-channels(target-macs={target},{options})",
                   "macs_kept": macs(pruned).total / base_macs,
                   "params_kept": pruned.parameter_count() / result["params"],
                   "metric": metric, "float_metric": float_metric(n),
                   "metric_drop_points": 100 * (float_metric(n) - metric),
                   "metric_all_samples": realdata.evaluate(key, pruned, limit=limit),
                   "prune_seconds": seconds, "latency_cpu_ms": pruned_ms["cpu_ms"],
                   "original_latency_cpu_ms": original_ms["cpu_ms"], "latency_wall_ms": pruned_ms["wall_ms"],
                   "original_latency_wall_ms": original_ms["wall_ms"],
                   "speedup": original_ms["cpu_ms"] / pruned_ms["cpu_ms"], "loadavg_1min": os.getloadavg()[0]}
            print(json.dumps({"model": key, **run}), flush=True)
            result["runs"].append(run)
            save(result)
    return result


def _earlier(run: dict) -> dict:
    """A run kept from an earlier invocation; one from before the held-out protocol has only the figure on
    all samples (calibration included), so its `metric` is unknown (None)."""
    if "metric_all_samples" not in run:
        run = {**run, "metric_all_samples": run["metric"], "metric": None, "metric_drop_points": None}
    return {**run, "earlier_run": True}


def _set_goal(key: str, result: dict) -> None:
    """Record whether the best run at the issue's goal point is within the allowed drop."""
    if key not in GOALS:
        return
    share, points = GOALS[key]
    at_goal = [r for r in result["runs"] if r["target_macs"] == share and r["metric"] is not None]
    if not at_goal:
        return
    best = min(at_goal, key=lambda r: r["metric_drop_points"])
    result["goal"] = {"macs_kept": share, "max_drop_points": 100 * points, "best_method": best["method"],
                      "best_drop_points": best["metric_drop_points"], "met": best["metric_drop_points"] <= 100 * points}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (key, result) in zip(axes[0], results.items()):
        measured = [r for r in result["runs"] if r["metric"] is not None]
        ylabel = f"{result['metric_name']} - float's, points (samples not calibrated on)"
        if len({r["target_macs"] for r in measured}) == 1:  # one target: a bar per method
            ax.barh([r["method"] for r in measured], [-r["metric_drop_points"] for r in measured])
            if key in GOALS:
                ax.axvline(-100 * GOALS[key][1], color="red", linestyle="--", label="goal")
            ax.set_title(f"{key}: {result['metric_name']} at {measured[0]['target_macs']:.0%} of MACs")
            ax.set_xlabel(ylabel)
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=8)
            continue
        for i, method in enumerate(METHODS):
            runs = sorted((r for r in measured if r["method"] == method), key=lambda r: r["macs_kept"])
            if runs:
                ax.plot([r["macs_kept"] for r in runs], [-r["metric_drop_points"] for r in runs], marker="o",
                        linestyle="-" if i < 10 else "--", label=method)
        ax.axhline(0, color="gray", linestyle="--", label="float")
        if key in GOALS:
            share, points = GOALS[key]
            ax.plot([share], [-100 * points], marker="*", color="red", markersize=12, label="goal")
        ax.set_title(f"{key}: {result['metric_name']} vs MACs kept")
        ax.set_xlabel("share of MACs kept")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"prune-channels, no retraining ({realdata.machine()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="methods to run; their runs replace the same ones in an existing result file")
    parser.add_argument("--quick", action="store_true", help="half the calibration data, 300 evaluation samples")
    parser.add_argument("--calibration", type=int, help="calibration samples (default 100), never evaluated")
    args = parser.parse_args()
    if not realdata.available():
        raise SystemExit(realdata.skip_reason())
    RESULTS.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    for key in args.models.split(","):
        path = RESULTS / f"prune_{key}.json"
        run_case(key, args.quick, methods, args.calibration, lambda result: _save(path, result, methods))
    combined = {key: json.loads((RESULTS / f"prune_{key}.json").read_text())
                for key in CASES if (RESULTS / f"prune_{key}.json").exists()}
    (RESULTS / "prune.json").write_text(json.dumps(combined, indent=1))
    plot(combined, RESULTS / "prune.png")


def _save(path: Path, result: dict, methods: list[str]) -> None:
    """Write one model's results: this invocation's runs, and the file's runs of other methods (from
    earlier invocations, maybe on another host or load, or from one running beside this one)."""
    earlier = json.loads(path.read_text())["runs"] if path.exists() else []
    kept = [_earlier(r) for r in earlier if r["method"] not in methods]
    order = list(METHODS)
    runs = sorted(kept + result["runs"],  # a method another (newer) invocation added goes last
                  key=lambda r: (-r["target_macs"], order.index(r["method"]) if r["method"] in order else len(order)))
    result = {"machine": realdata.machine(), **result, "runs": runs}
    _set_goal(path.stem.removeprefix("prune_"), result)
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
