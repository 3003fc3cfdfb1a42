"""The headline table: `graphpress compress` on every shared model vs onnxruntime's own int8 quantizer.

For each model in ../shared/models, in one run on one machine:
- float: the model as shipped, in onnxruntime (size, metric, batch-1 latency at one thread);
- onnxruntime `quantize_static` (QDQ, per-channel int8 weights, int8 activations, MinMax, the same 100
  calibration samples), the peer a user would otherwise pick;
- graphpress `compress` with a 1-point budget (fold → prune-channels → svd-split → insert-qdq, each stage
  searched, then compact), its ONNX model in onnxruntime and its compiled x86 artifact.

The search scores candidates on the first half of the evaluation data (SEARCH_SHARE); the reported metric is
on all of it, so the choice is not fitted to the numbers shown. Image models calibrate on 100 of their
evaluation images (realdata's split), so the metric is also given on the samples not used for calibration.

Latency: batch 1, one thread (onnxruntime intra-op 1, TVM_NUM_THREADS=1: both compute on the calling
thread), the four runtimes called in turn, call by call (`interleaved_latency`); the table shows the median
CPU time of the calling thread, which a machine shared with other jobs inflates far less than wall time
(both are recorded, with the load average).

    python -m benchmarks.bench_headline [--models resnet8,lenet]

Writes benchmarks/results/headline.json, headline.md and headline.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks import realdata
from benchmarks.bench_qdq import latency_ms, ort_int8, session
from graphpress.compress import compress

RESULTS = Path(__file__).resolve().parent / "results"
SEARCH_SHARE = 0.5
BUDGET = 0.01
EVAL_SIZES = {"mobilenet_v2": 1000, "mobilenet_v1": 1000, "resnet8": 2000, "lenet": 10000, "minilm": 1379}
#: interleaved latency: timed calls per runtime (after WARMUP untimed ones)
TIMED_CALLS, WARMUP = 50, 5
#: TVM's importer cannot take MiniLM as exported (see bench_backends.py); its row has no artifact
TARGETS = {"minilm": None}


def runner(runnable):
    """realdata's runner interface (inputs -> first output) over a graphpress Runnable."""
    return lambda feed: next(iter(runnable.run(feed).values()))


def interleaved_latency(runs: dict[str, Callable[[], object]], calls: int = TIMED_CALLS) -> dict:
    """{name: {thread_cpu_ms, wall_ms}} medians over `calls` calls of each function, called in turn."""
    for fn in runs.values():
        for _ in range(WARMUP):
            fn()
    cpu = {name: [] for name in runs}
    wall = {name: [] for name in runs}
    for _ in range(calls):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append((time.thread_time() - c0) * 1e3)
            wall[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"thread_cpu_ms": statistics.median(cpu[name]), "wall_ms": statistics.median(wall[name])}
            for name in runs}


def latencies(key: str, onnx_paths: dict[str, Path], artifact: Path | None) -> dict:
    """Batch-1 one-thread latency of each ONNX model in onnxruntime and of the artifact, interleaved."""
    sample = realdata.calibration_batches(key, 1, 1)[0]
    runs = {}
    for name, path in onnx_paths.items():
        sess = session(str(path), True, threads=1)
        runs[name] = lambda sess=sess: sess.run(None, sample)
    if artifact is not None:
        from graphpress import runtime
        compiled = runtime.load(artifact)
        runs["graphpress TVM"] = lambda: compiled.run(sample)
    result = interleaved_latency(runs)
    result["load_average_1_5_15_min"] = os.getloadavg()
    return result


