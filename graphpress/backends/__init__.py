"""Backends: compile ONNX models through Apache TVM into artifacts for x86, aarch64 and CUDA.

- `compile(model, target, output=None, pipeline=None, ...)`: write an artifact, return its path
- `targets.target_names()`, `targets.resolve(...)`: the named targets and their TVM target dicts
- `tuning.tune(...)`: MetaSchedule tuning into a database that `compile(tuning_db=...)` applies
- artifacts are run by `graphpress.runtime.load(path).run(inputs)`

TVM itself is imported lazily, inside the functions that need it.
"""

from .targets import TargetSpec, resolve as resolve_target, target_names
from .tvm_compile import compile

__all__ = ["compile", "resolve_target", "target_names", "TargetSpec"]
