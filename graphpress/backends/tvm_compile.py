"""ONNX -> Relax -> compiled library -> artifact, through Apache TVM 0.27.

    graphpress.backends.compile("model.onnx", "x86", "out/model-x86")

Steps: take the model (a path, an `onnx.ModelProto`, or a graphpress IR model), optionally run a
graphpress pass pipeline on it, fix every input shape (symbolic dimensions are bound to 1, the
batch-1 deployment case, unless `shapes` says otherwise), import it with
`relax.frontend.onnx`, lower it (operator legalization and fusion), apply tuned schedules from a
MetaSchedule database if one is given, let `tvm.compile` finish (for cuda: DLight GPU schedules,
and PTX through the local nvcc), and write the artifact atomically.

Ops TVM cannot import are reported with the op and node named before any compilation starts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from tqdm import tqdm

from ..errors import BackendError, GraphpressError
from . import targets as targets_mod
from ._tvm import summarize
from .artifact import LIBRARY, ArtifactWriter, sha256
from .index_bounds import gather_index_bounds

#: TVM's ONNX importer handles these op types itself rather than through its converter table
_DIRECTLY_IMPORTED = {"If", "Constant"}
ORT_HINT = "the ONNX model still runs in onnxruntime"


@dataclass
class TensorSpec:
    """Name, shape (ints; a str for a dimension only known at run time) and numpy dtype name."""

    name: str
    shape: list
    dtype: str


def compile(model, target: str | None = "x86", output: str | os.PathLike | None = None,
            pipeline: str | None = None, *, arch: str | None = None, target_json: str | dict | None = None,
            shapes: dict[str, list[int]] | None = None, tuning_db: str | os.PathLike | None = None,
            progress: bool = True) -> Path:
    """Compile `model` for `target` into an artifact; return the artifact's path.

    `model`: path, `onnx.ModelProto`, or graphpress IR model. `target`: a name from
    `targets.target_names()` (with `arch` for cuda), or None with `target_json` (a raw TVM target
    dict). `output`: artifact directory, or a path ending in `.tar`; default `<model>-<target>` in
    the current directory. `pipeline`: graphpress passes to run first, e.g. "fold". `shapes`:
    input name -> full shape, for inputs with symbolic dimensions. `tuning_db`: a directory
    written by `graphpress tune` for the same model and target.
    """
    spec = targets_mod.resolve(None if target_json is not None else target, arch, target_json)
    started = time.perf_counter()
    steps = ["load", "import", "lower", "codegen", "write"]
    with tqdm(total=len(steps), desc="compile", unit="step", disable=None if progress else True, leave=False) as bar:
        bar.set_postfix_str("load")
        proto, where, source = load_onnx(model, pipeline)
        output = Path(output) if output is not None else Path(f"{_stem(model)}-{spec.name}")
        bar.update()
        bar.set_postfix_str("import")
        inputs, bound = input_specs(proto, shapes, where)
        index_bounds = gather_index_bounds(proto)
        mod = import_relax(proto, inputs, where)
        outputs = output_specs(mod, proto)
        bar.update()
        bar.set_postfix_str("lower")
        tvm_target = spec.tvm_target()
        tuning = None
        with tvm_failures(where, spec):
            mod = lower(mod, tvm_target)
            if tuning_db is not None:
                from .tuning import apply_database

                mod, tuning = apply_database(mod, spec, tuning_db)
        bar.update()
        bar.set_postfix_str("codegen")
        executable = build(mod, spec, tvm_target, where)
        bar.update()
        bar.set_postfix_str("write")
        with ArtifactWriter(output) as writer:
            export(executable, spec, writer.path(LIBRARY))
            writer.write_model(proto.SerializeToString())
            path = writer.commit({
                "inputs": [dict(asdict(t), **_index_bound(t.name, index_bounds)) for t in inputs],
                "outputs": [asdict(t) for t in outputs],
                "bound_dims": bound,
                "target": {"name": spec.name, "kind": spec.kind, "arch": spec.arch, "config": spec.config},
                "pipeline": pipeline,
                "tuning": tuning,
                "source": source,
                "versions": versions(),
                "compile_seconds": round(time.perf_counter() - started, 3),
            })
        bar.update()
    return path


def load_onnx(model, pipeline: str | None) -> tuple[onnx.ModelProto, str, dict]:
    """The ModelProto to compile, a name for messages, and where it came from (path and sha256)."""
    from ..ir.io import check_opsets, load_proto

    source = {"path": None, "sha256": None}
    if isinstance(model, (str, os.PathLike)):
        where = str(model)
        source = {"path": str(Path(model).resolve()), "sha256": sha256(Path(model)) if Path(model).is_file() else None}
        proto = load_proto(model)
        check_opsets(proto, where)
    elif isinstance(model, onnx.ModelProto):
        where, proto = "the given ModelProto", model
    elif hasattr(model, "to_onnx"):
        where, proto = "the given model", model.to_onnx()
    else:
        raise BackendError(f"cannot compile a {type(model).__name__}: give a path, an onnx.ModelProto or a graphpress model")
    if pipeline:
        from ..ir import load
        from ..passes import run_pipeline

        proto = run_pipeline(load(proto), pipeline).to_onnx()
    return proto, where, source


def _index_bound(name: str, bounds: dict) -> dict:
    """{"index_range": [low, high], "indexes": Gather node} for an input that indexes a table, else {}."""
    return {"index_range": bounds[name]["range"], "indexes": bounds[name]["node"]} if name in bounds else {}


def input_specs(proto: onnx.ModelProto, shapes: dict | None, where: str) -> tuple[list[TensorSpec], dict]:
    """Graph inputs (initializers excluded) with every dimension fixed; and the symbolic dims bound."""
    from ..ir.execute import fed_inputs

    shapes = dict(shapes or {})
    specs, bound = [], {}
    for value in fed_inputs(proto):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise BackendError(f"{where}: input {value.name!r} is not a tensor; TVM artifacts take tensor inputs only")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        given = shapes.pop(value.name, None)
        if given is not None:
            shape = _check_given_shape(value.name, declared, list(given), where)
        else:
            shape = []
            for dim in declared:
                if isinstance(dim, str):
                    bound[dim] = 1
                shape.append(1 if isinstance(dim, str) else dim)
        specs.append(TensorSpec(value.name, shape, dtype))
    if shapes:
        known = ", ".join(s.name for s in specs)
        raise BackendError(f"{where}: shape given for unknown input(s) {', '.join(shapes)}; the inputs are {known}")
    return specs, bound


def _check_given_shape(name: str, declared: list, given: list, where: str) -> list[int]:
    if len(given) != len(declared):
        raise BackendError(f"{where}: input {name!r} has rank {len(declared)} {declared}, but shape {given} was given")
    for want, got in zip(declared, given):
        if not isinstance(got, int) or got < 1 or (isinstance(want, int) and want not in (0, got)):
            raise BackendError(f"{where}: shape {given} does not fit input {name!r} declared as {declared}")
    return given


def unsupported_nodes(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node name, op) of every top-level node TVM's ONNX importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    convert_map = _get_convert_map()
    return [(node.name or f"#{i}", node.op_type) for i, node in enumerate(proto.graph.node)
            if node.op_type not in convert_map and node.op_type not in _DIRECTLY_IMPORTED]


def import_relax(proto: onnx.ModelProto, inputs: list[TensorSpec], where: str):
    """Import into a Relax IRModule with weights as constants; errors name the op and node."""
    missing = unsupported_nodes(proto)
    if missing:
        ops = sorted({op for _, op in missing})
        name, op = missing[0]
        more = f" and {len(missing) - 1} more node(s)" if len(missing) > 1 else ""
        raise BackendError(f"{where}: TVM 0.27 cannot import op {op} (node {name!r}{more}; unsupported ops: "
                           f"{', '.join(ops)}); {ORT_HINT}")
    proto = _sums_as_adds(_sub_byte_widened(_constant_shapes_folded(proto)))
    importer = _importer_class()(shape_dict={t.name: t.shape for t in inputs},
                               dtype_dict={t.name: t.dtype for t in inputs}, keep_params_in_input=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the importer prints its inputs on failure
            return importer.from_onnx(proto.graph, opset)
    except GraphpressError:
        raise
    except Exception as exc:  # the importer raises whatever its converters raise
        raise BackendError(f"{where}: TVM could not import the model ({summarize(exc)}); {ORT_HINT}") from exc


def _constant_shapes_folded(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` with every ConstantOfShape whose shape is a constant replaced by a Constant.

    Works around TVM 0.27's importer, which fails on ConstantOfShape with an empty shape (a scalar
    output, as in exported BERT-style attention masks): it broadcasts the 1-element `value` to rank 0.
    """
    constants = {t.name: t for t in proto.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in proto.graph.node
                      if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    replacements = {}
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "ConstantOfShape" or node.input[0] not in constants:
            continue
        shape = onnx.numpy_helper.to_array(constants[node.input[0]]).astype(np.int64)
        value = next((onnx.numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                     np.zeros(1, np.float32))
        tensor = onnx.numpy_helper.from_array(np.full(tuple(shape), value.reshape(()), value.dtype), node.output[0])
        replacements[i] = onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name, value=tensor)
    return _with_replaced(proto, "node", replacements)


def _with_replaced(proto: onnx.ModelProto, field: str, replacements: dict) -> onnx.ModelProto:
    """A copy of `proto` with `graph.<field>[i]` replaced by each given message; `proto` itself if none."""
    if not replacements:
        return proto
    edited = onnx.ModelProto()
    edited.CopyFrom(proto)
    for i, message in replacements.items():
        getattr(edited.graph, field)[i].CopyFrom(message)
    return edited


def _sums_as_adds(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` with every top-level Sum of n >= 2 inputs written as n - 1 Adds (opset >= 8,
    where both broadcast alike).

    TVM 0.27 imports Sum as `stack` along a new leading axis, `sum` over it and `broadcast_to`: a
    rank-5 tensor that its layout conversion rejects for the whole module ("Invalid SLayout"), which
    left the light ResNet-50's convolutions in NCHW, where graphpress' CPU schedules do not apply
    (30x slower than onnxruntime). Adds take the layout and fuse into the convolution before them.
    """
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < 8 or not any(n.op_type == "Sum" and len(n.input) > 1 for n in proto.graph.node):
        return proto
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            nodes.append(node)
            continue
        total = node.input[0]
        for i, term in enumerate(node.input[1:], 1):
            out = node.output[0] if i == len(node.input) - 1 else f"{node.output[0]}__partial_sum{i}"
            nodes.append(onnx.helper.make_node("Add", [total, term], [out], name=f"{node.name}__add{i}"))
            total = out
    edited = onnx.ModelProto()
    edited.CopyFrom(proto)
    del edited.graph.node[:]
    edited.graph.node.extend(nodes)
    return edited


#: 4-bit initializer types and the 8-bit types that hold the same values
_WIDER = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.UINT4: np.uint8}


def _sub_byte_widened(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose INT4/UINT4 initializers (4-bit weights and their zero points) are stored
    in 8 bits, same values: TVM 0.27 copies them as one byte per value and fails on the packed data.
    DequantizeLinear computes the same floats from either, and the int8 lowering then applies."""
    return _with_replaced(proto, "initializer", {
        i: onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(_WIDER[t.data_type]), t.name)
        for i, t in enumerate(proto.graph.initializer) if t.data_type in _WIDER})


@functools.lru_cache(maxsize=1)
def _importer_class():
    """TVM's ONNX importer, subclassed so that per-node conversion errors name the op and the node."""
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    class NamingImporter(ONNXGraphImporter):
        def _convert_operator(self, op_name, inputs, attrs, opset):
            try:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            except GraphpressError:
                raise
            except Exception as exc:  # converters raise ValueError, TVMError, AssertionError...
                node = attrs.get("tvm_custom", {}).get("name") or "(unnamed)"
                raise BackendError(f"TVM cannot convert op {op_name} at node {node!r} "
                                   f"({summarize(exc)}); {ORT_HINT}") from exc

    return NamingImporter


def output_specs(mod, proto: onnx.ModelProto) -> list[TensorSpec]:
    """Output names from the ONNX graph, shapes and dtypes from the imported Relax `main`."""
    from tvm import relax

    info = mod["main"].ret_ty
    fields = list(info.fields) if isinstance(info, relax.TupleType) else [info]
    names = [o.name for o in proto.graph.output]
    if len(fields) != len(names):
        raise BackendError(f"TVM's import returns {len(fields)} outputs for the model's {len(names)}")
    specs = []
    for name, field in zip(names, fields):
        shape = [int(d) if hasattr(d, "value") else str(d) for d in field.shape.values] if field.shape is not None else []
        specs.append(TensorSpec(name, shape, str(field.dtype)))
    return specs


def lower(mod, target):
    """Legalize and fuse operators: the module that tuning extracts tasks from and databases apply to."""
    import tvm
    from tvm import relax

    if target.kind.name == "llvm":  # graphpress' CPU layer: channels-last layout and fusion (backends/cpu)
        from .cpu import prepare

        return prepare(mod, target)
    with target:
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
        ])(mod)


def build(mod, spec: targets_mod.TargetSpec, target, where: str):
    """`tvm.compile` the lowered module; for cuda with PTX device code from nvcc."""
    import tvm

    from . import cuda

    codegen = cuda.device_codegen(spec.config["arch"]) if spec.kind == "cuda" else contextlib.nullcontext()
    with tvm_failures(where, spec):
        if spec.kind == "llvm":  # default schedules for every function a tuning database did not schedule
            from .cpu import schedule

            mod = schedule(mod, target)
        with codegen:
            return tvm.compile(mod, target=target)


@contextlib.contextmanager
def tvm_failures(where: str, spec: targets_mod.TargetSpec):
    """Turn exceptions raised inside TVM (TVMError subclasses, ValueError...) into one-line BackendErrors."""
    try:
        yield
    except GraphpressError:
        raise
    except Exception as exc:  # whatever TVM's passes and codegen raise
        raise BackendError(f"{where}: TVM failed to compile for {spec.name} ({summarize(exc)}); {ORT_HINT}") from exc


def export(executable, spec: targets_mod.TargetSpec, path: Path) -> None:
    """Write the shared library, cross-linking with the target's g++ when it is another architecture."""
    from tvm.support import cc

    if spec.arch == platform.machine():
        executable.export_library(str(path))
        return
    linker = f"{spec.triple}-g++"
    if shutil.which(linker) is None:
        raise BackendError(f"linking a {spec.arch} artifact needs {linker} "
                           f"(Debian/Ubuntu: apt-get install g++-{spec.triple.replace('_', '-')})")
    executable.export_library(str(path), fcompile=cc.cross_compiler(linker))


def versions() -> dict:
    import tvm
    import tvm_ffi

    from .. import __version__

    return {"graphpress": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
            "onnx": onnx.__version__, "python": platform.python_version()}


def _stem(model) -> str:
    return Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
