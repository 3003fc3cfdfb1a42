"""`graphpress optimize -p fold` against onnxslim and onnxsim, in one run, on the same models.

Each tool runs as a subprocess (start-up included, as a user would run it), `--repeats` times per model,
interleaved; we record the median wall time, the peak resident memory (`/usr/bin/time`), the node count
and the file size of what it wrote, and how far its outputs are from the original model's (random
inputs of the right kind, onnxruntime). `graphpress-api` is the same fold from Python (load, fold,
save) without the CLI's report, to show what the CLI adds.

    .venv/bin/python -m benchmarks.bench_fold            # writes benchmarks/results/fold.json and fold.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

MODELS = {
    "minilm_l6_v2": ROOT.parent / "shared" / "models" / "minilm_l6_v2.onnx",
    "mobilenet_v2": ROOT.parent / "shared" / "models" / "mobilenet_v2_1.0_224.onnx",
    "light_resnet50": LIGHT / "light_resnet50.onnx",
    "light_inception_v2": LIGHT / "light_inception_v2.onnx",
}

API_SCRIPT = ("import sys, graphpress as gp; m = gp.load(sys.argv[1]); "
              "gp.PassManager('fold').run(m); gp.save(m, sys.argv[2])")

TOOLS = {
    "graphpress": lambda src, dst: [str(BIN / "graphpress"), "optimize", str(src), "-p", "fold", "-o", str(dst)],
    "graphpress-api": lambda src, dst: [sys.executable, "-c", API_SCRIPT, str(src), str(dst)],
    "onnxslim": lambda src, dst: [str(BIN / "onnxslim"), str(src), str(dst)],
    "onnxsim": lambda src, dst: [str(BIN / "onnxsim"), str(src), str(dst)],
}


def timed(command: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds (user + system), peak RSS in KiB, error text or '') of one subprocess
    run under /usr/bin/time. CPU time is reported beside wall time because it is far less sensitive to
    other load on the machine."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "__usage=%M %U %S", *command], capture_output=True, text=True,
                          cwd=ROOT)
    wall = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    usage = next((line.split("=")[1].split() for line in lines if line.startswith("__usage=")), ["0", "0", "0"])
    messages = [line for line in lines if line.strip() and not line.startswith("__usage=")]
    error = "" if proc.returncode == 0 else (messages[-1] if messages else f"exit {proc.returncode}")[:300]
    return wall, float(usage[1]) + float(usage[2]), int(usage[0]), error


def file_bytes(path: Path) -> int:
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def output_error(original: Path, result: Path) -> float:
    """Largest relative output difference of `result` against `original` on random inputs."""
    import graphpress.ir as ir
    return ir.compare(ir.load(original), ir.load(result)).max_rel


def bench(repeats: int, models: list[str]) -> dict:
    from tqdm import tqdm

    from benchmarks.realdata import machine
    report = {"machine": machine(), "load_average_at_start": os.getloadavg(), "repeats": repeats, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(m, t, r) for r in range(repeats) for m in models for t in TOOLS]
        samples: dict[tuple[str, str], list[tuple[float, float, int, str]]] = {}
        for model, tool, _ in tqdm(runs, desc="fold benchmark", unit="run"):
            out = Path(tmp) / f"{model}.{tool}.onnx"
            samples.setdefault((model, tool), []).append(timed(TOOLS[tool](MODELS[model], out)))
        for model in models:
            source = MODELS[model]
            entry = {"input": {"nodes": len(onnx.load(source, load_external_data=False).graph.node),
                               "bytes": file_bytes(source)}, "tools": {}}
            for tool in TOOLS:
                runs_ = samples[(model, tool)]
                out = Path(tmp) / f"{model}.{tool}.onnx"
                errors = [e for *_, e in runs_ if e]
                if errors or not out.exists():
                    entry["tools"][tool] = {"error": errors[0] if errors else "no output"}
                    continue
                entry["tools"][tool] = {
                    "seconds": statistics.median(w for w, *_ in runs_),
                    "seconds_all": [round(w, 3) for w, *_ in runs_],
                    "cpu_seconds": statistics.median(c for _, c, _, _ in runs_),
                    "peak_rss_mb": max(p for _, _, p, _ in runs_) / 1024,
                    "nodes": len(onnx.load(out, load_external_data=False).graph.node),
                    "bytes": file_bytes(out),
                    "max_rel_output_error": output_error(source, out),
                }
            entry["ratios"] = ratios(entry["tools"])
            report["models"][model] = entry
    return report


def ratios(tools: dict) -> dict:
    """graphpress against each peer: time ratio (lower is better) and node difference (<= 0 is the goal)."""
    result = {}
    for ours in ("graphpress", "graphpress-api"):
        if "seconds" not in tools.get(ours, {}):
            continue
        for peer in ("onnxslim", "onnxsim"):
            if "seconds" not in tools.get(peer, {}):
                continue
            result[f"{ours}/{peer}"] = {
                "time_ratio": round(tools[ours]["seconds"] / tools[peer]["seconds"], 3),
                "cpu_time_ratio": round(tools[ours]["cpu_seconds"] / tools[peer]["cpu_seconds"], 3),
                "nodes_minus_peer": tools[ours]["nodes"] - tools[peer]["nodes"],
            }
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    panels = (("seconds", "wall time incl. start-up (s, median)"), ("cpu_seconds", "CPU time, user+sys (s, median)"),
              ("nodes", "nodes after"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
    width = 0.8 / len(TOOLS)
    for i, tool in enumerate(TOOLS):
        entries = [report["models"][m]["tools"].get(tool, {}) for m in models]
        xs = [j + i * width for j in range(len(models))]
        for ax, (key, _) in zip(axes, panels):
            ax.bar(xs, [e.get(key, 0) for e in entries], width, label=tool)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, rotation=15)
        ax.set_title(title)
    axes[-1].legend()
    load = ", ".join(f"{x:.1f}" for x in report["load_average_at_start"])
    fig.suptitle(f"fold vs onnxslim / onnxsim: {report['machine']}, load average at start {load}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    missing = [m for m in args.models if not MODELS[m].exists()]
    if missing:
        sys.exit(f"models not found: {', '.join(str(MODELS[m]) for m in missing)}")
    report = bench(args.repeats, args.models)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fold.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, RESULTS / "fold.png")
    for model, entry in report["models"].items():
        line = ", ".join(f"{t} {e['seconds']:.2f}s ({e['cpu_seconds']:.2f} cpu)/{e['nodes']}n" if "seconds" in e
                         else f"{t} error"
                         for t, e in entry["tools"].items())
        print(f"{model} ({entry['input']['nodes']} nodes): {line}")


if __name__ == "__main__":
    main()
