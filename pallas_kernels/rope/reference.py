"""Pure-jnp RoPE for sorted / pruned heads: the model's own `rope_angles` + `apply_rope`.

One source of truth: the kernel is tested against exactly what the XLA model path computes.
"""

from __future__ import annotations

import jax

from uniql_jax.models.layers import apply_rope, rope_angles


def rope(q: jax.Array, k: jax.Array, positions: jax.Array, pair_index: jax.Array, inv_freq: jax.Array):
    """Rotate-half RoPE of q [B, T, K, G, 2, P] and k [B, T, K, 2, P].

    positions [B, T] int; pair_index [K, P] int (original frequency index of each kept pair);
    inv_freq [P0] float32. Pair p of kv head k (and of its G query heads) rotates by
    positions * inv_freq[pair_index[k, p]]; float32 math, results in the input dtypes.
    """
    cos, sin = rope_angles(positions, inv_freq, pair_index)  # [B, T, K, P]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
