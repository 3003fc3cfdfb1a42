"""svd-split on the real models: metric vs parameters kept, plain vs data-aware SVD, onnxruntime latency.

For MiniLM (STS-B Spearman), MobileNetV2 (ImageNet-sample top-1) and the MNIST LeNet (accuracy), every
parameter budget is run three ways in the same process:
- `plain`: truncated SVD of the weights (what a user gets from a plain low-rank tool; the peer),
- `whitened`: SVD of the weights whitened by their input covariance on calibration data (SVD-LLM style),
- `whitened+measured`: the same, with the budget spread by measured per-layer sensitivity.
Calibration follows benchmarks/realdata.py (every 10th ImageNet image, every 100th MNIST digit; MiniLM:
the first sentence of every 13th STS-B test pair, there being no dev split, cut to its attention
mask); the metric is on all evaluation samples. Latency: onnxruntime, all graph
optimizations, one thread, batch 1, median of interleaved runs of the original and the split model.
The light VGG-19 of the onnx wheel is checked against the literature's "4096×4096 VGG-16 FC loses 83%
of its parameters at 95% energy": its weights are constant-filled, so its spectrum is degenerate.

    .venv/bin/python -m benchmarks.bench_svd [--models minilm,lenet] [--quick]

Each model writes benchmarks/results/svd_<key>.json (so models can run in parallel processes); the
combined benchmarks/results/svd.json and svd.png are written from whatever per-model files exist.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks import realdata
from graphpress import ir
from graphpress.passes import PassContext, PassManager

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "plain": "method=plain",
    "whitened": "method=whitened",
    "whitened+measured": "method=whitened,sensitivity=measured",
}
#: per model: the budgets (share of the factorable weights' parameters kept), the one budget also run with
#: measured sensitivity (it probes every layer: slow), calibration (samples, batch)
CASES = {
    "minilm": {"targets": [0.75, 0.8, 0.7], "measured_at": 0.75, "calibration": (100, 1), "ops": "[MatMul]"},
    "mobilenet_v2": {"targets": [0.9, 0.8, 0.7], "measured_at": 0.8, "calibration": (100, 10),
                     "ops": "[Conv,Gemm,MatMul]"},
    "lenet": {"targets": [0.4, 0.2, 0.1, 0.05], "measured_at": 0.1, "calibration": (100, 25),
              "ops": "[Conv,Gemm,MatMul]"},
}
GOAL = {"minilm": {"params_kept": 0.75, "metric_within": 0.005}}


def latency_ms(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], rounds: int = 30) -> list[float]:
    """Median single-thread latency of each model on `feed`, measured in interleaved rounds."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for m in models]
    for sess in sessions:
        for _ in range(3):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for sess, record in zip(sessions, times):
            start = time.perf_counter()
            sess.run(None, feed)
            record.append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]


