"""What the schedules need to know about a CPU target: vector width and register count.

Schedules are parameterized by these numbers instead of being tuned per model: the float
vector holds 8 lanes on AVX2, 16 on AVX-512 and 4 on NEON, and the register file bounds how many
accumulators a register tile may keep live (16 ymm on AVX2, 32 zmm on AVX-512, 32 q on NEON).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VectorUnit:
    """The SIMD unit of a CPU target."""

    bits: int  # width of one vector register
    registers: int  # architectural vector registers
    dot_int8: str | None  # "avx512vnni", "avxvnni", "dotprod" or None

    def lanes(self, dtype: str = "float32") -> int:
        """Elements of `dtype` in one vector register."""
        import numpy as np

        return self.bits // (8 * np.dtype(dtype).itemsize)

    @property
    def accumulators(self) -> int:
        """Vector registers a register tile may use for accumulators (the rest hold operands)."""
        return self.registers - 4


def vector_unit(target) -> VectorUnit:
    """The vector unit of an llvm `tvm.target.Target` (features as LLVM resolves them for its mcpu/mattr)."""
    from tvm.target.codegen import target_has_features

    def has(feature: str) -> bool:
        return bool(target_has_features(feature, target))

    if str(target.attrs.get("mtriple", "x86_64")).startswith("aarch64"):
        return VectorUnit(128, 32, "dotprod" if has("dotprod") else None)
    if has("avx512f"):
        return VectorUnit(512, 32, "avx512vnni" if has("avx512vnni") else None)
    if has("avx2"):
        return VectorUnit(256, 16, "avxvnni" if has("avxvnni") else None)
    return VectorUnit(128, 16, None)
