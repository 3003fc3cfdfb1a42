"""Pass infrastructure and the built-in passes.

- `Pass`, `PassResult`, `PassContext`, `function_pass`: how a pass is written
- `register`, `get`, `all_passes`: the registry by name
- `parse_pipeline`, `FixedPoint`: pipeline strings such as `fold,prune-channels(ratio=0.3)`
- `PassManager`, `run_pipeline`: running a pipeline, with instruments (`IRDump`, `Checker`, `NumericCheck`)
- `Rule`, `apply_rules`: declarative pattern rewrites
"""

from .base import Pass, PassContext, PassResult, function_pass
from .instruments import Checker, Instrument, IRDump, NumericCheck
from .manager import PassManager, PassRecord, run_pipeline
from .pattern import Rule, apply_rules, match_chain
from .pipeline import FixedPoint, format_pipeline, parse_pipeline
from .registry import all_passes, get, register

__all__ = [
    "Pass", "PassContext", "PassResult", "function_pass", "register", "get", "all_passes", "parse_pipeline",
    "format_pipeline", "FixedPoint", "PassManager", "PassRecord", "run_pipeline", "Instrument", "IRDump",
    "Checker", "NumericCheck", "Rule", "apply_rules", "match_chain",
]
