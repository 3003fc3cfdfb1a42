"""Running an aarch64 artifact on an x86 machine: qemu-user plus an arm64 TVM runtime.

This is verification, not deployment: it shows that the cross-linked library loads and computes the
same numbers as the x86 build. Pieces:
- the arm64 `libtvm_runtime.so` and `libtvm_ffi.so`, taken from the aarch64 wheels of the installed
  TVM versions on PyPI (`pip download --platform manylinux_2_28_aarch64`; the manylinux2014 tag
  finds nothing for apache-tvm 0.27);
- `aarch64_loader/loader.cc`, compiled with `aarch64-linux-gnu-g++` against them;
- `qemu-aarch64 -L /usr/aarch64-linux-gnu` to execute it (Debian: g++-aarch64-linux-gnu qemu-user).
Downloads and builds are cached under `~/.cache/graphpress/aarch64-runtime/<versions>`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .artifact import open_artifact
from ._tvm import cache_dir

SYSROOT = Path("/usr/aarch64-linux-gnu")
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
LOADER_SOURCE = Path(__file__).parent / "aarch64_loader" / "loader.cc"
_RUNTIME_LIBS = {"apache_tvm": "tvm/lib/libtvm_runtime.so", "apache_tvm_ffi": "tvm_ffi/lib/libtvm_ffi.so"}


def missing_tools() -> str | None:
    """Why aarch64 artifacts cannot be run here, or None when they can."""
    absent = [tool for tool in (CXX, QEMU) if shutil.which(tool) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)"
    if not (SYSROOT / "lib").is_dir():
        return f"no aarch64 sysroot at {SYSROOT} (Debian: apt-get install libc6-arm64-cross)"
    return None


def _versions() -> tuple[str, str]:
    import tvm
    import tvm_ffi

    return tvm.__version__, tvm_ffi.__version__


def runtime_dir() -> Path:
    """A directory with the arm64 TVM runtime libraries and the loader built against them."""
    reason = missing_tools()
    if reason:
        raise BackendError(f"cannot run aarch64 artifacts here: {reason}")
    tvm_version, ffi_version = _versions()
    source_hash = hashlib.sha256(LOADER_SOURCE.read_bytes()).hexdigest()[:12]
    directory = cache_dir() / "aarch64-runtime" / f"tvm-{tvm_version}-ffi-{ffi_version}-loader-{source_hash}"
    if (directory / "loader").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory.parent))
    try:
        _fetch_runtime(staging, tvm_version, ffi_version)
        _build_loader(staging)
        os.rename(staging, directory)
    except OSError:
        if not (directory / "loader").is_file():  # a concurrent process may have won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _fetch_runtime(directory: Path, tvm_version: str, ffi_version: str) -> None:
    wheels = directory / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_aarch64", "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
           "--dest", str(wheels), f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackendError(f"cannot download the aarch64 TVM runtime wheels: {done.stderr.strip().splitlines()[-1:]}")
    for prefix, member in _RUNTIME_LIBS.items():
        wheel = next(wheels.glob(f"{prefix}-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            (directory / Path(member).name).write_bytes(src.read())
    shutil.rmtree(wheels)


def _build_loader(directory: Path) -> None:
    import tvm_ffi.libinfo

    include = tvm_ffi.libinfo.find_include_path()
    cmd = [CXX, "-std=c++17", "-O2", f"-I{include}", str(LOADER_SOURCE), f"-L{directory}",
           "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN", "-o", str(directory / "loader")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackendError(f"building the aarch64 loader failed: {done.stderr.strip()[-500:]}")


def run(artifact: str | os.PathLike, inputs: dict[str, np.ndarray], timeout: float = 600) -> dict[str, np.ndarray]:
    """Run an aarch64 artifact under qemu on named numpy inputs; return named numpy outputs."""
    opened = open_artifact(artifact)
    meta = opened.metadata
    if meta["target"]["arch"] != "aarch64":
        raise BackendError(f"{artifact}: compiled for {meta['target']['arch']}, not aarch64")
    loader = runtime_dir() / "loader"
    with tempfile.TemporaryDirectory(prefix="graphpress-qemu-") as tmp:
        args = []
        for spec in meta["inputs"]:
            array = np.ascontiguousarray(inputs[spec["name"]], dtype=spec["dtype"]).reshape(spec["shape"])
            path = Path(tmp) / f"in{len(args)}.bin"
            array.tofile(path)
            args.append(f"{path}:{spec['dtype']}:{','.join(str(d) for d in spec['shape'])}")
        prefix = str(Path(tmp) / "out")
        done = subprocess.run([QEMU, "-L", str(SYSROOT), str(loader), str(opened.library), prefix, *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise BackendError(f"{artifact}: the aarch64 run under qemu failed: {done.stderr.strip()[-500:]}")
        outputs = {}
        for line in done.stdout.splitlines():
            if not line.startswith("OUTPUT "):
                continue
            _, index, dtype, shape = line.split()
            data = np.fromfile(f"{prefix}{index}.bin", dtype=_numpy_dtype(dtype))
            outputs[meta["outputs"][int(index)]["name"]] = data.reshape([int(d) for d in shape.split(",") if d])
    if opened.tmp is not None:
        opened.tmp.cleanup()
    return outputs


def _numpy_dtype(tvm_dtype: str) -> np.dtype:
    return np.dtype("bool" if tvm_dtype == "bool" else tvm_dtype)
