"""Latency of an artifact next to onnxruntime on the same ONNX model, at a stated thread count.

Used by `graphpress bench` and `benchmarks/bench_backends.py`. The TVM runtime reads
TVM_NUM_THREADS once, when its thread pool starts, so `bench_artifact` sets it before the artifact's
first run and refuses to measure at a thread count other than the one the pool already has.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import BackendError


def sample_inputs(specs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for the artifact's input specs: normal floats, integers in {0, 1} (valid ids and masks)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        dtype = np.dtype(spec["dtype"])
        if np.issubdtype(dtype, np.floating):
            inputs[spec["name"]] = rng.standard_normal(spec["shape"]).astype(dtype)
        else:
            inputs[spec["name"]] = rng.integers(0, 2, size=spec["shape"]).astype(dtype)
    return inputs


def latency(fn, warmup: int = 3, repeat: int = 50, min_seconds: float = 1.0) -> dict:
    """Median and 90th percentile of `fn()` in milliseconds, over at least `repeat` calls and `min_seconds`."""
    for _ in range(warmup):
        fn()
    times = []
    started = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "runs": len(times)}


def tvm_threads() -> int:
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def bench_artifact(path, threads: int | None = None, repeat: int = 50, seed: int = 0) -> dict:
    """Time the artifact and onnxruntime (same ONNX, same inputs, same thread count)."""
    import onnxruntime as ort

    from ..runtime import load

    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    model = load(path)
    actual = tvm_threads()  # starts the pool if it has not started yet
    if threads is not None and actual != threads:
        raise BackendError(f"the TVM thread pool already runs {actual} threads in this process; "
                           f"measure {threads} threads in a fresh process")
    inputs = sample_inputs(model.inputs, seed)
    tvm_result = latency(lambda: model.run(inputs), repeat=repeat)
    options = ort.SessionOptions()
    options.intra_op_num_threads = actual
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.onnx_model_bytes(), options, providers=["CPUExecutionProvider"])
    ort_result = latency(lambda: session.run(None, inputs), repeat=repeat)
    return {"artifact": str(path), "target": model.target["name"], "threads": actual,
            "tvm": tvm_result, "onnxruntime": ort_result,
            "tvm_over_onnxruntime": tvm_result["median_ms"] / ort_result["median_ms"]}
