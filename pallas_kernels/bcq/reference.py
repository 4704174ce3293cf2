"""Pure-jnp BCQ matmul: dequantize the bit-planes to the activation dtype, then one dot.

This is also the "XLA dequantize-then-dot" baseline of `bench.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uniql_jax.quant.formats.bcq import BCQArray


def matmul(x: jax.Array, w: BCQArray) -> jax.Array:
    """x [M, Kin] @ dequantize(w) [Kin, N] -> [M, N] in x.dtype, float32 accumulation.

    w: `BCQArray` of logical shape (Kin, N) along axis 0, k bit-planes:
    W[r, n] = sum_i alpha[g, i, n] * (2 bit_i[r, n] - 1) + offset[g, n], g = r // group_size
    (docs/method.md, "UniQuan: formats"), rounded to x.dtype.
    """
    if w.ndim != 2 or w.axis != 0 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"expected a BCQArray (Kin={x.shape[-1]}, N) along axis 0, got {w}")
    return jnp.dot(x, w.dequantize(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
