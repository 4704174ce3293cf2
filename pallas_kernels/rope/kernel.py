"""Fused RoPE for sorted / pruned heads (Pallas, Triton GPU backend or interpret mode).

After UniQL sorts Q/K channels by pairs and prunes, head-dim pair p of kv head k no longer
carries frequency theta_p: it carries inv_freq[pair_index[k, p]] (docs/method.md, "Deployment",
fused RoPE). One program handles a block of tokens and one kv head:

  1. gathers the head's frequencies inv_freq[pair_index[k, :]] in the kernel,
  2. builds cos/sin [BT, Pp] once from the tokens' positions,
  3. rotates the G query heads of that kv head *and* the kv head's key with them,

so the angle table is computed once per (tokens, kv head) instead of materialised in HBM
and read twice. Prefill and decode are the same kernel (positions are per token).

Layout: tokens are flattened, q [N, K, G, 2, P] and k [N, K, 2, P] with axis -2 the
rotate-half half and P the kept pairs. P need not be a power of two (pruning keeps any
number of pairs): the pair axis is covered by a Pp = next_pow2(P) block and masked.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import alias_initial_outputs, lane_mask, next_pow2, triton_params

# Elements of one [BT, Pp] tile: 2048 keeps a tile at 16 float32 registers per thread
# with 4 warps, while leaving enough programs for long prefills.
TILE_ELEMENTS = 2048


def default_block_tokens(n_tokens: int, block_pairs: int) -> int:
    return max(1, min(next_pow2(n_tokens), TILE_ELEMENTS // block_pairs))


def _rope_kernel(pos_ref, pair_ref, freq_ref, q_ref, k_ref, *refs, n_tokens: int, n_pairs: int, groups: int):
    """One (token block, kv head) program.

    Refs (squeezed kv-head axis): pos [BT] int32, pair [Pp] int32, freq [P0p] float32,
    q [BT, G, 2, Pp], k [BT, 2, Pp]; outputs q_out, k_out alike (after optional aliased
    initial-value inputs, which are never read).
    """
    q_out_ref, k_out_ref = refs[-2:]
    block_tokens, block_pairs = q_ref.shape[0], q_ref.shape[-1]
    tok_ok = lane_mask(pl.program_id(0) * block_tokens, block_tokens, n_tokens)  # [BT]
    pair_ok = lane_mask(0, block_pairs, n_pairs)  # [Pp]
    tile_ok = tok_ok[:, None] & pair_ok[None, :]  # [BT, Pp]

    idx = plt.load(pair_ref, mask=pair_ok, other=0)  # [Pp]: masked lanes gather entry 0, unused
    freq = freq_ref[idx]  # [Pp] gather of the original frequencies
    pos = plt.load(pos_ref, mask=tok_ok, other=0).astype(jnp.float32)  # [BT]
    angle = pos[:, None] * freq[None, :]  # [BT, Pp]
    cos, sin = jnp.cos(angle), jnp.sin(angle)

    def rotate(x_ref, out_ref, head):
        # Each access is one [BT, Pp] tile through a single indexer (Triton lowers only one);
        # integer indices as int32 scalars, which the interpreter's masked load accepts.
        at = [(slice(None), *head, jnp.int32(half), slice(None)) for half in (0, 1)]
        x1 = plt.load(x_ref.at[at[0]], mask=tile_ok, other=0).astype(jnp.float32)
        x2 = plt.load(x_ref.at[at[1]], mask=tile_ok, other=0).astype(jnp.float32)
        plt.store(out_ref.at[at[0]], (x1 * cos - x2 * sin).astype(out_ref.dtype), mask=tile_ok)
        plt.store(out_ref.at[at[1]], (x2 * cos + x1 * sin).astype(out_ref.dtype), mask=tile_ok)

    for g in range(groups):  # static: the G query heads share this kv head's angles
        rotate(q_ref, q_out_ref, (jnp.int32(g),))
    rotate(k_ref, k_out_ref, ())


@functools.partial(jax.jit, static_argnames=("interpret", "block_tokens", "num_warps"))
def rope(q, k, positions, pair_index, inv_freq, *, interpret: bool = False, block_tokens: int | None = None,
         num_warps: int = 4, out_init=None):
    """Pallas RoPE; same contract as `reference.rope` (q [B,T,K,G,2,P], k [B,T,K,2,P]).

    out_init: optional (q_init, k_init) buffers aliased to the outputs; a test passes
    NaN-poisoned ones so that any element the kernel fails to write stays NaN.
    """
    B, T, K, G, two, P = q.shape
    assert two == 2 and k.shape == (B, T, K, 2, P), (q.shape, k.shape)
    assert pair_index.shape == (K, P), pair_index.shape
    N = B * T
    q_f = q.reshape(N, K, G, 2, P)
    k_f = k.reshape(N, K, 2, P)
    pos_f = positions.reshape(N).astype(jnp.int32)
    block_pairs = next_pow2(P)
    block_freqs = next_pow2(inv_freq.shape[0])
    bt = block_tokens or default_block_tokens(N, block_pairs)

    in_specs = [
        pl.BlockSpec((bt,), lambda i, h: (i,)),
        pl.BlockSpec((pl.squeezed, block_pairs), lambda i, h: (h, 0)),
        pl.BlockSpec((block_freqs,), lambda i, h: (0,)),
        pl.BlockSpec((bt, pl.squeezed, G, 2, block_pairs), lambda i, h: (i, h, 0, 0, 0)),
        pl.BlockSpec((bt, pl.squeezed, 2, block_pairs), lambda i, h: (i, h, 0, 0)),
    ]
    out_specs = [in_specs[3], in_specs[4]]
    out_shapes = [jax.ShapeDtypeStruct(q_f.shape, q.dtype), jax.ShapeDtypeStruct(k_f.shape, k.dtype)]
    args = [pos_f, pair_index.astype(jnp.int32), inv_freq.astype(jnp.float32), q_f, k_f]
    aliases = alias_initial_outputs(args, in_specs, out_shapes, out_specs, out_init)

    q_rot, k_rot = pl.pallas_call(
        functools.partial(_rope_kernel, n_tokens=N, n_pairs=P, groups=G),
        out_shape=out_shapes,
        grid=(math.ceil(N / bt), K),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=triton_params(num_warps=num_warps, num_stages=1),
        name="uniql_rope",
    )(*args)
    return q_rot.reshape(q.shape), k_rot.reshape(k.shape)
