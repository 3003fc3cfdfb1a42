"""graphpress' CPU code (float and int8 TVM artifacts) vs onnxruntime fp32 and int8, batch 1.

    .venv/bin/python -m benchmarks.bench_cpu                       # resnet8, mobilenet_v2, minilm
    .venv/bin/python -m benchmarks.bench_cpu --models resnet8 resnet50

For each model: the float ONNX model and an int8 QDQ model made by graphpress' own `insert-qdq`
(MinMax, calibrated on the model's calibration split from `realdata`; the light ResNet-50 from the
onnx wheel has no data and is calibrated on 16 random inputs) are compiled for the `x86` target with
the default CPU layer (no tuning), compile time recorded. Each artifact is then timed beside
onnxruntime running the very ONNX model it came from (fp32 for the float artifact, its QDQ int8
kernels for the int8 one) at 1 and 2 threads, each thread count in a fresh process
(`bench_backends.measure_in_fresh_process`). Ratios: graphpress float / ORT fp32, graphpress int8 /
ORT fp32 and / ORT int8 (the issue's goals: <= 1.0, <= 0.5, <= 1.0).

Latency is the median wall time; the machine is shared, so its load average is recorded with the
results, and at one thread the median CPU time of the calling thread is recorded too (both runtimes
compute on it), which excludes time spent waiting for a core. Writes benchmarks/results/cpu.json and cpu.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks import realdata
from benchmarks.bench_backends import THREADS, machine, measure_in_fresh_process

RESULTS = Path(__file__).resolve().parent / "results"
SEQUENCE = 128  # MiniLM: one sentence of 128 tokens
DEFAULT_MODELS = ["resnet8", "mobilenet_v2", "minilm"]  # --models ... resnet50: the light ResNet-50
#: graphpress quantization recipe per model (MiniLM: its MatMuls and embedding Gathers, as bench_qdq)
QDQ_PIPELINE = {"minilm": "insert-qdq(method=minmax,ops=[MatMul,Gather])"}
CALIBRATION_SAMPLES = 32


def light_resnet50() -> Path:
    """The light ResNet-50 that ships inside the onnx wheel's backend test data."""
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"


def source_model(key: str) -> onnx.ModelProto:
    return onnx.load(str(light_resnet50() if key == "resnet50" else realdata.model_path(key)))


def calibration(key: str, proto: onnx.ModelProto) -> list[dict]:
    if key != "resnet50":
        return realdata.calibration_batches(key, CALIBRATION_SAMPLES)
    rng = np.random.default_rng(0)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{proto.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)} for _ in range(16)]


def quantized(key: str, proto: onnx.ModelProto) -> onnx.ModelProto:
    """graphpress insert-qdq on the float model."""
    from graphpress.ir import load
    from graphpress.passes import PassManager

    result = PassManager(QDQ_PIPELINE.get(key, "insert-qdq(method=minmax)")).run(load(proto), calibration=calibration(key, proto))
    return getattr(result, "model", result).to_onnx()


def static_shapes(key: str, proto: onnx.ModelProto) -> onnx.ModelProto:
    """MiniLM with its [batch, sequence] inputs fixed to [1, 128] and the shape arithmetic folded
    (TVM's importer cannot take the symbolic ConstantOfShape path); other models unchanged."""
    if key != "minilm":
        return proto
    from graphpress.ir import load
    from graphpress.passes import run_pipeline

    for value in proto.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, (1, SEQUENCE)):
            dim.ClearField("dim_param")
            dim.dim_value = size
    return run_pipeline(load(proto), "fold").to_onnx()


