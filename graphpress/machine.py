"""A one-line description of this machine (CPU model, cores) for reports and benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    """E.g. 'AMD EPYC 9454P, 2 logical cores, x86_64'."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.machine()}"
