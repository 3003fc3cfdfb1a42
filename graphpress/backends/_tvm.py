"""Small helpers shared by the backend modules: TVM error summaries and the per-machine cache.

TVM errors carry multi-line C++/Python tracebacks; users get the final message line only, and the
full exception stays chained (`raise ... from exc`) for debugging.
"""

from __future__ import annotations

import os
from pathlib import Path


def summarize(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (where TVM puts the actual message)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def cache_dir() -> Path:
    """Where graphpress keeps what it downloads or builds once per machine (GRAPHPRESS_CACHE overrides)."""
    return Path(os.environ.get("GRAPHPRESS_CACHE", Path.home() / ".cache" / "graphpress"))
