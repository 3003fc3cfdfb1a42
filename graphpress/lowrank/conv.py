"""Conv as a matrix product: spatial (k×k, C→r) followed by pointwise (1×1, r→O) convolution.

A 2-D Conv with weight [O, C, kh, kw] computes, at every output position, `patch @ W` where the patch
holds the C·kh·kw input values under the kernel and W is the weight reshaped to [C·kh·kw, O]. A
rank-r split W ≈ A·B is then a Conv with weight Aᵀ reshaped to [r, C, kh, kw] and the original
strides/pads/dilations, followed by a 1×1 Conv with weight Bᵀ as [O, r, 1, 1] and the original bias.
The patches (im2col rows) are also the input rows whose Gram matrix whitens the factorization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """[O, C, kh, kw] conv weight -> the [C·kh·kw, O] matrix that multiplies patches."""
    return weight.reshape(weight.shape[0], -1).T


def spatial_weight(first: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
    """Factor A [C·kh·kw, r] -> the [r, C, kh, kw] weight of the spatial conv."""
    return first.T.reshape(first.shape[1], *weight_shape[1:])


def pointwise_weight(second: np.ndarray, ndim: int) -> np.ndarray:
    """Factor B [r, O] -> the [O, r, 1, ...] weight (`ndim` axes) of the pointwise conv."""
    return second.T.reshape(*second.T.shape, *[1] * (ndim - 2))


@dataclass(frozen=True)
class ConvGeometry:
    """Where a 2-D Conv's kernel reads its input: kernel size, strides, dilations, explicit pads."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]     # top, left, bottom, right

    @classmethod
    def of(cls, attrs: dict, weight_shape: tuple[int, ...]) -> "ConvGeometry | str":
        """The geometry of a Conv with these attributes, or why patches cannot be formed."""
        if len(weight_shape) != 4:
            return f"{len(weight_shape) - 2}-D convolution (only 2-D convs have patch statistics)"
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return f"auto_pad={attrs['auto_pad']} (explicit pads needed for patch statistics)"
        pads = tuple(attrs.get("pads", [0, 0, 0, 0])) if attrs.get("auto_pad", "NOTSET") == "NOTSET" else (0,) * 4
        return cls(tuple(weight_shape[2:]), tuple(attrs.get("strides", [1, 1])),
                   tuple(attrs.get("dilations", [1, 1])), pads)

    def patches(self, x: np.ndarray) -> np.ndarray:
        """im2col: [N, C, H, W] input -> [N·Ho·Wo, C·kh·kw] rows, in conv_matrix's column order."""
        top, left, bottom, right = self.pads
        padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
        windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        n, c, ho, wo = windows.shape[:4]
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
