"""graphpress' int8 TVM artifacts against onnxruntime running the same QDQ model: end to end, per
quantized activation, and how far one rounding tie moves the output.

    .venv/bin/python -m benchmarks.bench_int8_agreement                  # all four; ~10 min
    .venv/bin/python -m benchmarks.bench_int8_agreement --models minilm --samples 50

The int8 models are bench_cpu's (static batch 1, `fold`, graphpress insert-qdq calibrated on 32 samples
of realdata's calibration split; MiniLM: its MatMuls and embedding Gathers, sentences padded to 128
tokens), and `minilm-headline`: the headline MiniLM's quantization stages on the same static model and
calibration (SmoothQuant, GPTQ weights, 95% of them 4-bit; the activations of all but two MatMuls
stay float). Each is compiled for this machine (`x86`) and run on held-out samples (none among the
calibration indices):

1. end to end: per sample, max |artifact - onnxruntime| against onnxruntime with graph optimizations off
   (ONNX's float semantics on the dequantized values, the reference) and on (its fused int8 kernels),
   and onnxruntime on vs off. Image models: top-1 agreement and top-1. MiniLM: the largest difference
   on real (unpadded) tokens, 1 - cosine of the masked-mean sentence embeddings, and each runtime's STS-B
   Spearman on the held-out pairs.
2. per segment (`graphpress.quant.agreement`): the teacher-forced model compiled and fed onnxruntime's
   quantized activations, so every segment starts from the same integers; per quantized tensor the
   elements that differ, by how many steps, how far from a rounding tie; for the differing outputs of
   integer matmuls, which runtime agrees with float64 arithmetic on the same integers.
3. sensitivity, onnxruntime alone: one element of one quantized activation moved by one step (what a
   tie rounded the other way does, on real tokens for MiniLM), and the largest change of the output.

Writes benchmarks/results/int8_agreement.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from benchmarks import realdata
from benchmarks.bench_backends import machine
from benchmarks.bench_cpu import QDQ_PIPELINE, SEQUENCE, calibration, compiled, quantized, static_model
from graphpress.ir.execute import session
from graphpress.quant import agreement

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["resnet8", "mobilenet_v2", "minilm", "minilm-headline"]
#: samples (MiniLM: STS-B pairs) per model for the end-to-end comparison
SAMPLES = {"resnet8": 1000, "mobilenet_v2": 400, "minilm": 300, "minilm-headline": 300}
#: minilm-headline: the quantization stages of the headline MiniLM (results/headline.json) on bench_cpu's
#: static model and calibration: SmoothQuant, 4-bit GPTQ weights, no activation x activation quantization
HEADLINE_PIPELINE = ("svd-split(energy=0.95,method=plain),smooth-quant(alpha=0.75),insert-qdq(ops=[MatMul,Gather],"
                     "activation-matmul=false,outputs=false,rounding=gptq,int4-share=0.95,sensitivity-batches=6),compact")
SEGMENT_SAMPLES, SENSITIVITY_TENSORS, SENSITIVITY_TRIALS = 3, 4, 10
QUANTILES = (50, 90, 99, 100)


def held_out(key: str, count: int) -> tuple[list[dict], np.ndarray]:
    """Up to `count` held-out samples as batch-1 feeds, and their labels (MiniLM: sentences a and b of
    each pair, in turn, padded to SEQUENCE tokens, and the pairs' scores)."""
    skip = set(realdata.calibration_indices(_data(key)).tolist())
    if _data(key) == "minilm":
        data = realdata._stsb()
        pairs = [i for i in range(len(data["score"])) if i not in skip][:count]
        padding = [(0, 0), (0, SEQUENCE - data["input_ids_a"].shape[1])]
        feeds = [realdata._minilm_feed(np.pad(data[f"input_ids_{side}"][i:i + 1], padding),
                                       np.pad(data[f"attention_mask_{side}"][i:i + 1], padding))
                 for i in pairs for side in ("a", "b")]
        return feeds, data["score"][pairs]
    inputs, labels = realdata._inputs_and_labels(key)
    rows = [i for i in range(len(labels)) if i not in skip][:count]
    return [{name: value[i:i + 1] for name, value in inputs.items()} for i in rows], labels[rows]


def runners(proto: onnx.ModelProto, artifact: Path) -> dict:
    """name -> f(feed) -> first output, for the artifact and onnxruntime with optimizations off / on."""
    from graphpress.runtime import load

    model = load(artifact)
    first = model.outputs[0]["name"]
    sessions = {name: session(proto, optimize=opt, threads=1) for name, opt in (("ort_reference", False), ("ort_optimized", True))}
    result = {"artifact": lambda feed: model.run(feed)[first]}
    result.update({name: (lambda feed, s=s: s.run(None, feed)[0]) for name, s in sessions.items()})
    return result


def quantiles(values) -> dict:
    return {f"p{q}": float(v) for q, v in zip(QUANTILES, np.percentile(np.asarray(values, np.float64), QUANTILES))}


def end_to_end(key: str, outputs: dict, feeds: list[dict], labels: np.ndarray) -> dict:
    """The comparisons of section 1 over the outputs {runner: [one array per feed]}."""
    pairs = (("artifact", "ort_reference"), ("artifact", "ort_optimized"), ("ort_optimized", "ort_reference"))
    result = {"samples": len(feeds), "max_abs_output": float(max(np.abs(o).max() for o in outputs["ort_reference"]))}
    if _data(key) != "minilm":
        top = {name: np.array([o.argmax() for o in outs]) for name, outs in outputs.items()}
        offset = 1 if key.startswith("mobilenet") else 0  # class 0 is "background"
        result["top1"] = {name: float(np.mean(t - offset == labels)) for name, t in top.items()}
        for a, b in pairs:
            diff = [np.abs(x - y).max() for x, y in zip(outputs[a], outputs[b])]
            result[f"{a}_vs_{b}"] = {"max_abs_diff": quantiles(diff), "top1_agreement": float(np.mean(top[a] == top[b]))}
        return result
    masks = [f["attention_mask"][0].astype(bool) for f in feeds]
    embeddings = {}
    for name, outs in outputs.items():
        pooled = np.stack([o[0][m].mean(0) for o, m in zip(outs, masks)])
        embeddings[name] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cosines = {name: np.sum(e[0::2] * e[1::2], axis=1) for name, e in embeddings.items()}
    result["spearman"] = {name: float(_spearman(c, labels)) for name, c in cosines.items()}
    for a, b in pairs:
        result[f"{a}_vs_{b}"] = {
            "max_abs_diff_real_tokens": quantiles([np.abs(x - y)[0][m].max() for x, y, m in zip(outputs[a], outputs[b], masks)]),
            "max_abs_diff_padding_tokens": quantiles([np.abs(x - y)[0][~m].max() for x, y, m in zip(outputs[a], outputs[b], masks)]),
            "one_minus_cosine_of_embeddings": quantiles(1 - np.sum(embeddings[a] * embeddings[b], axis=1)),
            "share_of_sentences_above_1e-4": float(np.mean([np.abs(x - y)[0][m].max() > 1e-4
                                                            for x, y, m in zip(outputs[a], outputs[b], masks)]))}
    return result


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v)).astype(np.float64)  # noqa: E731 (no ties in real cosines)
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def _dequantized(proto: onnx.ModelProto, name: str, values: dict) -> np.ndarray | None:
    """float64 value of DequantizeLinear output `name` from its integers (a fed activation or a constant)."""
    node = next((n for n in proto.graph.node if name in n.output), None)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in node.input}
    data = values.get(node.input[0], constants.get(node.input[0]))
    if data is None:
        return None
    scale = constants[node.input[1]].astype(np.float64)
    zero = constants[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    shape = [1] * data.ndim
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape[axis] = -1
    return (data.astype(np.float64) - zero.reshape(shape if zero.size > 1 else ())) * scale.reshape(shape if scale.size > 1 else ())


def exact_side(proto: onnx.ModelProto, got: dict, values: dict) -> dict:
    """For the differing elements of every QuantizeLinear(MatMul(DequantizeLinear, DequantizeLinear)):
    how many the artifact and onnxruntime each round as float64 arithmetic on the same integers does."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    counts = {"differing": 0, "artifact_exact": 0, "onnxruntime_exact": 0}
    for node in agreement.activation_quantizers(proto):
        name, matmul = node.output[0], producers.get(node.input[0])
        differ = np.asarray(got[name]).astype(np.int64) != values[name].astype(np.int64)
        if matmul is None or matmul.op_type != "MatMul" or not differ.any():
            continue
        a, b = (_dequantized(proto, x, values) for x in matmul.input)
        if a is None or b is None:
            continue
        info = np.iinfo(values[name].dtype)
        scale = float(constants[node.input[1]].reshape(()))
        zero = float(constants[node.input[2]].reshape(())) if len(node.input) > 2 and node.input[2] else 0.0
        exact = np.clip(np.round(np.matmul(a, b) / scale) + zero, info.min, info.max)  # half to even, as ONNX
        counts["differing"] += int(differ.sum())
        counts["artifact_exact"] += int((np.asarray(got[name])[differ] == exact[differ]).sum())
        counts["onnxruntime_exact"] += int((values[name][differ] == exact[differ]).sum())
    return counts


def per_segment(proto: onnx.ModelProto, feeds: list[dict], workdir: Path) -> dict:
    """Section 2 over `feeds`: the teacher-forced model compiled once (its shapes do not depend on the feed)."""
    from graphpress.runtime import load

    values = [agreement.reference_values(proto, feed) for feed in feeds]
    forced = agreement.teacher_forced(proto, values[0])
    artifact, _ = compiled(forced, workdir / "forced")
    model = load(artifact)
    tensors = {}
    side = {"differing": 0, "artifact_exact": 0, "onnxruntime_exact": 0}
    for feed, reference in zip(feeds, values):
        got = model.run(agreement.forced_inputs(proto, feed, reference))
        for d in agreement.disagreements(proto, got, reference):
            t = tensors.setdefault(d.tensor, {"elements": 0, "differing": 0, "max_steps": 0, "max_tie_distance": 0.0})
            t["elements"] += d.elements
            t["differing"] += d.differing
            t["max_steps"] = max(t["max_steps"], d.max_steps)
            t["max_tie_distance"] = max(t["max_tie_distance"], d.max_tie_distance)
        for k, v in exact_side(proto, got, reference).items():
            side[k] += v
    return {"samples": len(feeds), "quantized_tensors": len(tensors),
            "elements": sum(t["elements"] for t in tensors.values()),
            "differing": sum(t["differing"] for t in tensors.values()),
            "max_steps": max(t["max_steps"] for t in tensors.values()),
            "max_tie_distance": max(t["max_tie_distance"] for t in tensors.values()),
            "tensors_with_differences": {k: v for k, v in tensors.items() if v["differing"]},
            "matmul_ties_rounded_as_exact_arithmetic": side}


def sensitivity(key: str, proto: onnx.ModelProto, feed: dict, rng: np.random.Generator) -> dict:
    """Section 3: onnxruntime (optimizations off) on the model cut at one quantized activation at a time,
    fed onnxruntime's own value there with one element one step off; the rest of the model as it is."""
    values = agreement.reference_values(proto, feed)
    real = int(feed["attention_mask"].sum()) if _data(key) == "minilm" else None
    quantized = [n.output[0] for n in agreement.activation_quantizers(proto)]
    result = {}
    for name in [quantized[int(i)] for i in np.linspace(0, len(quantized) - 1, SENSITIVITY_TENSORS)]:
        sess = session(agreement.teacher_forced(proto, values, [name]))
        base_feed = agreement.forced_inputs(proto, feed, values, [name])
        base = sess.run(None, base_feed)[0]
        info = np.iinfo(values[name].dtype)
        changes = []
        for _ in range(SENSITIVITY_TRIALS):
            nudged = values[name].astype(np.int32)
            # MiniLM: every token axis (query and key ones) within the real tokens
            index = tuple(int(rng.integers(0, real if real is not None and size == SEQUENCE else size)) for size in nudged.shape)
            nudged[index] += 1 if nudged[index] < info.max else -1
            out = sess.run(None, dict(base_feed, **{name + agreement.FED: nudged.astype(values[name].dtype)}))[0]
            diff = np.abs(out - base)
            changes.append(float((diff[0, :real] if real is not None else diff).max()))
        result[name] = quantiles(changes)
    return result


def _data(key: str) -> str:
    """The realdata model whose samples `key` runs on."""
    return "minilm" if key == "minilm-headline" else key


def int8_model(key: str) -> tuple[onnx.ModelProto, str]:
    """The QDQ model for `key` and the graphpress pipeline that made it from bench_cpu's static model."""
    if key != "minilm-headline":
        return quantized(key, static_model(key, 1), 1), QDQ_PIPELINE.get(key, "insert-qdq(method=minmax)")
    from graphpress.ir import load
    from graphpress.passes import PassManager

    float_model = static_model("minilm", 1)
    result = PassManager(HEADLINE_PIPELINE).run(load(float_model), calibration=calibration("minilm", float_model, 1))
    return getattr(result, "model", result).to_onnx(), HEADLINE_PIPELINE


def bench_model(key: str, samples: int, workdir: Path, bar: tqdm) -> dict:
    bar.set_postfix_str(f"{key}: quantizing, compiling")
    proto, pipeline = int8_model(key)
    artifact, compile_info = compiled(proto, workdir / key)
    feeds, labels = held_out(key, samples)
    run = runners(proto, artifact)
    bar.set_postfix_str(f"{key}: {len(feeds)} samples")
    outputs = {name: [fn(feed) for feed in feeds] for name, fn in run.items()}
    row = {"model": key, "int8_pipeline": pipeline, **compile_info,
           "end_to_end": end_to_end(key, outputs, feeds, labels)}
    bar.set_postfix_str(f"{key}: per segment")
    row["per_segment"] = per_segment(proto, feeds[:SEGMENT_SAMPLES], workdir / f"{key}-forced")
    row["one_step_sensitivity"] = sensitivity(key, proto, feeds[0], np.random.default_rng(0))
    return row


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    fig, ax = plt.subplots(figsize=(8, 5))
    series = [("artifact_vs_ort_reference", "artifact vs ORT (optimizations off)"),
              ("ort_optimized_vs_ort_reference", "ORT optimized vs ORT (optimizations off)")]
    x = np.arange(len(rows))
    for i, (name, label) in enumerate(series):
        figure = [r["end_to_end"][name].get("max_abs_diff", r["end_to_end"][name].get("max_abs_diff_real_tokens"))["p100"]
                  for r in rows]
        ax.bar(x + (i - 1) * 0.27, figure, 0.27, label=f"{label}: max over samples")
    one_step = [max(q["p50"] for q in r["one_step_sensitivity"].values()) for r in rows]
    ax.bar(x + 0.27, one_step, 0.27, label="ORT alone, one element one step off: median output change (worst tensor)")
    ax.set_xticks(x, [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("max |difference| of the output (MiniLM: real tokens)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title(f"int8 artifacts vs onnxruntime on held-out samples; {report['machine']['description']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--samples", type=int, default=None, help="samples per model (MiniLM: pairs); default per model")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "int8_agreement.json")
    args = parser.parse_args(argv)
    if not realdata.available():
        print(realdata.skip_reason())
        return 1
    started = time.perf_counter()
    report = {"machine": {**machine(), "description": realdata.machine()}, "models": []}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_int8_agreement_") as tmp, \
            tqdm(total=len(args.models), desc="bench_int8_agreement", unit="model") as bar:
        for key in args.models:
            report["models"].append(bench_model(key, args.samples or SAMPLES[key], Path(tmp), bar))
            report["seconds"] = round(time.perf_counter() - started, 1)
            report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
            args.output.write_text(json.dumps(report, indent=2) + "\n")
            bar.update()
    plot(report, args.output.with_suffix(".png"))
    for row in report["models"]:
        e, s = row["end_to_end"], row["per_segment"]
        print(f"\n{row['model']}: {e['samples']} held-out samples, max |output| {e['max_abs_output']:.3g}")
        for name in ("artifact_vs_ort_reference", "artifact_vs_ort_optimized", "ort_optimized_vs_ort_reference"):
            print(f"  {name}: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in e[name].items()))
        print("  " + ", ".join(f"{k} {json.dumps(e[k])}" for k in ("top1", "spearman") if k in e))
        print(f"  per segment ({s['samples']} samples): {s['differing']} of {s['elements']} quantized elements differ, "
              f"max {s['max_steps']} step(s), max tie distance {s['max_tie_distance']:.2g} steps; "
              f"matmul ties: {s['matmul_ties_rounded_as_exact_arithmetic']}")
        for name, q in row["one_step_sensitivity"].items():
            print(f"  one step at {name[-50:]}: output change median {q['p50']:.3g}, max {q['p100']:.3g}")
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
