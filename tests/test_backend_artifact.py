"""Artifact integrity: checksums verified on load, damaged or incomplete artifacts refused, atomic writes."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest

from graphpress import runtime
from graphpress.backends import compile
from graphpress.errors import BackendError
from test_backend_models import conv_net


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return compile(conv_net(), "x86", tmp_path_factory.mktemp("art") / "conv", progress=False)


@pytest.fixture
def copy(artifact, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def test_metadata_lists_every_file_with_sha256(artifact):
    meta = json.loads((artifact / "metadata.json").read_text())
    assert set(meta["files"]) == {"lib.so", "model.onnx.gz"}
    assert all(len(digest) == 64 for digest in meta["files"].values())
    assert meta["target"]["name"] == "x86" and meta["target"]["config"]["kind"] == "llvm"
    assert {"graphpress", "tvm", "tvm_ffi", "onnx"} <= set(meta["versions"])


def test_tampered_library_is_refused(copy):
    lib = copy / "lib.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(BackendError, match="lib.so does not match its checksum"):
        runtime.load(copy)


def test_incomplete_artifacts_are_refused(copy):
    (copy / "model.onnx.gz").unlink()
    with pytest.raises(BackendError, match="incomplete artifact, model.onnx.gz is missing"):
        runtime.load(copy)
    (copy / "metadata.json").unlink()
    with pytest.raises(BackendError, match="no metadata.json"):
        runtime.load(copy)


def test_unexpected_file_and_damaged_metadata_are_refused(copy):
    (copy / "extra.so").write_bytes(b"x")
    with pytest.raises(BackendError, match="unexpected file.*extra.so"):
        runtime.load(copy)
    (copy / "extra.so").unlink()
    (copy / "metadata.json").write_text("{not json")
    with pytest.raises(BackendError, match="metadata.json is damaged"):
        runtime.load(copy)


def test_tampered_tar_is_refused(artifact, tmp_path):
    tar_path = tmp_path / "a.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ("metadata.json", "model.onnx.gz"):
            tar.add(artifact / name, arcname=name)
        lib = tmp_path / "lib.so"
        lib.write_bytes((artifact / "lib.so").read_bytes()[:-100])  # truncated library
        tar.add(lib, arcname="lib.so")
    with pytest.raises(BackendError, match="lib.so does not match its checksum"):
        runtime.load(tar_path)
    tar_path.write_bytes(b"garbage")
    with pytest.raises(BackendError, match="not an artifact"):
        runtime.load(tar_path)


def test_run_checks_inputs(artifact):
    model = runtime.load(artifact)
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(BackendError, match="missing \\['x'\\], unexpected \\['z'\\]"):
        model.run({"z": x})
    with pytest.raises(BackendError, match="must be float32, got float64"):
        model.run({"x": x.astype(np.float64)})
    with pytest.raises(BackendError, match="must have shape \\[1, 3, 16, 16\\]"):
        model.run({"x": np.zeros((2, 3, 16, 16), np.float32)})


def test_run_gives_the_same_result_for_aligned_unaligned_and_strided_inputs(artifact):
    """Aligned inputs go to TVM without a copy, others through a tensor reused across calls: every
    call must see its own input, no input is written, and each call's outputs are its own (copies,
    not views of memory a later call reuses)."""
    import onnxruntime as ort

    model = runtime.load(artifact)
    session = ort.InferenceSession(model.onnx_model_bytes(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    results = []
    for layout in ("aligned", "unaligned", "strided", "unaligned"):
        x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
        if layout == "unaligned":
            buffer = np.empty(x.size + 16, np.float32)
            offset = next(k for k in range(1, 16) if (buffer.ctypes.data + 4 * k) % 64)
            view = buffer[offset:offset + x.size].reshape(x.shape)
            view[...] = x
            x = view
            assert x.ctypes.data % 64
        elif layout == "strided":
            x = np.repeat(x, 2, axis=3)[..., ::2]
        before = x.copy()
        got = next(iter(model.run({"x": x}).values()))
        want = session.run(None, {"x": np.ascontiguousarray(x)})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(x, before)
        results.append((got, want))
    for got, want in results:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_overwrite_only_replaces_an_artifact(artifact, tmp_path):
    again = compile(conv_net(), "x86", artifact, progress=False)  # an earlier artifact is replaced
    runtime.load(again)
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(BackendError, match="not a graphpress artifact; refusing to overwrite"):
        compile(conv_net(), "x86", unrelated, progress=False)
    assert (unrelated / "notes.txt").read_text() == "keep me"


def test_foreign_architecture_artifact_is_refused_clearly(copy):
    meta_path = copy / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["target"]["arch"] = "aarch64"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="compiled for aarch64"):
        runtime.load(copy)


def test_run_refuses_indices_outside_the_table_a_gather_reads(tmp_path):
    """TVM's Gather reads past the table on a bad index (garbage or a crash); the artifact records the
    range each integer input may take, through a Cast, and `run` refuses the rest, naming the node."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    nodes = [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "ids32"], ["y"], name="embed", axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    compiled = runtime.load(compile(model, "x86", tmp_path / "gather", progress=False))
    assert compiled.inputs[0]["index_range"] == [-10, 9] and compiled.inputs[0]["indexes"] == "embed"
    ids = np.array([[0, 9, -1]], np.int64)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(compiled.run({"ids": ids})["y"], want)
    with pytest.raises(BackendError, match=r"'ids' holds 1 index\(es\) outside \[-10, 9\] \(e.g. 10\).*'embed'"):
        compiled.run({"ids": np.array([[0, 10, 3]], np.int64)})
