"""Small helpers around TVM shared by the backend modules: a readable summary of TVM's exceptions.

TVM errors carry multi-line C++/Python tracebacks; users get the final message line only, and the
full exception stays chained (`raise ... from exc`) for debugging.
"""

from __future__ import annotations


def summarize(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (where TVM puts the actual message)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
