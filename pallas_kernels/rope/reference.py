"""Pure-jnp RoPE for sorted / pruned heads: `rope_angles` + `apply_rope`, the model's own RoPE.

One source of truth: the XLA path of the models (`models.attention`, through `models.layers`)
calls these very functions, so the kernel is tested against exactly what the model computes.
They live here, below the models, because kernels never import the models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, inv_freq: jax.Array, pair_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin for each token and kept pair, gathered through the stored pair indices.

    positions [B, T] int; inv_freq [P0] (full rank); pair_index [K, P] -> cos, sin [B, T, K, P].
    After sorting, pair p of kv head k carries the original frequency inv_freq[pair_index[k, p]].
    """
    freq = inv_freq[pair_index]  # [K, P]
    ang = positions.astype(jnp.float32)[:, :, None, None] * freq[None, None]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, K, ..., 2, P] with cos/sin [B, T, K, P] (float32 math)."""
    extra = x.ndim - 5  # query heads per kv head sit between K and the pair axes
    c = cos.reshape(cos.shape[:3] + (1,) * extra + cos.shape[3:])
    s = sin.reshape(c.shape)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., 0, :], xf[..., 1, :]
    out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2)
    return out.astype(x.dtype)



def rope(q: jax.Array, k: jax.Array, positions: jax.Array, pair_index: jax.Array, inv_freq: jax.Array):
    """Rotate-half RoPE of q [B, T, K, G, 2, P] and k [B, T, K, 2, P].

    positions [B, T] int; pair_index [K, P] int (original frequency index of each kept pair);
    inv_freq [P0] float32. Pair p of kv head k (and of its G query heads) rotates by
    positions * inv_freq[pair_index[k, p]]; float32 math, results in the input dtypes.
    """
    cos, sin = rope_angles(positions, inv_freq, pair_index)  # [B, T, K, P]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
