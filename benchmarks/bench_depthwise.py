"""MobileNetV2's depthwise convolutions with and without graphpress' depthwise schedule, in one run.

    .venv/bin/python -m benchmarks.bench_depthwise            # ~3 min

The float and int8 MobileNetV2 of `bench_cpu` (static batch 1, folded; int8 = graphpress
`insert-qdq(method=minmax)` on 32 calibration images) go through graphpress' CPU lowering. Then:

- per layer (for the host target, and for AVX2 code, `x86-64-v3`, which runs here too): every
  depthwise PrimFunc is built twice, scheduled by `DepthwiseConv` (the default rules) and by the
  rules without it (`TiledReduction` takes it), checked for identical outputs on
  one random input, and timed on the calling thread at one TVM thread (median of 7 blocks of 20
  calls, CPU time of the thread, the two builds interleaved block by block), with GMAC/s;
- whole model: the artifact compiled with the default rules and without `DepthwiseConv`, timed in
  a fresh process per thread count beside onnxruntime on the same ONNX model: at 1 thread call by
  call, interleaved, median thread CPU time; at 2 threads in 0.3 s blocks, median wall time.

The load average is recorded with each figure (the machine is shared). Writes
benchmarks/results/depthwise.json and depthwise.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import realdata
from benchmarks.bench_backends import machine

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS, CALLS = 7, 20
MIN_SECONDS, MIN_RUNS = 4.0, 20
THREADS = (1, 2)


def _models() -> dict:
    from benchmarks.bench_cpu import quantized, static_model

    float_model = static_model("mobilenet_v2", 1)
    return {"float": float_model, "int8": quantized("mobilenet_v2", float_model, 1)}


def _rules(with_depthwise: bool) -> tuple:
    from graphpress.backends.cpu import schedules

    return tuple(r for r in schedules.RULES if with_depthwise or not isinstance(r, schedules.DepthwiseConv))


def _thread_time(fn, args) -> float:
    start = time.thread_time()
    for _ in range(CALLS):
        fn(*args)
    return (time.thread_time() - start) / CALLS * 1e6


def per_layer(proto, target_name: str = "x86") -> list[dict]:
    """Every depthwise function of `proto`'s lowered module for `target_name`, timed under both
    schedules (us); a target this CPU can run (x86-64-v3: AVX2 code, 16 vector registers)."""
    import tvm
    from tvm.s_tir import dlight

    from graphpress.backends import targets
    from graphpress.backends.cpu import pipeline
    from graphpress.backends.tvm_compile import import_relax, input_specs

    specs, _ = input_specs(proto, None, "bench")
    target = targets.resolve(target_name).tvm_target()
    prepared = pipeline.prepare(import_relax(proto, specs, "bench"), target)
    main = prepared["main"].script()
    rng = np.random.default_rng(0)
    rows = []
    for gvar, func in prepared.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or "group_conv2d" not in func.script():
            continue
        arrays = [rng.integers(0, 100, [int(d) for d in p.shape]).astype(str(p.dtype)) if "int" in str(p.dtype)
                  else rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)) for p in func.params]
        built, outputs, rule = {}, {}, {}
        for name, with_rule in (("depthwise", True), ("generic", False)):
            module = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            with target:
                rule[name] = next(type(r).__name__ for r in _rules(with_rule)
                                  if r.apply(func, target, False) is not None)
                module = dlight.ApplyDefaultSchedule(*_rules(with_rule))(module)
            built[name] = (tvm.compile(module, target=target).jit()["main"], [tvm.runtime.tensor(a) for a in arrays])
            built[name][0](*built[name][1])
            outputs[name] = built[name][1][-1].numpy()
        times = {name: [] for name in built}
        for _ in range(BLOCKS):
            for name, (fn, args) in built.items():
                times[name].append(_thread_time(fn, args))
        out = [int(d) for d in func.params[-1].shape]
        weight = next([int(d) for d in p.shape] for p in func.params if len(p.shape) == 4 and int(p.shape[2]) == 1)
        macs = int(np.prod(out)) * weight[0] * weight[1]
        us = {name: float(np.median(t)) for name, t in times.items()}
        rows.append({"function": gvar.name_hint, "calls": len(re.findall(rf"\b{gvar.name_hint}\b,", main)),
                     "output_nhwc": out, "stride": int(func.params[0].shape[1]) // out[1],
                     "input_dtype": str(func.params[0].dtype), "macs": macs,
                     "rule": rule["depthwise"],
                     "identical_outputs": bool(np.array_equal(outputs["depthwise"], outputs["generic"])),
                     "us": us, "gmac_per_s": {k: macs / v / 1e3 for k, v in us.items()},
                     "load_average_1_5_15_min": os.getloadavg()})
    return sorted(rows, key=lambda r: (-r["output_nhwc"][1], r["output_nhwc"][3]))


def measure_whole(artifacts: dict, threads: int) -> dict:
    """Each artifact and onnxruntime on its ONNX model at `threads` threads (run in a process started
    with TVM_NUM_THREADS=threads): at 1 thread call by call, median thread CPU ms; at more, in 0.3 s
    blocks per runtime (their thread pools spin after a call), median wall ms."""
    import onnxruntime as ort

    from graphpress.backends.timing import sample_inputs
    from graphpress.runtime import load

    models = {name: load(path) for name, path in artifacts.items()}
    first = next(iter(models.values()))
    inputs = sample_inputs(first.inputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(first.onnx_model_bytes(), options, providers=["CPUExecutionProvider"])
    outputs = {name: m.run(inputs)[m.outputs[0]["name"]] for name, m in models.items()}
    runs = {**{name: (lambda m=m: m.run(inputs)) for name, m in models.items()},
            "onnxruntime": lambda: session.run(None, inputs)}
    clock = time.thread_time if threads == 1 else time.perf_counter
    block_seconds = 0.0 if threads == 1 else 0.3
    samples = {name: [] for name in runs}
    started = time.perf_counter()
    while len(samples["onnxruntime"]) < MIN_RUNS or time.perf_counter() - started < MIN_SECONDS:
        for name, fn in runs.items():
            block = time.perf_counter()
            while True:
                c0 = clock()
                fn()
                samples[name].append((clock() - c0) * 1e3)
                if time.perf_counter() - block >= block_seconds:
                    break
    reference = next(iter(outputs.values()))
    return {"threads": threads, "figure": "thread_cpu_ms" if threads == 1 else "wall_ms",
            "ms": {name: float(np.median(v)) for name, v in samples.items()},
            "runs": {name: len(v) for name, v in samples.items()}, "load_average_1_5_15_min": os.getloadavg(),
            "max_abs_diff_between_artifacts": max(float(np.abs(o - reference).max()) for o in outputs.values())}


def whole_model(proto, workdir: Path) -> dict:
    from graphpress.backends import compile
    from graphpress.backends.cpu import schedules

    artifacts = {}
    default = schedules.RULES
    try:
        for name, with_rule in (("depthwise", True), ("generic", False)):
            schedules.RULES = _rules(with_rule)
            artifacts[name] = str(compile(proto, "x86", workdir / name, progress=False))
    finally:
        schedules.RULES = default
    code = ("import json, sys; from benchmarks.bench_depthwise import measure_whole; "
            "print(json.dumps(measure_whole(json.loads(sys.argv[1]), int(sys.argv[2]))))")
    results = {}
    for threads in THREADS:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(artifacts), str(threads)], capture_output=True,
                              text=True, env={**os.environ, "TVM_NUM_THREADS": str(threads)},
                              cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            raise RuntimeError(f"timing at {threads} threads failed: {done.stderr.strip().splitlines()[-1:]}")
        results[f"t{threads}"] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(report["models"])
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 4), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants):
        rows = report["models"][variant]["layers"]
        x = np.arange(len(rows))
        for i, (key, label) in enumerate((("generic", "TiledReduction"), ("depthwise", "DepthwiseConv"))):
            ax.bar(x + (i - 0.5) * 0.4, [r["gmac_per_s"][key] for r in rows], 0.4, label=label)
        ax.set_xticks(x, [f"{r['output_nhwc'][1]}x{r['output_nhwc'][2]}x{r['output_nhwc'][3]} s{r['stride']}"
                          for r in rows], rotation=60, fontsize=7)
        whole = report["models"][variant]["whole_model"]["t1"]
        ms = whole["ms"]
        ax.set_title(f"MobileNetV2 {variant}: whole model {ms['generic']:.2f} -> {ms['depthwise']:.2f} ms "
                     f"(ORT {ms['onnxruntime']:.2f}), load {whole['load_average_1_5_15_min'][0]:.1f}", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("GMAC/s, 1 thread, thread CPU time (higher is better)")
    fig.suptitle(f"depthwise layers: {report['machine']['description']} ({report['machine']['llvm_cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "depthwise.json")
    parser.add_argument("--layer-targets", nargs="*", default=["x86-64-v3"],
                        help="also time the layers compiled for these targets (per layer only)")
    args = parser.parse_args(argv)
    if not realdata.available():
        print(realdata.skip_reason())
        return 1
    os.environ["TVM_NUM_THREADS"] = "1"  # before the TVM thread pool starts (per-layer timing in this process)
    started = time.perf_counter()
    report = {"machine": {**machine(), "description": realdata.machine()}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_depthwise_") as tmp:
        for variant, proto in _models().items():
            layers = per_layer(proto)
            whole = whole_model(proto, Path(tmp) / variant)
            other = {name: per_layer(proto, name) for name in args.layer_targets}
            sums = {name: {k: sum(r["us"][k] * r["calls"] for r in rows) for k in ("generic", "depthwise")}
                    for name, rows in {"x86": layers, **other}.items()}
            report["models"][variant] = {"layers": layers, "whole_model": whole, "layers_for_other_targets": other,
                                         "depthwise_us_per_inference": sums}
            for name, sums in report["models"][variant]["depthwise_us_per_inference"].items():
                print(f"{variant}: depthwise layers for {name}: {sums['generic']:.0f} -> {sums['depthwise']:.0f} us "
                      "per inference (1 thread)")
            for case in whole.values():
                ms = case["ms"]
                print(f"  whole model, {case['threads']} thread(s), {case['figure']}: {ms['generic']:.3f} -> "
                      f"{ms['depthwise']:.3f} (onnxruntime {ms['onnxruntime']:.3f}), "
                      f"load {case['load_average_1_5_15_min'][0]:.1f}")
    report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
