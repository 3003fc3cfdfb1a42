"""The `graphpress` command: inspect, optimize, passes, demo, and the backend commands.

Errors a user can cause print one line (`graphpress: error: ...`) and exit with status 2; `--debug`
shows the traceback instead. The input model is only ever read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .calibration import add_calibration_options, calibration_from_args
from .errors import GraphpressError
from .textable import format_table, human_bytes, human_count

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphpress", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"graphpress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what passes do and skip")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="ops, parameters, size, MACs and I/O of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("optimize", help="run a pass pipeline over a model and write the result")
    p.add_argument("model")
    p.add_argument("-p", "--pipeline", required=True, help="e.g. 'fold,prune-channels(ratio=0.3)'")
    p.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    p.add_argument("--check", action="store_true", help="compare outputs with the input model")
    p.add_argument("--check-rtol", type=float, default=None,
                   help="with --check: exit 1 if any output differs by more than this (relative)")
    p.add_argument("--inputs", help=".npz of inputs for --check (default: generated from the input specs)")
    p.add_argument("--verify", action="store_true", help="run the onnx checker after every pass")
    p.add_argument("--calib", help="calibration data for passes that need it (insert-qdq, data-aware pruning/SVD): "
                                   "FILE.npz, a directory of .npy files, or a directory of images")
    add_calibration_options(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.add_argument("name", nargs="?", help="show one pass in full")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("compress", help="fold, prune, factorize, quantize and compile within an accuracy budget")
    p.add_argument("model")
    p.add_argument("--calib", required=True, help="calibration data: FILE.npz, a directory of .npy, or of images")
    add_calibration_options(p)
    p.add_argument("--eval", dest="eval_spec", metavar="MODULE:FUNCTION",
                   help="your metric: a function taking a runnable model (.run(inputs) -> outputs), higher is better")
    p.add_argument("--budget", default="1.0%", help="largest allowed metric drop: '1%%' or 0.01 (default 1.0%%)")
    p.add_argument("--target", default="x86", help="compile target for the artifact, or 'none' to skip compiling")
    p.add_argument("--threads", type=int, default=1, help="threads for latency measurements (default 1)")
    p.add_argument("--keep-names", action="store_true",
                   help="keep internal tensor/node names and shapes (default: the `compact` pass shortens them)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("demo", help="compress the bundled example model and print the per-stage table")
    p.add_argument("-o", "--output", default="graphpress-demo", help="where to write the demo's results")
    p.set_defaults(func=cmd_demo)

    _register_backend_commands(sub)
    return parser


def _register_backend_commands(sub) -> None:
    from .backends import commands
    commands.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except GraphpressError as exc:
        if args.debug:
            raise
        print(f"graphpress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("graphpress: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# ---- inspect ---------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from .ir import load
    from .summary import summarize
    summary = summarize(load(args.model))
    if args.json:
        print(json.dumps(summary.__dict__ | {"total_macs": summary.total_macs}, indent=2, default=str))
        return 0
    print(f"{args.model}: opset {summary.opset}, {summary.nodes} nodes, "
          f"{human_count(summary.parameters)} parameters, {human_bytes(summary.size_bytes)}, "
          f"{human_count(summary.total_macs)} MACs")
    print()
    print(format_table(["", "name", "dtype", "shape"],
                       [["input", *spec[:2], spec[2]] for spec in summary.inputs]
                       + [["output", *spec[:2], spec[2]] for spec in summary.outputs]))
    print()
    print(format_table(["op", "count", "MACs"],
                       [[op, n, human_count(summary.macs.get(op, 0))] for op, n in summary.ops.items()]))
    return 0


# ---- optimize --------------------------------------------------------------------------------------
def cmd_optimize(args) -> int:
    from .ir import compare_outputs, load, random_inputs, run, save
    from .passes import Checker, PassManager
    from .summary import summarize

    source, output = Path(args.model), Path(args.output)
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise GraphpressError(f"{output}: refusing to overwrite the input model; choose another -o")
    manager = PassManager(args.pipeline, instruments=[Checker()] if args.verify else [])
    model = load(source)
    reference = model.to_onnx() if args.check else None
    before = summarize(model, size_bytes=_file_size(source))
    start = time.perf_counter()
    manager.run(model, calibration=calibration_from_args(args, model))
    elapsed = time.perf_counter() - start
    save(model, output)
    print_pass_table(manager.records)
    print()
    print_before_after(before, summarize(model, size_bytes=_file_size(output)), elapsed)
    print(f"\nwrote {output}")
    if reference is None:
        return 0
    inputs = _load_npz(args.inputs) if args.inputs else random_inputs(reference)
    comparison = compare_outputs(run(reference, inputs), run(model, inputs))
    print(f"check against {source.name}: {comparison}")
    if args.check_rtol is not None and not comparison.within(args.check_rtol):
        print(f"graphpress: outputs differ by more than rtol {args.check_rtol}", file=sys.stderr)
        return 1
    return 0


def _file_size(path: Path) -> int:
    """A model file's size on disk, with its external-data file if it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def print_pass_table(records) -> None:
    rows = []
    for r in records:
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v not in (0, None, {}, []))
        rows.append([r.pipeline_form, f"{r.seconds * 1000:.1f}", "yes" if r.changed else "no",
                     f"{r.nodes_before}→{r.nodes_after}", stats])
    print(format_table(["pass", "ms", "changed", "nodes", "what"], rows))


