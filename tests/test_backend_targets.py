"""Named targets map to validated TVM target dicts; bad CPU names and CUDA archs are refused."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from graphpress.backends import targets
from graphpress.errors import BackendError


def test_every_named_target_resolves_and_tvm_accepts_it():
    for name in targets.target_names():
        spec = targets.resolve(name)
        assert spec.tvm_target().kind.name == spec.kind


def test_x86_is_the_host_cpu_with_features_matching_cpuinfo():
    import tvm
    import tvm.target.codegen as codegen

    spec = targets.resolve("x86")
    assert spec.config["mcpu"] == codegen.llvm_get_system_cpu()
    assert spec.runs_here() == (platform.machine() == "x86_64")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare the feature list with")
    flags = next(line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    enabled = set(codegen.llvm_get_cpu_features(tvm.target.Target(spec.config)))
    for flag, feature in {"avx512f": "avx512f", "avx512_vnni": "avx512vnni", "avx2": "avx2"}.items():
        assert (flag in flags) == (feature in enabled), feature


def test_aarch64_targets():
    plain, dot = targets.resolve("aarch64"), targets.resolve("aarch64-dotprod")
    assert plain.arch == dot.arch == "aarch64" and plain.triple == "aarch64-linux-gnu"
    assert "+dotprod" in dot.config["mattr"] and "+dotprod" not in plain.config["mattr"]
    assert not plain.runs_here() or platform.machine() == "aarch64"


def test_cuda_arch_option_and_validation():
    spec = targets.resolve("cuda", arch="sm_90")
    assert spec.config["arch"] == "sm_90" and spec.config["host"]["kind"] == "llvm"
    assert targets.resolve("cuda").config["arch"] == targets.DEFAULT_CUDA_ARCH
    with pytest.raises(BackendError, match="must look like sm_80"):
        targets.resolve("cuda", arch="ampere")
    if targets.nvcc_archs():
        with pytest.raises(BackendError, match="not supported by the local nvcc"):
            targets.resolve("cuda", arch="sm_11")
    with pytest.raises(BackendError, match="--arch applies to the cuda target only"):
        targets.resolve("x86", arch="sm_80")


def test_invalid_cpu_names_are_rejected_not_silently_accepted():
    with pytest.raises(BackendError, match="CPU 'znver9' is unknown to LLVM for x86_64-linux-gnu.*znver3"):
        targets.resolve(target_json='{"kind": "llvm", "mcpu": "znver9"}')
    with pytest.raises(BackendError, match="CPU 'cortex-a99' is unknown to LLVM for aarch64-linux-gnu.*cortex-a76"):
        targets.resolve(target_json={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a99"})
    spec = targets.resolve(target_json='{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}')
    assert spec.name == "custom" and spec.arch == "aarch64"


def test_bad_requests():
    with pytest.raises(BackendError, match="unknown target 'arm'; known targets: x86"):
        targets.resolve("arm")
    with pytest.raises(BackendError, match="not valid JSON"):
        targets.resolve(target_json="{kind: llvm")
    with pytest.raises(BackendError, match="target kind 'vulkan' is not supported"):
        targets.resolve(target_json='{"kind": "vulkan"}')
    with pytest.raises(BackendError, match="exactly one"):
        targets.resolve("x86", target_json='{"kind": "llvm"}')
