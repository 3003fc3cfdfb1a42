"""The backend subcommands of the `graphpress` CLI: compile, run, bench, tune.

`register(subparsers)` adds them to the main parser; each handler takes the parsed arguments and
returns the exit status. Errors are raised as `GraphpressError`s, which the main CLI prints on one
line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .targets import target_names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `compile`, `run`, `bench` and `tune` to the CLI."""
    p = subparsers.add_parser("compile", help="compile an ONNX model with TVM into an artifact",
                              description="Compile MODEL with Apache TVM into an artifact directory (or .tar).")
    p.add_argument("model", help="ONNX model file")
    _add_target_args(p)
    p.add_argument("--pipeline", help="graphpress passes to run first, e.g. 'fold'")
    p.add_argument("--tuning-db", help="database written by `graphpress tune` for this model and target")
    p.add_argument("-o", "--output", required=True, help="artifact directory, or a path ending in .tar")
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("run", help="run an artifact on inputs from an .npz file")
    p.add_argument("artifact")
    p.add_argument("--inputs", required=True, help=".npz file with one array per model input, by name")
    p.add_argument("-o", "--output", help="write the outputs to this .npz (default: print a summary)")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("bench", help="latency of an artifact next to onnxruntime on the same ONNX")
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, help="threads for both (default: TVM_NUM_THREADS or TVM's default)")
    p.add_argument("--repeat", type=int, default=50, help="timed runs at least (default 50, and at least 1 s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser("tune", help="tune a model with MetaSchedule into a reusable database")
    p.add_argument("model", help="ONNX model file")
    _add_target_args(p)
    p.add_argument("--trials", type=int, required=True, help="measured candidates in total")
    p.add_argument("-o", "--output", required=True, help="database directory (created, or extended)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure through the TVM RPC tracker at HOST:PORT")
    p.add_argument("--key", help="device key registered with the tracker")
    p.set_defaults(func=cmd_tune)


def _add_target_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", choices=target_names(), help="named target")
    which.add_argument("--target-json", help="a raw TVM target as JSON (or a file holding it)")
    p.add_argument("--arch", help="GPU architecture for --target cuda, e.g. sm_80 or sm_90")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="fix the shape of an input with symbolic dimensions (default: those dimensions are 1)")


def _shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            values = [int(d) for d in dims.split(",")]
        except ValueError:
            values = None
        if not sep or not name or values is None:
            raise BackendError(f"--shape {item!r}: expected NAME=D0,D1,... with integer dimensions")
        shapes[name] = values
    return shapes


def cmd_compile(args: argparse.Namespace) -> int:
    from .tvm_compile import compile

    path = compile(args.model, args.target, args.output, args.pipeline, arch=args.arch,
                   target_json=args.target_json, shapes=_shapes(args.shape), tuning_db=args.tuning_db)
    meta = json.loads((path / "metadata.json").read_text()) if path.is_dir() else None
    took = f" in {meta['compile_seconds']:.1f} s" if meta else ""
    print(f"wrote {path}{took}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..runtime import load

    model = load(args.artifact)
    outputs = model.run(_read_npz(Path(args.inputs)))
    if args.output:
        _write_npz(Path(args.output), outputs)
        print(f"wrote {args.output}")
    else:
        for name, value in outputs.items():
            print(f"{name}: {value.dtype} {list(value.shape)} min {value.min():.6g} max {value.max():.6g}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .timing import bench_artifact

    result = bench_artifact(args.artifact, args.threads, args.repeat)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['artifact']} ({result['target']}), batch as compiled, {result['threads']} thread(s):")
    for name in ("tvm", "onnxruntime"):
        r = result[name]
        print(f"  {name:12s} median {r['median_ms']:9.3f} ms   p90 {r['p90_ms']:9.3f} ms   ({r['runs']} runs)")
    print(f"  TVM / onnxruntime median: {result['tvm_over_onnxruntime']:.2f}x")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .tuning import tuned_is_faster, tune

    info = tune(args.model, args.target, args.trials, args.output, arch=args.arch, target_json=args.target_json,
                shapes=_shapes(args.shape), rpc=args.rpc, key=args.key)
    faster = sum(map(tuned_is_faster, info["tasks"]))
    print(f"wrote {args.output}: {info['trials']} measured trials for {info['target']['name']}; a tuned schedule "
          f"beat the default one for {faster} of {len(info['tasks'])} tasks "
          f"(use: graphpress compile {args.model} --tuning-db {args.output} ...)")
    return 0


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError as exc:
        raise BackendError(f"{path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path}: not a readable .npz file ({exc})") from exc


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a temporary file beside `path`, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
