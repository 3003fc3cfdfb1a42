"""graphpress' CPU lowering for TVM: channels-last layout, operator fusion and default schedules.

`lower(mod, target)` turns an imported Relax module into a scheduled one for an llvm target, in two
steps: `prepare` (layout, fusion; what tuning works on) and `schedule` (default schedules);
`schedules` holds the target-parameterized schedule rules; `machine` reads the vector unit.
"""

from .pipeline import lower, prepare, schedule

__all__ = ["lower", "prepare", "schedule"]
