"""report.json and report.html: per-stage tables, plots, the search's trials and Pareto front."""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path

from ..textable import format_table, human_bytes, human_count

PLOTS = ("stages", "tradeoff")


def write_json(result: dict, path: Path) -> None:
    _atomic_write(path, json.dumps(result, indent=2, default=str).encode())


def stage_table(result: dict) -> str:
    """The per-stage table printed by the CLI and quoted in the README."""
    metric_name = result["metric_name"]
    rows = []
    base = result["stages"][0]
    for s in result["stages"]:
        rows.append([
            s["stage"], human_bytes(s["size_bytes"]), f"{s['size_bytes'] / base['size_bytes']:.3f}",
            human_count(s["parameters"]), human_count(s["macs"]),
            "-" if s["latency_ms"] is None else f"{s['latency_ms']:.3f}",
            "-" if s["metric"] is None else f"{s['metric']:.4f}",
        ])
    return format_table(["stage", "size", "size ratio", "params", "MACs", "latency ms", metric_name], rows)


def plot(result: dict, directory: Path) -> dict[str, Path]:
    """Draw the per-stage bars and the accuracy-vs-size trade-off; returns the PNG paths by name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = result["stages"]
    names = [s["stage"] for s in stages]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, label in zip(axes, ("size_bytes", "macs", "latency_ms", "metric"),
                              ("size (MB)", "MACs (M)", "latency (ms)", result["metric_name"])):
        scale = {"size_bytes": 1e6, "macs": 1e6}.get(key, 1)
        values = [(s[key] or 0) / scale for s in stages]
        ax.bar(names, values, color="#4a7ab5")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
        if key == "metric":
            low = min(v for v in values if v) if any(values) else 0
            ax.set_ylim(max(0.0, low - 0.05), max(values) + 0.01)
    fig.suptitle(f"{result['model']}: per stage ({result['machine']})", fontsize=9)
    fig.tight_layout()
    paths = {"stages": directory / "stages.png"}
    fig.savefig(paths["stages"], dpi=90)
    plt.close(fig)

    trials = result["search"]["trials"]
    front = result["search"]["pareto_front"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([t["size_bytes"] / 1e6 for t in trials], [t["metric"] for t in trials], c="#999", label="tried")
    ax.plot([t["size_bytes"] / 1e6 for t in front], [t["metric"] for t in front], "o-", c="#c33",
            label="Pareto front")
    ax.axhline(result["metric_floor"], ls="--", c="#555", label=f"budget floor {result['metric_floor']:.4f}")
    ax.set_xlabel("ONNX size (MB)")
    ax.set_ylabel(result["metric_name"])
    ax.set_title("accuracy vs size over the search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["tradeoff"] = directory / "tradeoff.png"
    fig.savefig(paths["tradeoff"], dpi=90)
    plt.close(fig)
    return paths


def write_html(result: dict, plots: dict[str, Path], path: Path) -> None:
    images = "".join(f'<img alt="{name}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"/>' for name, p in plots.items())
    trials = format_table(["stage", "pipeline", "size", result["metric_name"], "accepted"],
                          [[t["stage"], t["pipeline"], human_bytes(t["size_bytes"]), f"{t['metric']:.4f}",
                            "yes" if t["accepted"] else ""] for t in result["search"]["trials"]])
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>graphpress report: {html.escape(result['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}} pre{{background:#f4f4f4;padding:1em}}
img{{max-width:100%;display:block;margin:1em 0}}</style></head><body>
<h1>graphpress compress: {html.escape(result['model'])}</h1>
<p>Final pipeline: <code>{html.escape(result['pipeline'])}</code>. Metric: {html.escape(result['metric_name'])}
(float {result['float_metric']:.4f}, budget {result['budget']:.4f}, floor {result['metric_floor']:.4f}).
Latency: batch 1, {result['threads']} thread(s), median of repeated runs. Machine: {html.escape(result['machine'])}.</p>
<h2>Per stage</h2><pre>{html.escape(stage_table(result))}</pre>
{images}
<h2>Search trials</h2><pre>{html.escape(trials)}</pre>
</body></html>"""
    _atomic_write(path, body.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
