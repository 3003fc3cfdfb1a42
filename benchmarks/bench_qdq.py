"""insert-qdq vs onnxruntime's quantize_static on every shared model, with its real data.

For each model: the float metric; graphpress int8 for each observer (and recipes); onnxruntime
`quantize_static` (QDQ, per-channel int8 weights, int8 activations) with MinMax / Percentile / Entropy;
all calibrated on the same 100 samples (MODELS.md split, `realdata.calibration_batches`). Every int8
model is scored twice: in onnxruntime as shipped (its fused int8 kernels; on x86 without VNNI they
add uint8 x int8 pairs in int16 and can saturate) and with graph optimizations off (the exact QDQ
arithmetic). Also: file sizes, and onnxruntime latency (one thread) float vs int8 at batch 1 and 32.

    python -m benchmarks.bench_qdq [--models resnet8,lenet] [--limit N] [--no-latency]

Writes benchmarks/results/qdq.json (merged per model, so subsets can be re-run) and qdq.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import realdata
from graphpress.ir import load, save
from graphpress.passes import PassManager

RESULTS = Path(__file__).resolve().parent / "results"
OBSERVERS = ("minmax", "moving-average", "percentile", "entropy", "mse")
#: per model: the graphpress pipeline for an observer, and extra recipes worth reporting (label -> pipeline)
CNN = "insert-qdq(method={method})"
#: MiniLM: only the Linear MatMuls (and the embedding tables) are int8; LayerNorm, Softmax, GELU and the
#: attention products of two activations stay float; SmoothQuant flattens the LayerNorm outlier channels
PIPELINES = {
    "minilm": "smooth-quant,insert-qdq(method={method},ops=[MatMul,Gather],outputs=false,activation-matmul=false)",
}
RECIPES = {
    "mobilenet_v2": {"mse+reduce-range": "insert-qdq(method=mse,reduce-range=true)"},
    "mobilenet_v1": {"mse+reduce-range": "insert-qdq(method=mse,reduce-range=true)"},
    "resnet8": {"mse+reduce-range": "insert-qdq(method=mse,reduce-range=true)"},
    "lenet": {},
    "minilm": {"minmax no smooth-quant": "insert-qdq(ops=[MatMul,Gather])",
               "smooth-quant alpha=0.75": "smooth-quant(alpha=0.75),insert-qdq(ops=[MatMul,Gather],"
                                                  "outputs=false,activation-matmul=false)"},
}
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
#: MiniLM is scored on 2758 sentences per model: fewer variants and no exact-QDQ rescoring keep the run
#: within the time this machine allows (noted in the results)
LIGHT = {"minilm": {"observers": ("minmax", "percentile", "mse"), "ort": ("MinMax", "Percentile"),
                    "exact": False}}
CALIBRATION_SAMPLES = 100


def session(path_or_proto, optimized: bool = True, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def metrics(key: str, path: str, limit: int | None) -> dict:
    """The model's metric with onnxruntime's int8 kernels and (unless LIGHT) with exact QDQ arithmetic."""
    result = {}
    scorings = (("metric", True), ("metric_qdq_exact", False))
    for label, optimized in scorings[:1] if not LIGHT.get(key, {}).get("exact", True) else scorings:
        sess = session(path, optimized, threads=0)
        result[label] = realdata.evaluate(key, lambda feed, s=sess: s.run(None, feed)[0], limit=limit)
    return result


def latency_ms(key: str, path: str, batch: int, repeats: int) -> float:
    """Median onnxruntime latency (one thread, graph optimizations on) for one batch."""
    sample = realdata.calibration_batches(key, n=batch, batch_size=batch)[0]
    if len(next(iter(sample.values()))) < batch:  # fewer calibration samples than the batch: tile
        sample = {k: np.concatenate([v] * -(-batch // len(v)))[:batch] for k, v in sample.items()}
    sess = session(path, True, threads=1)
    sess.run(None, sample)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, sample)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def graphpress_int8(key: str, pipeline: str, out: Path) -> dict:
    model = load(realdata.model_path(key))
    start = time.perf_counter()
    PassManager(pipeline).run(model, calibration=realdata.calibration_batches(key, CALIBRATION_SAMPLES, 10))
    seconds = time.perf_counter() - start
    save(model, out)
    return {"pipeline": pipeline, "quantize_seconds": round(seconds, 1)}


def ort_int8(key: str, method: str, out: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(realdata.calibration_batches(key, CALIBRATION_SAMPLES, 1))

        def get_next(self):
            return next(self.batches, None)

    source, note = ort_source(key, out.parent)
    start = time.perf_counter()
    quantize_static(source, str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return {"pipeline": f"quantize_static(QDQ, per_channel, QInt8/QInt8, {method}){note}",
            "quantize_seconds": round(time.perf_counter() - start, 1)}


def ort_source(key: str, tmp: Path) -> tuple[str, str]:
    """The model file to give onnxruntime's quantizer: below opset 13 its per-channel QDQ output is
    invalid (DequantizeLinear gets `axis`), so the model is converted to opset 13 first, as a user would."""
    import onnx
    import onnx.version_converter
    path = realdata.model_path(key)
    proto = onnx.load(path)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 13:
        return str(path), ""
    converted = tmp / f"{key}_opset13.onnx"
    onnx.save(onnx.version_converter.convert_version(proto, 13), converted)
    return str(converted), f" after converting opset {opset} -> 13"


def ort_dynamic(key: str, out: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(realdata.model_path(key)), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return {"pipeline": "quantize_dynamic(QInt8 weights, dynamic activations)", "quantize_seconds": None}


def bench_model(key: str, limit: int | None, with_latency: bool, tmp: Path, only: set[str] | None = None) -> dict:
    float_path = str(realdata.model_path(key))
    entry = {"metric_name": realdata.MODELS[key].metric, "float": {"size_bytes": Path(float_path).stat().st_size,
                                                                  **metrics(key, float_path, limit)},
             "graphpress": {}, "onnxruntime": {}}
    template = PIPELINES.get(key, CNN)
    light = LIGHT.get(key, {})
    runs = [("graphpress", name, lambda out, m=name: graphpress_int8(key, template.format(method=m), out))
            for name in light.get("observers", OBSERVERS)]
    runs += [("graphpress", label, lambda out, p=p: graphpress_int8(key, p, out)) for label, p in RECIPES[key].items()]
    runs += [("onnxruntime", name, lambda out, m=name: ort_int8(key, m, out)) for name in light.get("ort", ORT_METHODS)]
    if key == "minilm":
        runs.append(("onnxruntime", "dynamic", lambda out: ort_dynamic(key, out)))
    if only:
        runs = [run for run in runs if run[1] in only]
    for tool, name, make in runs:
        out = tmp / f"{key}_{tool}_{name}.onnx"
        print(f"[{key}] {tool} {name} ...", flush=True)
        try:
            result = make(out)
            result["size_bytes"] = out.stat().st_size
            result["size_ratio"] = round(entry["float"]["size_bytes"] / result["size_bytes"], 3)
            result.update(metrics(key, str(out), limit))
        except Exception as exc:  # a method that fails is a result too
            entry[tool][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"    failed: {entry[tool][name]['error']}", flush=True)
            continue
        if with_latency and (name in ("minmax", "MinMax", "dynamic") or only):
            result["latency_ms"] = {f"batch{b}": latency_ms(key, str(out), b, r) for b, r in ((1, 30), (32, 5))}
        entry[tool][name] = result
        print(f"    {json.dumps({k: v for k, v in result.items() if k != 'pipeline'})}", flush=True)
    if with_latency:
        entry["float"]["latency_ms"] = {f"batch{b}": latency_ms(key, float_path, b, r) for b, r in ((1, 30), (32, 5))}
    entry["summary"] = summarize(entry)
    return entry


def summarize(entry: dict) -> dict:
    """Best graphpress vs best onnxruntime, on each scoring, as differences and ratios."""
    summary = {}
    for metric in ("metric", "metric_qdq_exact"):
        best = {tool: max(((r[metric], name) for name, r in entry[tool].items() if metric in r), default=None)
                for tool in ("graphpress", "onnxruntime")}
        if best["graphpress"] and best["onnxruntime"]:
            summary[metric] = {"graphpress_best": best["graphpress"], "onnxruntime_best": best["onnxruntime"],
                               "difference": round(best["graphpress"][0] - best["onnxruntime"][0], 4)}
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in results["models"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        entry = results["models"][key]
        labels, values, colors = [], [], []
        for tool, color in (("graphpress", "tab:blue"), ("onnxruntime", "tab:orange")):
            for name, r in entry[tool].items():
                if "metric" in r:
                    labels.append(name)
                    values.append(r["metric"])
                    colors.append(color)
        ax.barh(range(len(values)), values, color=colors)
        ax.axvline(entry["float"]["metric"], color="k", linestyle="--", label="float")
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        low = min(values + [entry["float"]["metric"]])
        ax.set_xlim(low - 0.05, max(values + [entry["float"]["metric"]]) + 0.01)
        ax.set_title(f"{key} ({entry['metric_name']})", fontsize=9)
    fig.suptitle("int8: graphpress (blue) vs onnxruntime quantize_static (orange); dashed: float", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(realdata.MODELS))
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "qdq.json"))
    parser.add_argument("--only", default=None, help="comma-separated method/recipe labels to run (default: all)")
    args = parser.parse_args()
    if not realdata.available():
        raise SystemExit(realdata.skip_reason())
    out = Path(args.output)
    results = json.loads(out.read_text()) if out.exists() else {"models": {}}
    results.update({"machine": realdata.machine(), "onnxruntime": ort.__version__,
                    "calibration": f"{CALIBRATION_SAMPLES} samples, MODELS.md split (realdata.calibration_batches)",
                    "evaluation_limit": args.limit})
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            only = set(args.only.split(",")) if args.only else None
            results["models"][key] = bench_model(key, args.limit, not args.no_latency, Path(tmp), only)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
