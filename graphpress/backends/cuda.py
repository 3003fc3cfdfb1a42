"""CUDA device code on a build machine without a GPU.

TVM 0.27's CUDA support lives in a runtime plugin, `libtvm_runtime_cuda.so`, that links against the
driver library `libcuda.so.1`. Without a driver the plugin silently fails to load, and TVM then
stores only CUDA C *source* in the library, to be compiled on the GPU machine at load time (which
needs nvcc or NVRTC there). To ship compiled device code instead, this module:

1. loads the real `libcuda.so.1` if there is one, or else a stub built here from the plugin's own
   undefined `cu*` symbols (each returns CUDA_ERROR_STUB_LIBRARY; nothing is ever launched), so
   the plugin can load and register its codegen;
2. registers, for the duration of a build, the `tvm_callback_cuda_compile` hook that the plugin
   calls for every generated kernel file, compiling it to PTX for the target's `arch` with the
   local `nvcc`. PTX is what the driver JIT-compiles for that architecture and any newer one.

`device_code(lib)` reads the compiled device code back out of an exported library; run it in a
process of its own, since it also loads the driver (or stub) into the process.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import BackendError
from ._tvm import cache_dir, summarize

CUDA_ERROR_STUB_LIBRARY = 34
_CALLBACK = "tvm_callback_cuda_compile"


def ensure_runtime_plugin() -> None:
    """Load TVM's CUDA runtime plugin, with the real CUDA driver or a stub standing in for it."""
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(_driver_stub(runtime_dir / "libtvm_runtime_cuda.so")), mode=ctypes.RTLD_GLOBAL)
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError) as exc:
        raise BackendError(f"TVM's CUDA runtime plugin does not load ({summarize(exc)})") from exc


def _driver_stub(plugin: Path) -> Path:
    """Build (once) a `libcuda.so.1` defining every driver symbol the plugin imports."""
    stub = cache_dir() / "cuda-driver-stub" / "libcuda.so.1"
    if stub.exists():
        return stub
    for tool in ("nm", "cc"):
        if shutil.which(tool) is None:
            raise BackendError(f"compiling CUDA device code without a GPU driver needs `{tool}` (binutils/gcc)")
    listing = subprocess.run(["nm", "-D", "--undefined-only", str(plugin)], capture_output=True, text=True, check=True)
    symbols = sorted({line.split()[-1].split("@")[0] for line in listing.stdout.splitlines()
                      if line.split() and line.split()[-1].startswith("cu") and line.split()[-1][2:3].isupper()})
    source = "".join(f"int {name}(void) {{ return {CUDA_ERROR_STUB_LIBRARY}; }}\n" for name in symbols)
    stub.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=stub.parent) as tmp:
        (Path(tmp) / "stub.c").write_text(source)
        built = Path(tmp) / "libcuda.so.1"
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(built), str(Path(tmp) / "stub.c")],
                       check=True, capture_output=True)
        os.replace(built, stub)
    return stub


@contextmanager
def device_codegen(arch: str):
    """While active, TVM compiles CUDA kernels to PTX for `arch` with the local nvcc."""
    import tvm
    import tvm_ffi
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise BackendError("compiling for cuda needs nvcc on PATH (the CUDA toolkit) to produce device code")
    ensure_runtime_plugin()

    def compile_kernels(code: str) -> bytes:
        try:  # nvcc.compile_cuda reads the compute version from the current target
            with tvm.target.Target({"kind": "cuda", "arch": arch}):
                return bytes(nvcc.compile_cuda(code, target_format="ptx", arch=arch, compiler="nvcc"))
        except RuntimeError as exc:
            raise BackendError(f"nvcc failed on the generated CUDA kernels for {arch}: {summarize(exc)}") from exc

    previous = tvm_ffi.get_global_func(_CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(_CALLBACK, compile_kernels, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(_CALLBACK, previous, override=True)
        else:
            tvm_ffi.remove_global_func(_CALLBACK)


def device_code(library: str | os.PathLike) -> list[tuple[str, str]]:
    """Load an exported CUDA library's host module and return (format, code) of each device module.

    The format is "ptx" for compiled device code, "cuda" if only source was stored.
    """
    import tvm

    ensure_runtime_plugin()
    try:
        host = tvm.runtime.load_module(str(library))
    except Exception as exc:  # TVM raises RuntimeError/TVMError subclasses
        raise BackendError(f"{library}: the host module does not load ({summarize(exc)})") from exc
    found = []

    def walk(module) -> None:
        for child in module.imports:
            if child.kind == "cuda":
                ptx = child.inspect_source("ptx")
                found.append(("ptx", ptx) if ptx else ("cuda", child.inspect_source("cuda")))
            walk(child)

    walk(host)
    return found