def thread_cpu_ms(artifact: str, repeat: int = 30) -> dict:
    """Median CPU time of one call on the calling thread (TVM and onnxruntime, one thread each).

    On one thread both runtimes compute on the caller's thread, so its CPU time is the latency
    without the time spent waiting for a core: the figure that survives a busy shared machine.
    Run with TVM_NUM_THREADS=1 (see `cpu_time_in_fresh_process`).
    """
    import onnxruntime as ort

    from graphpress.backends.timing import sample_inputs
    from graphpress.runtime import load

    model = load(artifact)
    inputs = sample_inputs(model.inputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.onnx_model_bytes(), options, providers=["CPUExecutionProvider"])
    runs = {"tvm": lambda: model.run(inputs), "onnxruntime": lambda: session.run(None, inputs)}
    times = {name: [] for name in runs}
    for name, fn in runs.items():
        fn()
    for _ in range(repeat):  # interleaved, so both see the same machine
        for name, fn in runs.items():
            started = time.thread_time()
            fn()
            times[name].append((time.thread_time() - started) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def cpu_time_in_fresh_process(artifact: Path) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    code = "import json, sys; from benchmarks.bench_cpu import thread_cpu_ms; print(json.dumps(thread_cpu_ms(sys.argv[1])))"
    done = subprocess.run([sys.executable, "-c", code, str(artifact)], env=env, capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def variant_entry(proto: onnx.ModelProto, out: Path) -> dict:
    from graphpress.backends import compile

    started = time.perf_counter()
    artifact = compile(proto, "x86", out, progress=False)
    entry = {"compile_seconds": round(time.perf_counter() - started, 2), "latency": {}}
    for threads in THREADS:
        entry["latency"][str(threads)] = measure_in_fresh_process(artifact, threads)
    entry["thread_cpu_ms_1_thread"] = cpu_time_in_fresh_process(artifact)
    return entry


def bench_model(key: str, workdir: Path) -> dict:
    print(f"[{key}] quantizing with {QDQ_PIPELINE.get(key, 'insert-qdq(method=minmax)')}", flush=True)
    proto = source_model(key)
    qdq = quantized(key, proto)
    row = {"model": key, "int8_pipeline": QDQ_PIPELINE.get(key, "insert-qdq(method=minmax)")}
    for variant, model in (("float", proto), ("int8", qdq)):
        print(f"[{key}] {variant}: compiling and timing", flush=True)
        row[variant] = variant_entry(static_shapes(key, model), workdir / f"{key}-{variant}")
    row["ratios"] = {}
    for t in map(str, THREADS):
        ort_fp32 = row["float"]["latency"][t]["onnxruntime"]["median_ms"]
        ort_int8 = row["int8"]["latency"][t]["onnxruntime"]["median_ms"]
        row["ratios"][t] = {"float_over_ort_fp32": row["float"]["latency"][t]["tvm"]["median_ms"] / ort_fp32,
                            "int8_over_ort_fp32": row["int8"]["latency"][t]["tvm"]["median_ms"] / ort_fp32,
                            "int8_over_ort_int8": row["int8"]["latency"][t]["tvm"]["median_ms"] / ort_int8}
    cpu_f, cpu_q = row["float"]["thread_cpu_ms_1_thread"], row["int8"]["thread_cpu_ms_1_thread"]
    row["ratios"]["1 (thread CPU time)"] = {"float_over_ort_fp32": cpu_f["tvm"] / cpu_f["onnxruntime"],
                                           "int8_over_ort_fp32": cpu_q["tvm"] / cpu_f["onnxruntime"],
                                           "int8_over_ort_int8": cpu_q["tvm"] / cpu_q["onnxruntime"]}
    return row


def print_table(report: dict) -> None:
    print(f"\n{report['machine']['cpu']}, batch 1, median ms (ratios: graphpress / onnxruntime)")
    print(f"{'model':13s} {'thr':>3s} {'ort fp32':>9s} {'ort int8':>9s} {'gp float':>9s} {'gp int8':>9s}"
          f" {'float/fp32':>10s} {'int8/fp32':>9s} {'int8/int8':>9s} {'compile s (f/i8)':>16s}")
    for row in report["models"]:
        for t in map(str, THREADS):
            f, q, r = row["float"]["latency"][t], row["int8"]["latency"][t], row["ratios"][t]
            print(f"{row['model']:13s} {t:>3s} {f['onnxruntime']['median_ms']:9.3f} {q['onnxruntime']['median_ms']:9.3f}"
                  f" {f['tvm']['median_ms']:9.3f} {q['tvm']['median_ms']:9.3f} {r['float_over_ort_fp32']:10.2f}"
                  f" {r['int8_over_ort_fp32']:9.2f} {r['int8_over_ort_int8']:9.2f}"
                  f" {row['float']['compile_seconds']:7.1f}/{row['int8']['compile_seconds']:.1f}")
        f, q, r = row["float"]["thread_cpu_ms_1_thread"], row["int8"]["thread_cpu_ms_1_thread"], row["ratios"]["1 (thread CPU time)"]
        print(f"{row['model']:13s} {'1c':>3s} {f['onnxruntime']:9.3f} {q['onnxruntime']:9.3f} {f['tvm']:9.3f} {q['tvm']:9.3f}"
              f" {r['float_over_ort_fp32']:10.2f} {r['int8_over_ort_fp32']:9.2f} {r['int8_over_ort_int8']:9.2f}")
    print("thr 1c: one thread, median CPU time of the calling thread (latency minus waiting for a core)")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    panels = [*map(str, THREADS), "1 (thread CPU time)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), sharey=True)
    bars = [("float_over_ort_fp32", "graphpress float / ORT fp32"), ("int8_over_ort_fp32", "graphpress int8 / ORT fp32"),
            ("int8_over_ort_int8", "graphpress int8 / ORT int8")]
    for ax, t in zip(np.atleast_1d(axes), panels):
        x = np.arange(len(rows))
        for i, (key, label) in enumerate(bars):
            ax.bar(x + (i - 1) * 0.27, [r["ratios"][t][key] for r in rows], 0.27, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(x, [r["model"] for r in rows])
        ax.set_title(f"batch 1, {t} thread(s) (wall median)" if t != panels[-1] else "batch 1, 1 thread, CPU time", fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(report["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(realdata.MODELS) + ["resnet50"])
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "cpu.json")
    args = parser.parse_args(argv)
    if not realdata.available() and any(k != "resnet50" for k in args.models):
        print(realdata.skip_reason())
        return 1
    report = {"machine": machine(), "batch": 1, "threads": list(THREADS), "models": [], "failed": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
        for key in args.models:
            try:
                report["models"].append(bench_model(key, Path(tmp)))
            except Exception as exc:  # a model that fails is a result too; the others still run
                report["failed"][key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(f"[{key}] failed: {report['failed'][key]}", flush=True)
            report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
            args.output.write_text(json.dumps(report, indent=2) + "\n")  # after every model
    if report["models"]:
        plot(report, args.output.with_suffix(".png"))
    print_table(report)
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
