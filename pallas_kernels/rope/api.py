"""RoPE for sorted / pruned heads: dispatch between the XLA reference and the Pallas kernel."""

from __future__ import annotations

import jax

from pallas_kernels.common import check_implementation, record_dispatch, resolve_interpret
from pallas_kernels.rope import kernel, reference


def rope(q: jax.Array, k: jax.Array, positions: jax.Array, pair_index: jax.Array, inv_freq: jax.Array, *,
         implementation: str = "xla", interpret: bool | None = None, **kernel_options):
    """(q_rot, k_rot) in the input dtypes, float32 math.

    q [B, T, K, G, 2, P], k [B, T, K, 2, P] (rotate-half layout, P kept pairs, any size),
    positions [B, T] int, pair_index [K, P] int (original frequency index of each kept pair;
    the G query heads of kv head k use row k), inv_freq [P0] float32 (full rank).

    implementation: "xla" (pure jnp, `reference.rope`) or "pallas" (fused kernel).
    interpret: Pallas interpret mode; None -> True unless running on a GPU.
    kernel_options: block_tokens, num_warps (pallas only).
    What ran is recorded for `common.dispatch_log` ("rope/pallas" or "rope/xla"; the kernel
    takes every shape, so there is no fallback).
    """
    if check_implementation(implementation) == "xla":
        if kernel_options:
            raise TypeError(f"kernel options {sorted(kernel_options)} apply to implementation='pallas' only")
        record_dispatch("rope", "xla")
        return reference.rope(q, k, positions, pair_index, inv_freq)
    record_dispatch("rope", "pallas")
    return kernel.rope(q, k, positions, pair_index, inv_freq, interpret=resolve_interpret(interpret), **kernel_options)
