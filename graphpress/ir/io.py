"""Loading and saving models: from a path, bytes or a ModelProto; saved atomically.

Every way a model file can be wrong (missing, a directory, not protobuf, truncated, an opset newer
than the installed onnx understands) becomes a `ModelLoadError` naming the file and the problem.
The input file is only ever read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx.defs
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from ..errors import GraphpressError, ModelLoadError
from .model import Model

#: protobuf cannot serialize a message of 2 GiB or more; larger models keep their weights in a side file
PROTOBUF_LIMIT = 2**31 - 1
#: initializers at least this large go to the external-data file of a >2 GB model
EXTERNAL_DATA_THRESHOLD = 1024


def load(source: str | os.PathLike | bytes | onnx.ModelProto | Model) -> Model:
    """Load a model from a file path, serialized bytes, a ModelProto, or (a copy of) another Model."""
    if isinstance(source, Model):
        return source.copy()
    if isinstance(source, onnx.ModelProto):
        proto, where = source, "the given ModelProto"
    elif isinstance(source, (bytes, bytearray)):
        proto, where = _parse(bytes(source), "the given bytes"), "the given bytes"
    else:
        proto, where = load_proto(source), str(source)
    check_opsets(proto, where)
    try:
        return Model.from_onnx(proto)
    except Exception as exc:  # gs raises plain exceptions on malformed graphs
        raise ModelLoadError(f"{where}: the graph is malformed ({exc})") from exc


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and parse an ONNX file (with its external data) into a ModelProto, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from exc
    proto = _parse(data, str(path))
    if _uses_external_data(proto):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: its external data cannot be read ({exc})") from exc
    return proto


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{where}: the file is empty")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ModelLoadError(f"{where}: not an ONNX model, or truncated (protobuf: {exc})") from exc
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{where}: not an ONNX model (no graph or no opset_import)")
    return proto


def check_opsets(proto: onnx.ModelProto, where: str) -> None:
    """Refuse default-domain opsets the installed onnx cannot reason about."""
    supported = onnx.defs.onnx_opset_version()
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx") and not 1 <= entry.version <= supported:
            raise ModelLoadError(
                f"{where}: uses ONNX opset {entry.version}; the installed onnx {onnx.__version__} "
                f"handles opsets 1..{supported}"
            )


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(proto)
    )


def save(model: Model | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` to `path` atomically; models over 2 GB keep weights in `<name>.data` beside it.

    The file appears complete or not at all: it is written to a temporary file in the same directory
    and renamed over the target.
    """
    path = Path(path)
    proto = model.to_onnx() if isinstance(model, Model) else model
    if path.exists() and path.is_dir():
        raise GraphpressError(f"{path}: is a directory; give a file name for the model")
    path.parent.mkdir(parents=True, exist_ok=True)
    external = _tensor_bytes(proto) >= PROTOBUF_LIMIT
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if external:
            proto = _with_raw_data(proto)
            data_name = path.name + ".data"
            tmp_data = Path(tmp).with_suffix(".data.tmp")
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=EXTERNAL_DATA_THRESHOLD)
            # the model names its data file; rewrite it to the final name before the renames
            final = onnx.load_model(tmp, load_external_data=False)
            for tensor in onnx.external_data_helper._get_all_tensors(final):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(final, tmp)
            os.replace(path.parent / tmp_data.name, path.parent / data_name)
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _with_raw_data(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose tensors store `raw_data` (onnx moves only raw tensors to external data)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in onnx.external_data_helper._get_all_tensors(copy):
        if not tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
    return copy


def _tensor_bytes(proto: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in onnx.external_data_helper._get_all_tensors(proto))
