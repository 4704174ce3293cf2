"""Pure-jnp W4A16 matmul: dequantize the packed weight to the activation dtype, then one dot.

This is also the "XLA dequantize-then-dot" baseline of `bench.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uniql_jax.quant.formats import qarray


def matmul(x: jax.Array, w: qarray.QArray) -> jax.Array:
    """x [M, Kin] @ dequantize(w) [Kin, N] -> [M, N] in x.dtype, float32 accumulation.

    w is a `QArray` of logical shape (Kin, N) quantized along axis 0 (any bits / group size):
    w[k, n] = scales[k // group_size, n] * (code[k, n] - 2**(bits-1)), or with a zero point
    scales[g, n] * code[k, n] + offset[g, n] (`qarray.dequantize`), rounded to x.dtype.
    """
    if w.ndim != 2 or w.axis != 0 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"expected a QArray (Kin={x.shape[-1]}, N) quantized along axis 0, got {w}")
    w_dense = qarray.dequantize(w, x.dtype)  # [Kin, N]
    return jnp.dot(x, w_dense, preferred_element_type=jnp.float32).astype(x.dtype)
