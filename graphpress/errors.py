"""Errors graphpress raises on purpose.

Every error a user can cause (a bad file, an unknown pass, an op a backend cannot compile) is a
`GraphpressError`: the CLI prints its message on one line and exits with status 2, without a
traceback. Anything else reaching the CLI is a bug in graphpress and keeps its traceback.
"""


class GraphpressError(Exception):
    """A problem with the user's input or request, explained in the message."""


class ModelLoadError(GraphpressError):
    """The model file is missing, unreadable, not ONNX, truncated, or uses an unsupported opset."""


class PipelineError(GraphpressError):
    """A pipeline string or pass option is malformed or names an unknown pass."""


class PassError(GraphpressError):
    """A pass failed; the message names the pass, the node and the passes that ran before it."""


class BackendError(GraphpressError):
    """A backend cannot compile, load or run a model (unsupported op, bad target, bad artifact)."""
