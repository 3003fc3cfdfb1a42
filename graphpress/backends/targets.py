"""Named compilation targets and their TVM target dictionaries.

TVM 0.27 takes targets as JSON-like dicts and silently accepts an unknown `mcpu` (it falls back to a
generic CPU and produces slow code), so every CPU name is checked here against LLVM's own list for
the target triple, and CUDA architectures against what the local `nvcc` can generate.

Named targets:
- `x86`: this machine's CPU as LLVM names it; the AVX-512 / VNNI features are switched on or off to
  match `/proc/cpuinfo` (virtual machines often hide features their CPU model implies).
- `x86-64-v3`: any x86-64 CPU with AVX2/FMA (Haswell, Zen and later): portable between machines.
- `aarch64`: 64-bit ARM with NEON (every ARMv8-A core), Linux.
- `aarch64-dotprod`: ARMv8.2-A with the SDOT/UDOT int8 dot-product instructions (Cortex-A55/A75+).
- `cuda`: NVIDIA GPU, architecture from `arch` (default sm_80); host code for this machine's CPU.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import BackendError
from ._tvm import summarize

X86_TRIPLE = "x86_64-linux-gnu"
AARCH64_TRIPLE = "aarch64-linux-gnu"
DEFAULT_CUDA_ARCH = "sm_80"

#: /proc/cpuinfo flag -> LLVM feature, for the vector features whose presence decides code quality
_X86_VECTOR_FEATURES = {
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16",
    "avx_vnni": "avxvnni",
}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: its name (or "custom" for raw JSON) and the TVM target dict."""

    name: str
    config: dict = field(hash=False)

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def host_config(self) -> dict:
        """The CPU part: the target itself for llvm, its `host` for cuda."""
        return self.config.get("host", {"kind": "llvm"}) if self.kind == "cuda" else self.config

    @property
    def triple(self) -> str:
        return self.host_config.get("mtriple", X86_TRIPLE)

    @property
    def arch(self) -> str:
        """The CPU architecture host code is compiled for: "x86_64" or "aarch64"."""
        return self.triple.split("-")[0]

    def runs_here(self) -> bool:
        """Whether this machine can execute the artifact directly (same ISA, no GPU needed)."""
        return self.kind == "llvm" and self.arch == platform.machine()

    def tvm_target(self):
        """The `tvm.target.Target`; raises BackendError when TVM rejects the dict."""
        import tvm

        try:
            return tvm.target.Target(self.config)
        except Exception as exc:  # TVM raises ValueError/TypeError/TVMError for bad dicts
            raise BackendError(f"target {json.dumps(self.config)}: TVM rejects it ({summarize(exc)})") from exc


def target_names() -> list[str]:
    return list(_NAMED)


def resolve(name: str | None = None, arch: str | None = None, target_json: str | dict | None = None) -> TargetSpec:
    """Turn a target name (plus `arch` for cuda) or a raw TVM target dict into a validated TargetSpec."""
    if (name is None) == (target_json is None):
        raise BackendError("give exactly one of a target name or a raw target JSON")
    if target_json is not None:
        if arch is not None:
            raise BackendError("--arch does not apply to --target-json; put \"arch\" in the JSON")
        config = _parse_json(target_json)
        spec = TargetSpec("custom", config)
    else:
        if name not in _NAMED:
            raise BackendError(f"unknown target {name!r}; known targets: {', '.join(_NAMED)}")
        if arch is not None and name != "cuda":
            raise BackendError(f"--arch applies to the cuda target only, not {name!r} (use --target-json for a CPU)")
        spec = TargetSpec(name, _NAMED[name](arch))
    validate(spec.config)
    return spec


def validate(config: dict) -> None:
    """Check kind, CPU name and CUDA arch: the things TVM would accept silently or fail on late."""
    kind = config.get("kind")
    if kind not in ("llvm", "cuda"):
        raise BackendError(f"target kind {kind!r} is not supported; graphpress builds for 'llvm' (CPU) and 'cuda'")
    if kind == "cuda":
        _check_cuda_arch(config.get("arch"))
        host = config.get("host", {"kind": "llvm"})
        if not isinstance(host, dict) or host.get("kind") != "llvm":
            raise BackendError("a cuda target's host must be an llvm target dict")
        _check_cpu(host)
    else:
        _check_cpu(config)


def _parse_json(target_json: str | dict) -> dict:
    if isinstance(target_json, dict):
        return dict(target_json)
    text = target_json
    if not text.lstrip().startswith("{") and Path(text).is_file():
        text = Path(text).read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackendError(f"--target-json is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    if not isinstance(config, dict):
        raise BackendError("--target-json must be a JSON object such as {\"kind\": \"llvm\", \"mcpu\": \"znver4\"}")
    return config


def _check_cpu(config: dict) -> None:
    import tvm.target.codegen as codegen

    cpu = config.get("mcpu")
    if cpu is None:
        return
    triple = config.get("mtriple", X86_TRIPLE)
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        probe = {"kind": "llvm", "mtriple": triple}
        import tvm

        known = sorted(codegen.llvm_get_cpu_archlist(tvm.target.Target(probe)))
        raise BackendError(
            f"CPU {cpu!r} is unknown to LLVM for {triple} (TVM would silently fall back to a generic CPU); "
            f"known: {', '.join(known)}"
        )


def _check_cuda_arch(arch) -> None:
    if not isinstance(arch, str) or not arch.startswith("sm_"):
        raise BackendError(f"cuda arch must look like sm_80 or sm_90, got {arch!r}")
    supported = nvcc_archs()
    if supported and arch not in supported:
        raise BackendError(f"cuda arch {arch!r} is not supported by the local nvcc; it supports {', '.join(supported)}")


@lru_cache(maxsize=1)
def nvcc_archs() -> tuple[str, ...]:
    """GPU architectures the local nvcc generates code for (empty when nvcc is absent)."""
    if shutil.which("nvcc") is None:
        return ()
    out = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True, check=False)
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip().startswith("sm_"))


def host_x86() -> dict:
    """This machine's CPU for LLVM, with vector features corrected to what the OS reports."""
    import tvm
    import tvm.target.codegen as codegen

    config = {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": codegen.llvm_get_system_cpu()}
    flags = _cpuinfo_flags()
    if flags:
        implied = set(codegen.llvm_get_cpu_features(tvm.target.Target(config)))
        mattr = []
        for flag, feature in _X86_VECTOR_FEATURES.items():
            if flag in flags and feature not in implied:
                mattr.append("+" + feature)
            elif flag not in flags and feature in implied:
                mattr.append("-" + feature)
        if mattr:
            config["mattr"] = mattr
    return config


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _x86(arch: str | None) -> dict:
    return host_x86()


def _x86_64_v3(arch: str | None) -> dict:
    return {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": "x86-64-v3"}


def _aarch64(arch: str | None) -> dict:
    return {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": "generic", "mattr": ["+neon"]}


def _aarch64_dotprod(arch: str | None) -> dict:
    return {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": "generic", "mattr": ["+v8.2a", "+neon", "+dotprod"]}


def _cuda(arch: str | None) -> dict:
    return {"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH, "host": host_x86()}


_NAMED = {
    "x86": _x86,
    "x86-64-v3": _x86_64_v3,
    "aarch64": _aarch64,
    "aarch64-dotprod": _aarch64_dotprod,
    "cuda": _cuda,
}