def unpadded(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """MiniLM calibration sentences (batch 1) cut to their attention mask: padded positions never reach the
    masked-mean embedding, so their activations would only blur the input statistics."""
    cut = []
    for batch in batches:
        length = int(batch["attention_mask"].sum())
        cut.append({name: value[:, :length] for name, value in batch.items()})
    return cut


def run_case(key: str, quick: bool, save) -> dict:
    """Every budget and method for one model; `save(result)` is called after each run (partial results)."""
    case = CASES[key]
    base = ir.load(realdata.model_path(key))
    count, batch = case["calibration"]
    calibration = realdata.calibration_batches(key, count // 2 if quick else count, batch)
    if key == "minilm":
        calibration = unpadded(calibration)
    limit = 300 if quick else None
    feed = realdata.calibration_batches(key, 1, 1)[0]
    result = {"model": realdata.MODELS[key].file, "metric_name": realdata.MODELS[key].metric,
              "float_metric": realdata.evaluate(key, base, limit=limit), "params": base.parameter_count(),
              "calibration_samples": len(calibration) * batch, "eval_limit": limit, "runs": []}
    print(f"{key}: float {result['metric_name']} {result['float_metric']:.4f}", flush=True)
    targets = [case["measured_at"]] if quick else case["targets"]
    runs = [(method, f"svd-split(target-params={t},budget-of=layers,ops={case['ops']},{options})")
            for t in targets for method, options in METHODS.items()
            if method != "whitened+measured" or t == case["measured_at"]]
    runs += [(method, f"svd-split(energy=0.95,ops={case['ops']},{METHODS[method]})") for method in ("plain", "whitened")]
    for method, pipeline in runs:
        model = base.copy()
        ctx = PassContext(calibration=calibration)
        start = time.perf_counter()
        PassManager(pipeline).run(model, ctx)
        seconds = time.perf_counter() - start
        report = ctx.reports["svd-split"]
        metric = realdata.evaluate(key, model, limit=limit)
        base_ms, split_ms = latency_ms([base.to_onnx(), model.to_onnx()], feed)
        row = {"method": method, "pipeline": pipeline, "metric": metric,
               "metric_drop": result["float_metric"] - metric,
               "weights_kept": report["params_after"] / report["params_before"],
               "model_params_kept": model.parameter_count() / result["params"],
               "layers_split": sum(layer["rank"] is not None for layer in report["layers"]),
               "layers": len(report["layers"]), "pass_seconds": seconds,
               "latency_ms": split_ms, "float_latency_ms": base_ms, "latency_ratio": split_ms / base_ms}
        result["runs"].append(row)
        save(result)
        print(f"  {method:18s} {pipeline}: {metric:.4f} (drop {row['metric_drop']:+.4f}), weights kept "
              f"{row['weights_kept']:.3f}, {row['layers_split']}/{row['layers']} split, "
              f"latency {split_ms:.2f} vs {base_ms:.2f} ms, pass {seconds:.0f} s", flush=True)
    return result


def vgg_check() -> dict:
    """Energy-0.95 rank of the light VGG-19's FC weights (constant-filled: rank 1, a degenerate spectrum)."""
    from onnx import numpy_helper
    from graphpress.lowrank.rank import energy_rank, max_useful_rank
    proto = onnx.load(Path(onnx.__file__).parent / "backend/test/data/light/light_vgg19.onnx")
    shapes = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type != "ConstantOfShape" or "_w_" not in node.output[0]:
            continue
        fill = numpy_helper.to_array(node.attribute[0].t)
        weight = np.full(tuple(shapes[node.input[0]]), fill[0], dtype=np.float32)
        name = node.output[0]
        if weight.ndim != 2:
            continue
        small = weight if weight.shape[0] <= weight.shape[1] else weight.T
        gram = small.astype(np.float64) @ small.T.astype(np.float64)
        s = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))     # the spectrum only
        k, n = weight.shape
        rank = energy_rank(s, 0.95)
        found[name] = {"shape": [k, n], "distinct_values": np.unique(weight).size, "rank_at_0.95": rank,
                       "numerical_rank": int(np.sum(s > s[0] * 1e-6)), "params_removed": 1 - rank * (k + n) / (k * n),
                       "splits": rank <= max_useful_rank(k, n, 0.1)}
    return {"note": "light_vgg19 weights are constant-filled (ConstantOfShape 0.02): every FC weight has rank 1, "
                    "so '95% energy' keeps rank 1 and removes ~99.9% of its parameters. This is a property of "
                    "the placeholder weights, not a check of the literature's 83% for a trained VGG-16 FC layer, "
                    "which needs the trained weights (not available here).", "weights": found}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (key, data) in zip(axes[0], models.items()):
        for method in METHODS:
            rows = sorted((r for r in data["runs"] if r["method"] == method and "target-params" in r["pipeline"]),
                          key=lambda r: r["weights_kept"])
            ax.plot([r["weights_kept"] for r in rows], [r["metric"] for r in rows], "o-", label=method)
        ax.axhline(data["float_metric"], color="gray", ls="--", label="float")
        if key in GOAL:
            ax.axhline(data["float_metric"] - GOAL[key]["metric_within"], color="red", ls=":", label="goal")
            ax.axvline(GOAL[key]["params_kept"], color="red", ls=":")
        ax.set_title(f"{key}: svd-split")
        ax.set_xlabel("share of factorable weight parameters kept")
        ax.set_ylabel(data["metric_name"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated keys (each writes svd_<key>.json)")
    parser.add_argument("--quick", action="store_true", help="one budget, 300 evaluation samples")
    parser.add_argument("--merge-only", action="store_true", help="only combine svd_<key>.json into svd.json/png")
    args = parser.parse_args()
    if not realdata.available():
        raise SystemExit(realdata.skip_reason())
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if not args.merge_only:
        header = {"machine": realdata.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "onnxruntime": ort.__version__}
        for key in args.models.split(","):
            path = RESULTS / f"svd_{key}{suffix}.json"
            run_case(key, args.quick, lambda result: path.write_text(json.dumps({**header, **result}, indent=1)))
    merged = {"models": {key: json.loads((RESULTS / f"svd_{key}{suffix}.json").read_text())
                         for key in CASES if (RESULTS / f"svd_{key}{suffix}.json").exists()},
              "vgg19_light": vgg_check()}
    (RESULTS / f"svd{suffix}.json").write_text(json.dumps(merged, indent=1))
    plot(merged, RESULTS / f"svd{suffix}.png")
    print(f"wrote {RESULTS / f'svd{suffix}.json'}")


if __name__ == "__main__":
    main()
