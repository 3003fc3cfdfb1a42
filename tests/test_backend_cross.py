"""Artifacts for other targets, checked as far as this machine allows.

aarch64: the cross-linked library is executed under qemu-aarch64 with the arm64 TVM runtime and its
outputs compared with the x86 build's. CUDA: the library's host module loads and carries PTX
device code for the requested architecture, which ptxas assembles; there is no GPU to run it on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from graphpress import runtime
from graphpress.backends import aarch64, compile
from graphpress.backends.timing import sample_inputs
from graphpress.errors import BackendError
from test_backend_models import assert_close, conv_net, real_model, two_output_net

pytestmark = pytest.mark.cross


@pytest.fixture(scope="module")
def qemu_runtime():
    reason = aarch64.missing_tools()
    if reason:
        print(f"skipping aarch64 execution: {reason}")
        pytest.skip(reason)
    try:
        return aarch64.runtime_dir()
    except BackendError as exc:  # e.g. no network for the aarch64 wheels
        print(f"skipping aarch64 execution: {exc}")
        pytest.skip(str(exc))


def _compare_with_x86(model, tmp_path, target: str, inputs_from=sample_inputs) -> None:
    arm = compile(model, target, tmp_path / target, progress=False)
    x86 = runtime.load(compile(model, "x86", tmp_path / "x86", progress=False))
    inputs = inputs_from(x86.inputs)
    on_arm = aarch64.run(arm, inputs)
    assert_close(on_arm, x86.run(inputs))


@pytest.mark.parametrize("target", ["aarch64", "aarch64-dotprod"])
def test_aarch64_graph_under_qemu_matches_x86(qemu_runtime, tmp_path, target):
    _compare_with_x86(conv_net(), tmp_path, target)


def test_aarch64_int_input_two_outputs_under_qemu(qemu_runtime, tmp_path):
    _compare_with_x86(two_output_net(), tmp_path, "aarch64",
                      lambda specs: {"ids": np.array([[0, 3, 9, 1], [2, 2, 5, 7]], np.int64)})


def test_aarch64_library_is_an_arm64_elf_and_refused_on_x86(tmp_path):
    if shutil.which(aarch64.CXX) is None:
        pytest.skip(f"{aarch64.CXX} not installed (Debian: apt-get install g++-aarch64-linux-gnu)")
    artifact = compile(conv_net(), "aarch64", tmp_path / "arm", progress=False)
    header = (artifact / "lib.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(BackendError, match="compiled for aarch64"):
        runtime.load(artifact)


@pytest.mark.slow
def test_aarch64_real_model_under_qemu(qemu_runtime, tmp_path):
    path = real_model("mobilenet_v2_1.0_224.onnx")
    _compare_with_x86(path, tmp_path, "aarch64",
                      lambda specs: {s["name"]: np.random.default_rng(0).uniform(-1, 1, s["shape"]).astype(np.float32)
                                     for s in specs})


_DEVICE_CODE_PROBE = """
import json, sys
from graphpress.backends import cuda
print(json.dumps(cuda.device_code(sys.argv[1])))
"""


def test_cuda_artifact_carries_ptx_and_its_host_module_loads(tmp_path):
    if shutil.which("nvcc") is None:
        print("skipping CUDA artifact test: nvcc not on PATH")
        pytest.skip("nvcc not on PATH (the CUDA toolkit is needed to produce device code)")
    artifact = compile(conv_net(), "cuda", tmp_path / "gpu", arch="sm_90", progress=False)
    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["target"]["config"]["arch"] == "sm_90" and meta["target"]["kind"] == "cuda"
    # in a process of its own: reading device code loads the CUDA driver (or its stand-in)
    probe = subprocess.run([sys.executable, "-c", _DEVICE_CODE_PROBE, str(artifact / "lib.so")],
                           capture_output=True, text=True, check=True)
    modules = json.loads(probe.stdout)
    assert [fmt for fmt, _ in modules] == ["ptx"]
    ptx = modules[0][1]
    assert ".target sm_90" in ptx and ".visible .entry" in ptx and "conv2d" in ptx
    if shutil.which("ptxas"):
        (tmp_path / "k.ptx").write_text(ptx)
        subprocess.run(["ptxas", "-arch=sm_90", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")], check=True)
        assert (tmp_path / "k.cubin").stat().st_size > 0
    with pytest.raises(BackendError, match="no usable CUDA device|compiled for an NVIDIA GPU"):
        runtime.load(artifact)
