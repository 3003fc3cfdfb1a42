"""graphpress' CPU code (float and int8 TVM artifacts) vs onnxruntime fp32 and int8, in one run.

    .venv/bin/python -m benchmarks.bench_cpu                        # all four models, ~10 min
    .venv/bin/python -m benchmarks.bench_cpu --models resnet8 --cases b1-t1

Models: resnet8, mobilenet_v2, minilm (one sentence of 128 tokens) and the light ResNet-50 from the
onnx wheel's backend test data (`resnet50`: its weights are made by ConstantOfShape, so they are
constant and its outputs say nothing; it is here for its shapes). Each model is first given static
input shapes and folded (graphpress `fold`); its int8 version is graphpress' own `insert-qdq` of that
float model (MinMax on 32 calibration samples from `realdata`'s calibration split; random normal
inputs for the light ResNet-50; MiniLM sentences padded to 128 tokens). Quantizing after folding
matters: `fold` on a QDQ model folds the weights' DequantizeLinear into float weights, and both
runtimes would then run float MatMuls on dequantized activations.

Both are compiled for the `x86` target (this machine's CPU) with graphpress' default CPU schedules
(no tuning), compile time recorded, and timed beside onnxruntime running the very ONNX model the
artifact came from (fp32 for the float artifact; for the int8 one, onnxruntime's QDQ int8 kernels):

    b1-t1   batch 1, 1 thread     median CPU time of the calling thread (ratios use it)
    b1-t2   batch 1, 2 threads    median wall time
    b32-t1  batch 32, 1 thread    median CPU time of the calling thread (ratios use it)

Each case runs in a fresh process (the TVM runtime fixes its thread count when its pool starts),
TVM and onnxruntime interleaved (call by call at one thread, in 0.3 s blocks at two: both
thread pools spin after a call and would wait for each other's workers). At one thread both runtimes compute on the calling
thread, so its CPU time is the latency without the time spent waiting for a core: the figure that
survives a machine shared with other jobs. Wall times are recorded too, with the load average at
each case. Ratios: graphpress float / ORT fp32, graphpress int8 / ORT fp32 and / ORT int8 (the
issue's goals: <= 1.0, <= 0.5, <= 1.0). Writes benchmarks/results/cpu.json and cpu.png.
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
from tqdm import tqdm

from benchmarks import realdata
from benchmarks.bench_backends import machine

RESULTS = Path(__file__).resolve().parent / "results"
SEQUENCE = 128  # MiniLM: one sentence of 128 tokens
MODELS = ["resnet8", "mobilenet_v2", "minilm", "resnet50"]
#: case name -> (batch, threads)
CASES = {"b1-t1": (1, 1), "b1-t2": (1, 2), "b32-t1": (32, 1)}
#: graphpress quantization recipe per model (MiniLM: its MatMuls and embedding Gathers, as bench_qdq)
QDQ_PIPELINE = {"minilm": "insert-qdq(method=minmax,ops=[MatMul,Gather])"}
CALIBRATION_SAMPLES = 32
#: timing per case: at least this long (both runtimes together) and this many calls each, at most MAX_RUNS
MIN_SECONDS, MIN_RUNS, MAX_RUNS = 3.0, 3, 200


def light_resnet50() -> Path:
    """The light ResNet-50 that ships inside the onnx wheel's backend test data."""
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"


def static_model(key: str, batch: int) -> onnx.ModelProto:
    """The float model with every input and output dimension fixed (batch; MiniLM's sequence to 128),
    then folded: the light ResNet-50's ConstantOfShape weights and BatchNorms, MiniLM's shape arithmetic
    (TVM's importer cannot take its symbolic ConstantOfShape path)."""
    from graphpress.ir import load
    from graphpress.passes import run_pipeline

    proto = onnx.load(str(light_resnet50() if key == "resnet50" else realdata.model_path(key)))
    initializers = {i.name for i in proto.graph.initializer}
    for value in [v for v in proto.graph.input if v.name not in initializers] + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, size in enumerate([batch, SEQUENCE] if key == "minilm" else [batch]):
            dims[i].ClearField("dim_param")
            dims[i].dim_value = size
    if key == "resnet50":
        _rebatch_flatten(proto, batch)
    return run_pipeline(load(proto), "fold").to_onnx()


def _rebatch_flatten(proto: onnx.ModelProto, batch: int) -> None:
    """The light ResNet-50 flattens with Reshape(x, [1, 2048]) (exported at batch 1): keep the batch."""
    shapes = {n.input[1] for n in proto.graph.node if n.op_type == "Reshape"}
    for i, init in enumerate(proto.graph.initializer):
        if init.name in shapes:
            shape = onnx.numpy_helper.to_array(init).copy()
            if shape.size and shape[0] == 1:
                shape[0] = batch
                proto.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(shape, init.name))


