"""TVM artifacts vs onnxruntime on the real models: compile time, artifact size, batch-1 latency.

    .venv/bin/python -m benchmarks.bench_backends                      # untuned, all three models
    .venv/bin/python -m benchmarks.bench_backends --trials 64 --models resnet8

For each model: compile for the `x86` target (this machine's CPU), record compile time and artifact
size, check the artifact's outputs against onnxruntime on the same input, then time TVM and
onnxruntime at 1 and 2 threads, each thread count in a fresh process (the TVM runtime fixes its
thread count when its pool starts). With --trials N, also MetaSchedule-tune with N trials and time
the tuned artifact the same way. Writes benchmarks/results/backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.realdata import MODELS, model_path, skip_reason

RESULTS = Path(__file__).resolve().parent / "results" / "backends.json"
#: inputs with symbolic dimensions get these shapes (MiniLM: one sentence of 128 tokens)
SHAPES = {"minilm": {"input_ids": [1, 128], "attention_mask": [1, 128], "token_type_ids": [1, 128]}}
#: models TVM 0.27 cannot import as exported, and why; they are first simplified by onnxsim with the
#: static input shapes above (both TVM and onnxruntime then run that same simplified ONNX)
NEEDS_STATIC_SIMPLIFY = {"minilm": "TVM 0.27's ONNX importer fails on the exported attention-mask shape subgraph "
                                   "(Expand at node '/m/Expand' after the symbolic dims are bound)"}
DEFAULT_MODELS = ["resnet8", "mobilenet_v2", "minilm"]
THREADS = (1, 2)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import onnxruntime
    import tvm
    import tvm.target.codegen

    return {"cpu": cpu, "llvm_cpu": tvm.target.codegen.llvm_get_system_cpu(), "logical_cpus": os.cpu_count(),
            "load_average_1_5_15_min_at_start": os.getloadavg(),
            "python": platform.python_version(), "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__}


def measure_in_fresh_process(artifact: Path, threads: int) -> dict:
    """Run `bench_artifact` in a new interpreter with TVM_NUM_THREADS set before TVM starts."""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    code = ("import json, sys; from graphpress.backends.timing import bench_artifact; "
            "print(json.dumps(bench_artifact(sys.argv[1], int(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, str(artifact), str(threads)], env=env,
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def output_agreement(artifact: Path) -> float:
    """Largest |TVM - onnxruntime| / max|onnxruntime| over the outputs, on one sample input."""
    import onnxruntime as ort

    from graphpress import runtime
    from graphpress.backends.timing import sample_inputs

    model = runtime.load(artifact)
    inputs = sample_inputs(model.inputs, seed=7)
    session = ort.InferenceSession(model.onnx_model_bytes(), providers=["CPUExecutionProvider"])
    expected = session.run(None, inputs)
    got = model.run(inputs)
    return max(float(np.abs(got[spec["name"]] - want).max()) / max(float(np.abs(want).max()), 1e-12)
               for spec, want in zip(model.outputs, expected))


def artifact_entry(artifact: Path) -> dict:
    meta = json.loads((artifact / "metadata.json").read_text())
    entry = {"compile_seconds": meta["compile_seconds"],
             "artifact_bytes": sum(p.stat().st_size for p in artifact.iterdir()),
             "library_bytes": (artifact / "lib.so").stat().st_size,
             "max_rel_diff_vs_onnxruntime": output_agreement(artifact),
             "latency": {}}
    for threads in THREADS:
        result = measure_in_fresh_process(artifact, threads)
        entry["latency"][str(threads)] = {"tvm": result["tvm"], "onnxruntime": result["onnxruntime"],
                                          "tvm_over_onnxruntime": result["tvm_over_onnxruntime"]}
    return entry


def static_simplified(path: Path, shapes: dict, output: Path) -> Path:
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(path), overwrite_input_shapes=shapes)
    if not ok:
        raise RuntimeError(f"onnxsim could not validate its simplification of {path}")
    onnx.save(simplified, output)
    return output


def bench_model(key: str, workdir: Path, trials: int) -> dict:
    from graphpress.backends import compile
    from graphpress.backends.tuning import tune

    path = model_path(key)
    shapes = SHAPES.get(key)
    row = {"model": key, "file": path.name, "onnx_bytes": path.stat().st_size, "inputs": shapes or "batch 1"}
    if key in NEEDS_STATIC_SIMPLIFY:
        path = static_simplified(path, shapes, workdir / f"{key}-static.onnx")
        row["prepared"] = f"onnxsim.simplify with the static input shapes, because {NEEDS_STATIC_SIMPLIFY[key]}"
    print(f"[{key}] compiling untuned", flush=True)
    row["untuned"] = artifact_entry(compile(path, "x86", workdir / f"{key}-untuned", shapes=shapes, progress=False))
    if trials:
        print(f"[{key}] tuning with {trials} trials", flush=True)
        started = time.perf_counter()
        db = workdir / f"{key}.db"
        tune(path, "x86", trials, db, shapes=shapes)
        tune_seconds = time.perf_counter() - started
        artifact = compile(path, "x86", workdir / f"{key}-tuned", shapes=shapes, tuning_db=db, progress=False)
        row["tuned"] = {"trials": trials, "tune_seconds": round(tune_seconds, 1), **artifact_entry(artifact),
                        "tuning": json.loads((artifact / "metadata.json").read_text())["tuning"]}
    return row


def print_table(report: dict) -> None:
    print(f"\n{report['machine']['cpu']} ({report['machine']['logical_cpus']} logical CPUs), batch 1, median ms")
    print(f"{'model':14s} {'variant':8s} {'compile s':>9s} {'artifact MB':>11s}"
          + "".join(f" {'ort ' + t + 't':>9s} {'tvm ' + t + 't':>9s} {'tvm/ort':>8s}" for t in map(str, THREADS)))
    for row in report["models"]:
        for variant in ("untuned", "tuned"):
            if variant not in row:
                continue
            e = row[variant]
            cells = "".join(f" {e['latency'][t]['onnxruntime']['median_ms']:9.3f} {e['latency'][t]['tvm']['median_ms']:9.3f}"
                            f" {e['latency'][t]['tvm_over_onnxruntime']:7.1f}x" for t in map(str, THREADS))
            print(f"{row['model']:14s} {variant:8s} {e['compile_seconds']:9.1f} {e['artifact_bytes'] / 1e6:11.2f}{cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per model (0: untuned only)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    missing = [key for key in args.models if not model_path(key).is_file()]
    if missing:
        print(f"skipping: {skip_reason()}", file=sys.stderr)
        return 1
    report = {"what": "x86 TVM artifacts (graphpress compile --target x86) vs onnxruntime on the same ONNX, "
                      "batch 1; latency = median of >=50 runs and >=1 s after 3 warm-up runs, each thread count "
                      "in a fresh process; max_rel_diff on one random input",
              "machine": machine(), "models": []}
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        for key in args.models:
            report["models"].append(bench_model(key, Path(tmp), args.trials))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_suffix(".json.part")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(args.output)
    print_table(report)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
