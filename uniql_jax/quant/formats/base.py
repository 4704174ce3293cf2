"""What every packed weight format shares (`QArray`, `ZeroPointQArray`, `BCQArray`).

A packed weight is a frozen dataclass registered as a pytree whose array fields are the
stored bytes and whose static fields are ``bits``, ``group_size``, ``axis`` (the
quantized, i.e. contraction, axis) and ``shape`` (the logical shape). It dequantizes
with ``w.dequantize(dtype)``; the rest of the interface (slicing, flattening, sizes) is
in `formats.packed`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


class PackedWeight:
    """Mixin of the packed formats: logical ``ndim``, stored ``nbytes``, ``dequantize``, ``repr``."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes: every array field (codes or planes, scales, offsets)."""
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self)))

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:  # pragma: no cover - every format overrides
        """Dense weight of the logical shape, in `dtype`."""
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, "
                f"axis={self.axis})")