def calibration(key: str, proto: onnx.ModelProto, batch: int) -> list[dict]:
    """CALIBRATION_SAMPLES samples in batches of `batch`, shaped for the static model."""
    if key == "resnet50":
        rng = np.random.default_rng(0)
        shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        return [{proto.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)}
                for _ in range(CALIBRATION_SAMPLES // batch)]
    batches = realdata.calibration_batches(key, CALIBRATION_SAMPLES, batch_size=batch)
    if key != "minilm":
        return batches
    padded = []
    for feed in batches:  # padding tokens: id 0, attention mask 0
        padded.append({name: np.pad(value[:, :SEQUENCE], [(0, 0), (0, max(0, SEQUENCE - value.shape[1]))])
                       for name, value in feed.items()})
    return padded


def quantized(key: str, proto: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """graphpress insert-qdq on the static float model (MinMax: the same scales at every batch size)."""
    from graphpress.ir import load
    from graphpress.passes import PassManager

    pipeline = QDQ_PIPELINE.get(key, "insert-qdq(method=minmax)")
    result = PassManager(pipeline).run(load(proto), calibration=calibration(key, proto, batch))
    return getattr(result, "model", result).to_onnx()


def measure(artifact: str, threads: int) -> dict:
    """Time the artifact and onnxruntime on its ONNX model at `threads` threads, interleaved (call by
    call at one thread, in blocks otherwise); run in a process started with TVM_NUM_THREADS=threads."""
    import onnxruntime as ort

    from graphpress.backends.timing import sample_inputs, tvm_threads
    from graphpress.runtime import load

    model = load(artifact)
    inputs = sample_inputs(model.inputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.onnx_model_bytes(), options, providers=["CPUExecutionProvider"])
    got = model.run(inputs)[model.outputs[0]["name"]]  # also the warm-up
    want = session.run(None, inputs)[0]
    assert tvm_threads() == threads, (tvm_threads(), threads)
    runs = {"tvm": lambda: model.run(inputs), "onnxruntime": lambda: session.run(None, inputs)}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    # with several threads, each runtime runs in blocks: both thread pools spin-wait after a call, and
    # alternating call by call made each wait for the other's spinning workers (a whole time slice)
    block_seconds = 0.0 if threads == 1 else 0.3
    started = time.perf_counter()
    while len(wall["tvm"]) < MAX_RUNS and (len(wall["tvm"]) < MIN_RUNS or time.perf_counter() - started < MIN_SECONDS):
        for name, fn in runs.items():
            block = time.perf_counter()
            while True:
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append((time.thread_time() - c0) * 1e3)
                wall[name].append((time.perf_counter() - t0) * 1e3)
                if time.perf_counter() - block >= block_seconds:
                    break
    return {"threads": threads, "load_average_1_5_15_min": os.getloadavg(),
            "max_abs_diff_vs_onnxruntime": float(np.abs(got - want).max()), "max_abs_onnxruntime": float(np.abs(want).max()),
            **{name: {"wall_ms": float(np.median(wall[name])), "thread_cpu_ms": float(np.median(cpu[name])),
                      "runs": len(wall[name])} for name in runs}}


def measure_in_fresh_process(artifact: Path, threads: int) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    code = "import json, sys; from benchmarks.bench_cpu import measure; print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))"
    done = subprocess.run([sys.executable, "-c", code, str(artifact), str(threads)], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"timing {artifact} at {threads} threads failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compiled(proto: onnx.ModelProto, out: Path) -> tuple[Path, dict]:
    from graphpress.backends import compile

    started, cpu = time.perf_counter(), time.process_time()
    artifact = compile(proto, "x86", out, progress=False)
    return artifact, {"compile_seconds": round(time.perf_counter() - started, 2),
                      "compile_cpu_seconds": round(time.process_time() - cpu, 2)}


def ratios(entry: dict, figure: str) -> dict:
    """graphpress / onnxruntime for one case; `figure` is wall_ms or thread_cpu_ms."""
    f, q = entry["float"], entry["int8"]
    ort_fp32, ort_int8 = f["onnxruntime"][figure], q["onnxruntime"][figure]
    return {"figure": figure, "float_over_ort_fp32": f["tvm"][figure] / ort_fp32,
            "int8_over_ort_fp32": q["tvm"][figure] / ort_fp32, "int8_over_ort_int8": q["tvm"][figure] / ort_int8}


def bench_model(key: str, cases: list[str], workdir: Path, bar: tqdm) -> dict:
    row = {"model": key, "int8_pipeline": QDQ_PIPELINE.get(key, "insert-qdq(method=minmax)"), "compile": {}, "cases": {}}
    for batch in sorted({CASES[c][0] for c in cases}):
        bar.set_postfix_str(f"{key} batch {batch}: quantizing")
        models = {"float": static_model(key, batch)}
        models["int8"] = quantized(key, models["float"], batch)
        artifacts = {}
        for variant, proto in models.items():
            bar.set_postfix_str(f"{key} batch {batch}: compiling {variant}")
            artifacts[variant], row["compile"][f"{variant} batch {batch}"] = compiled(proto, workdir / f"{key}-{variant}-b{batch}")
        for case in (c for c in cases if CASES[c][0] == batch):
            threads = CASES[case][1]
            entry = {"batch": batch, "threads": threads}
            for variant, artifact in artifacts.items():
                bar.set_postfix_str(f"{key} {case}: timing {variant}")
                entry[variant] = measure_in_fresh_process(artifact, threads)
            entry["ratios"] = ratios(entry, "thread_cpu_ms" if threads == 1 else "wall_ms")
            row["cases"][case] = entry
            bar.update()
    return row


def print_table(report: dict) -> None:
    print(f"\n{report['machine']['description']} ({report['machine']['llvm_cpu']}); ms: thread CPU time at 1 thread, "
          "wall time at 2; ratios graphpress / onnxruntime")
    print(f"{'model':13s} {'case':7s} {'ort fp32':>9s} {'ort int8':>9s} {'gp float':>9s} {'gp int8':>9s}"
          f" {'float/fp32':>10s} {'int8/fp32':>9s} {'int8/int8':>9s} {'load':>5s}")
    for row in report["models"]:
        for case, e in row["cases"].items():
            fig, r = e["ratios"]["figure"], e["ratios"]
            print(f"{row['model']:13s} {case:7s} {e['float']['onnxruntime'][fig]:9.3f} {e['int8']['onnxruntime'][fig]:9.3f}"
                  f" {e['float']['tvm'][fig]:9.3f} {e['int8']['tvm'][fig]:9.3f} {r['float_over_ort_fp32']:10.2f}"
                  f" {r['int8_over_ort_fp32']:9.2f} {r['int8_over_ort_int8']:9.2f} {e['int8']['load_average_1_5_15_min'][0]:5.1f}")
        print(f"{'':13s} compile s: " + ", ".join(f"{k} {v['compile_seconds']}" for k, v in row["compile"].items()))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    cases = [c for c in CASES if any(c in r["cases"] for r in rows)]
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4), sharey=True, squeeze=False)
    bars = [("float_over_ort_fp32", "graphpress float / ORT fp32"), ("int8_over_ort_fp32", "graphpress int8 / ORT fp32"),
            ("int8_over_ort_int8", "graphpress int8 / ORT int8")]
    for ax, case in zip(axes[0], cases):
        present = [r for r in rows if case in r["cases"]]
        x = np.arange(len(present))
        for i, (key, label) in enumerate(bars):
            ax.bar(x + (i - 1) * 0.27, [r["cases"][case]["ratios"][key] for r in present], 0.27, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(x, [r["model"] for r in present])
        batch, threads = CASES[case]
        ax.set_title(f"batch {batch}, {threads} thread(s), {'CPU' if threads == 1 else 'wall'} time", fontsize=9)
    axes[0][0].set_ylabel("latency ratio (lower is better)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report['machine']['description']} ({report['machine']['llvm_cpu']}), "
                 f"load {report['machine']['load_average_1_5_15_min_at_start'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "cpu.json")
    args = parser.parse_args(argv)
    if not realdata.available() and any(k != "resnet50" for k in args.models):
        print(realdata.skip_reason())
        return 1
    started = time.perf_counter()
    report = {"machine": {**machine(), "description": realdata.machine()}, "cases": {c: CASES[c] for c in args.cases},
              "models": [], "failed": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp, \
            tqdm(total=len(args.models) * len(args.cases), desc="bench_cpu", unit="case") as bar:
        for key in args.models:
            try:
                report["models"].append(bench_model(key, args.cases, Path(tmp), bar))
            except Exception as exc:  # a model that fails is a result too; the others still run
                report["failed"][key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(f"[{key}] failed: {report['failed'][key]}", flush=True)
            report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
            report["seconds"] = round(time.perf_counter() - started, 1)
            args.output.write_text(json.dumps(report, indent=2) + "\n")  # after every model
    if report["models"]:
        plot(report, args.output.with_suffix(".png"))
    print_table(report)
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