def bench_model(key: str, workdir: Path) -> dict:
    float_path = realdata.model_path(key)
    search_limit = int(EVAL_SIZES[key] * SEARCH_SHARE)
    calibration = realdata.calibration_batches(key, 100, 10)
    entry = {"metric_name": realdata.MODELS[key].metric, "machine": realdata.machine(),
             "float": {"size_bytes": float_path.stat().st_size,
                       "metric": realdata.evaluate(key, float_path),
                       "latency_ms": latency_ms(key, str(float_path), 1, 30)}}

    ort_path = workdir / f"{key}_ort_int8.onnx"
    ort_entry = ort_int8(key, "MinMax", ort_path)
    ort_entry.update(size_bytes=ort_path.stat().st_size, metric=realdata.evaluate(key, str(ort_path)),
                     latency_ms=latency_ms(key, str(ort_path), 1, 30))
    entry["onnxruntime_int8"] = ort_entry

    out = workdir / f"{key}_compress"
    result = compress(float_path, calibration, out,
                      evaluator=lambda r: realdata.evaluate(key, runner(r), limit=search_limit),
                      budget=BUDGET, target=TARGETS.get(key, "x86"), threads=1,
                      metric_name=f"{realdata.MODELS[key].metric} (first {search_limit} samples)")
    onnx_path = Path(result["onnx"])
    gp = {"pipeline": result["pipeline"], "size_bytes": onnx_path.stat().st_size,
          "metric": realdata.evaluate(key, str(onnx_path)),
          "latency_ms": latency_ms(key, str(onnx_path), 1, 30),
          "stages": result["stages"], "search": result["search"]}
    # every model calibrates on 100 of its evaluation samples (MiniLM: the first sentence of 100 STS-B pairs)
    skip = realdata.calibration_indices(key, 100)
    entry["float"]["metric_without_calibration_samples"] = realdata.evaluate(key, float_path, skip=skip)
    gp["metric_without_calibration_samples"] = realdata.evaluate(key, str(onnx_path), skip=skip)
    compiled = [s for s in result["stages"] if s["stage"].endswith("artifact")]
    if compiled:
        gp["artifact_latency_ms"] = compiled[0]["latency_ms"]
        gp["artifact_size_bytes"] = compiled[0]["size_bytes"]
    if "compile_error" in result:
        gp["compile_error"] = result["compile_error"]
    entry["graphpress"] = gp
    entry["latency_interleaved"] = latencies(
        key, {"float": float_path, "ORT int8": ort_path, "graphpress ONNX": onnx_path},
        Path(result["artifact"]) if "artifact" in result else None)
    return entry


def table(results: dict) -> str:
    lines = ["| model | metric (in brackets: without the calibration samples) | float | ORT int8 | graphpress | "
             "size float → ORT int8 / graphpress | "
             "latency ms (1 thread, thread CPU) float / ORT int8 / graphpress ONNX / graphpress TVM |",
             "|---|---|---|---|---|---|---|"]
    for key, e in results["models"].items():
        f, o, g = e["float"], e["onnxruntime_int8"], e["graphpress"]
        timed = e.get("latency_interleaved")
        if timed:
            names = ("float", "ORT int8", "graphpress ONNX", "graphpress TVM")
            latency = " / ".join(f"{timed[n]['thread_cpu_ms']:.2f}" if n in timed else "—" for n in names)
        else:   # rows from runs before the interleaved timing: wall times
            tvm = f"{g['artifact_latency_ms']:.2f}" if "artifact_latency_ms" in g else "—"
            latency = f"{f['latency_ms']:.2f} / {o['latency_ms']:.2f} / {g['latency_ms']:.2f} / {tvm} (wall)"
        held = {name: f" ({item['metric_without_calibration_samples']:.4f})"
                if "metric_without_calibration_samples" in item else "" for name, item in (("f", f), ("g", g))}
        lines.append(
            f"| {key} | {e['metric_name']} | {f['metric']:.4f}{held['f']} | {o['metric']:.4f} | "
            f"{g['metric']:.4f}{held['g']} | "
            f"{f['size_bytes'] / 1e6:.2f} MB → {o['size_bytes'] / f['size_bytes']:.1%} / "
            f"{g['size_bytes'] / f['size_bytes']:.1%} | {latency} |")
    return "\n".join(lines)


def write_markdown(results: dict) -> None:
    """headline.md: the table and the machine each row was measured on (rows of earlier runs are kept)."""
    machines = "\n".join(f"- {key}: {e.get('machine', results['machine'])}" for key, e in results["models"].items())
    (RESULTS / "headline.md").write_text(table(results) + f"\n\nMachines:\n{machines}\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(results["models"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        e = results["models"][key]
        for label, item, color in (("float", e["float"], "k"), ("ORT int8", e["onnxruntime_int8"], "tab:orange"),
                                   ("graphpress", e["graphpress"], "tab:blue")):
            ax.scatter(item["size_bytes"] / 1e6, item["metric"], c=color, label=label, s=40)
        ax.set_xlabel("size (MB)")
        ax.set_title(f"{key}: {e['metric_name']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"metric vs size ({results['machine']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(realdata.MODELS))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = "1"   # before the TVM runtime starts its thread pool
    if not realdata.available():
        raise SystemExit(realdata.skip_reason())
    out = RESULTS / "headline.json"
    results = json.loads(out.read_text()) if out.exists() else {"models": {}}
    results.update(machine=realdata.machine(), budget=BUDGET, search_share=SEARCH_SHARE)
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            print(f"== {key}", flush=True)
            results["models"][key] = bench_model(key, Path(tmp))
            RESULTS.mkdir(exist_ok=True)
            out.write_text(json.dumps(results, indent=1, default=str))
            write_markdown(results)
            plot(results, RESULTS / "headline.png")
    print(table(results))


if __name__ == "__main__":
    main()
