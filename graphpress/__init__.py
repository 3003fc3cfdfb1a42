"""graphpress: a graph-level compiler that makes trained ONNX models smaller and faster without retraining.

    import graphpress as gp
    model = gp.load("model.onnx")
    gp.PassManager("fold,prune-channels(ratio=0.3)").run(model)
    gp.save(model, "small.onnx")
"""

from .errors import GraphpressError
from .ir import Model, compare, load, save
from .passes import FixedPoint, Pass, PassContext, PassManager, PassResult, function_pass, register, run_pipeline

__version__ = "0.1.0"

__all__ = [
    "GraphpressError", "Model", "load", "save", "compare", "Pass", "PassContext", "PassResult", "PassManager",
    "FixedPoint", "function_pass", "register", "run_pipeline", "__version__",
]
