"""Run every benchmark in turn (what `make bench` does); each writes its own results/*.json and plot.

Heavy: an hour or more on 2 cores. Run one with `python -m benchmarks.bench_<name>` instead.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench_fold", "bench_qdq", "bench_prune", "bench_svd", "bench_backends", "bench_cpu", "bench_headline")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"=== benchmarks.{name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
