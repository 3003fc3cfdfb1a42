"""More calibration rows from the same images: mirrored and shifted copies of the calibration batches.

The least-squares re-fit of a consumer sees one row per output position and image, so layers late in a
network (7x7 or 8x8 positions) get few rows per unknown weight and the re-fit starts to memorize the
calibration images. A mirrored or slightly shifted image is a new, equally natural input for an image
classifier (both are the standard training augmentations), and its activations are new rows: more rows
without touching the images the model is evaluated on.

The image axes are found from the graph, not guessed from the shape: an input is an image when it reaches
the data input of a Conv through Transposes only (an NHWC input of a TensorFlow-converted model reaches it
through its Transpose to NCHW); the Conv's last two axes, mapped back through the permutations, are the
input's height and width.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import GraphpressError
from ..ir import Model

#: the augmentations, as (vertical shift, horizontal shift, mirrored) copies of every image
KINDS = {
    "flip": [(0, 0, True)],
    "shift": [(-2, 0, False), (2, 0, False), (0, -2, False), (0, 2, False)],
}


def image_axes(model: Model) -> dict[str, tuple[int, int]]:
    """(height axis, width axis) of every graph input that reaches a Conv's data input through Transposes."""
    axes = {}
    for tensor in model.graph.inputs:
        perm = list(range(len(tensor.shape or ())))
        current = tensor
        while len(perm) == 4:
            users = list(current.outputs)
            conv = next((n for n in users if n.op == "Conv" and n.inputs[0] is current), None)
            if conv is not None:
                axes[tensor.name] = (perm[2], perm[3])
                break
            transpose = next((n for n in users if n.op == "Transpose"), None)
            if transpose is None or len(users) != 1:
                break
            step = list(transpose.attrs.get("perm", range(3, -1, -1)))
            perm = [perm[i] for i in step]
            current = transpose.outputs[0]
    return axes


def copies(kinds: list[str]) -> int:
    """How many images every calibration image becomes (itself and its copies)."""
    return 1 + sum(len(KINDS.get(kind, ())) for kind in dict.fromkeys(kinds))


def augmented(model: Model, calibration: Iterable[dict], kinds: list[str]) -> list[dict]:
    """The calibration batches, each followed within the batch by its augmented copies: image inputs
    mirrored (width axis) or shifted by two pixels (edges repeated), other inputs repeated. Copies share
    their batch with the original, so a batch held out to choose a ridge shares no image with the fitted
    ones."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise GraphpressError(f"prune-channels: unknown augmentation {unknown[0]!r} (known: {', '.join(KINDS)})")
    axes = image_axes(model)
    if not axes:
        raise GraphpressError("prune-channels: augment needs an image input: a 4-D graph input that reaches "
                              "a Conv's data input (through Transposes only)")
    copies = [copy for kind in dict.fromkeys(kinds) for copy in KINDS[kind]]
    result = []
    for batch in calibration:
        result.append({name: np.concatenate([value] + [_transform(value, axes[name], *copy) if name in axes
                                                       else value for copy in copies])
                       for name, value in batch.items()})
    return result


def _transform(x: np.ndarray, axes: tuple[int, int], dy: int, dx: int, mirror: bool) -> np.ndarray:
    if mirror:
        x = np.flip(x, axis=axes[1])
    for axis, shift in zip(axes, (dy, dx)):
        if shift:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (max(shift, 0), max(-shift, 0))
            x = np.pad(x, pad, mode="edge")
            x = np.take(x, np.arange(x.shape[axis] - abs(shift)) + max(-shift, 0), axis=axis)
    return np.ascontiguousarray(x)