def print_before_after(before, after, seconds: float) -> None:
    def ratio(a, b):
        return f"{b / a:.3f}x" if a else "-"

    rows = [
        ["nodes", before.nodes, after.nodes, ratio(before.nodes, after.nodes)],
        ["parameters", human_count(before.parameters), human_count(after.parameters),
         ratio(before.parameters, after.parameters)],
        ["size", human_bytes(before.size_bytes), human_bytes(after.size_bytes),
         ratio(before.size_bytes, after.size_bytes)],
        ["MACs", human_count(before.total_macs), human_count(after.total_macs),
         ratio(before.total_macs, after.total_macs)],
    ]
    print(format_table(["", "before", "after", "after/before"], rows))
    print(f"pipeline time {seconds:.2f} s")


def _load_npz(path: str) -> dict:
    import numpy as np
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise GraphpressError(f"{path}: cannot read inputs ({exc})") from exc


# ---- passes ----------------------------------------------------------------------------------------
def cmd_passes(args) -> int:
    from .passes import all_passes, get
    if args.name:
        cls = get(args.name)
        print(f"{cls.name}: {(cls.__doc__ or '').strip()}\n")
        _print_options(cls)
        return 0
    passes = all_passes()
    print(format_table(["pass", "what it does"], [[name, cls.summary()] for name, cls in passes.items()]))
    print("\noptions: graphpress passes NAME; pipelines: 'fold,prune-channels(ratio=0.3)', '(a,b)*5' repeats a group")
    return 0


def _print_options(cls) -> None:
    options = cls.options()
    if not options:
        print("no options")
        return
    print(format_table(["option", "type", "default", "help"],
                       [[o.key, o.type_name, o.default, o.help] for o in options]))


# ---- compress and demo ------------------------------------------------------------------------------
def parse_budget(text: str) -> float:
    """'1%' or '1.0%' -> 0.01; '0.01' -> 0.01 (an absolute drop of the metric)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise GraphpressError(f"--budget {text!r}: give a percentage like 1% or a number like 0.01") from None
    if value < 0:
        raise GraphpressError(f"--budget {text!r}: must not be negative")
    return value


def cmd_compress(args) -> int:
    from .compress import compress, load_evaluator
    from .ir import load
    evaluator = load_evaluator(args.eval_spec) if args.eval_spec else None
    budget = parse_budget(args.budget)
    calibration = calibration_from_args(args, load(args.model))
    result = compress(args.model, calibration, args.output, evaluator=evaluator, budget=budget,
                      target=None if args.target == "none" else args.target, threads=args.threads,
                      compact=not args.keep_names)
    _print_compress_result(result)
    return 0


def _print_compress_result(result: dict) -> None:
    from .compress.report import stage_table
    print(stage_table(result))
    print(f"\npipeline: {result['pipeline']}")
    if "compile_error" in result:
        print(f"no compiled artifact: {result['compile_error']}")
    print(f"wrote {Path(result['onnx']).parent}/ (model.onnx, report.json, report.html"
          f"{', artifact/' if 'artifact' in result else ''})")


def cmd_demo(args) -> int:
    from .compress import compress
    from .examples import evaluate_top1, example_data, example_model_path
    calibration, _, _ = example_data()
    print(f"graphpress demo: compressing the bundled {example_model_path().name} "
          f"(a CNN trained on scikit-learn's real 8x8 digits) within a 1-point top-1 budget\n", flush=True)
    result = compress(example_model_path(), calibration, args.output, evaluator=evaluate_top1, budget=0.01,
                      target="x86", threads=1, metric_name="top-1 (500 held-out digits)")
    _print_compress_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
