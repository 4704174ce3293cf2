"""RoPE for sorted / pruned heads: dispatch between the XLA reference and the Pallas kernel."""

from __future__ import annotations

import jax

from pallas_kernels.common import choose_implementation, resolve_interpret
from pallas_kernels.rope import kernel, reference


def rope(q: jax.Array, k: jax.Array, positions: jax.Array, pair_index: jax.Array, inv_freq: jax.Array, *,
         implementation: str | None = "xla", interpret: bool | None = None, **kernel_options):
    """(q_rot, k_rot) in the input dtypes, float32 math.

    q [B, T, K, G, 2, P], k [B, T, K, 2, P] (rotate-half layout, P kept pairs, any size),
    positions [B, T] int, pair_index [K, P] int (original frequency index of each kept pair;
    the G query heads of kv head k use row k), inv_freq [P0] float32 (full rank).

    implementation: "xla" (pure jnp, `reference.rope`), "pallas" (fused kernel) or None /
      "auto" (`common.choose_implementation`; the kernel takes every shape, so "auto" is
      "pallas" and neither falls back nor raises).
    interpret: Pallas interpret mode; None -> True unless running on a GPU.
    kernel_options: block_tokens, num_warps (pallas only).
    What ran is recorded for `common.dispatch_log` ("rope/pallas" or "rope/xla").
    """
    if choose_implementation("rope", implementation, None, kernel_options) == "xla":
        return reference.rope(q, k, positions, pair_index, inv_freq)
    return kernel.rope(q, k, positions, pair_index, inv_freq, interpret=resolve_interpret(interpret), **kernel_options)
