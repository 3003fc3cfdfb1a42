"""End to end: `compress` a model within an accuracy budget and report what every stage cost."""

from .evaluate import Agreement, OnnxRunnable, load_evaluator
from .run import DEFAULT_KNOBS, compress

__all__ = ["compress", "DEFAULT_KNOBS", "Agreement", "OnnxRunnable", "load_evaluator"]
