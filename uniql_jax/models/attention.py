"""Grouped-query attention in the elastic layout.

Weights keep every prunable axis as its own array axis, so a pruning rate keeps a
leading box of each array:

  q  [D, K, G, 2, P]  rotary channels: (half, pair) with pair i of half 0 rotating with pair i of half 1
  q_pass [D, K, G, E] channels RoPE leaves alone (partial rotary, or no RoPE at all)
  k  [D, K, 2, P],  k_pass [D, K, E]
  v  [D, K, R],     o [K, G, R, D]    (the v/o product has rank R per kv head)
  pair_index [K, P] the original frequency index of each kept pair (sorting permutes pairs)

A Hugging Face head of dim h = 2*P0 + E0 is [half 0 (P0) | half 1 (P0) | pass (E0)].
The softmax scale stays 1/sqrt(original head_dim) whatever is kept.

The letters of this layout are its own (docs/method.md's legend gives K, E, R to quantization):
K kv heads, G query heads per kv head, P rotary pairs per half, E pass-through channels, R v/o rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uniql_jax.config import AttentionBlock, ModelConfig
from pallas_kernels.rope.reference import apply_rope, rope_angles
from uniql_jax.models.layers import dense_init, rms_norm, rope_inv_freq, wdot


def keep_mask(full: int, keep, dtype) -> jax.Array:
    """1 for the leading `keep` of `full` channels, 0 beyond (keep may be traced)."""
    return (jnp.arange(full) < keep).astype(dtype)


def rope_scaling_dict(cfg: ModelConfig) -> dict | None:
    return dict(cfg.rope_scaling) if cfg.rope_scaling else None


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, blk: AttentionBlock, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.blk = cfg, blk
        D, K, G = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv
        P, E, R = blk.qk_pairs, blk.qk_pass, blk.vo_rank
        self.norm = nnx.Param(jnp.ones((D,), dtype))
        if P:
            self.q = nnx.Param(dense_init(rngs, (D, K, G, 2, P), D, dtype))
            self.k = nnx.Param(dense_init(rngs, (D, K, 2, P), D, dtype))
            self.pair_index = nnx.Variable(jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (K, P)))
        if E:
            self.q_pass = nnx.Param(dense_init(rngs, (D, K, G, E), D, dtype))
            self.k_pass = nnx.Param(dense_init(rngs, (D, K, E), D, dtype))
        self.v = nnx.Param(dense_init(rngs, (D, K, R), D, dtype))
        self.o = nnx.Param(dense_init(rngs, (K, G, R, D), K * G * R, dtype))
        if cfg.attention_bias:
            if P:
                self.q_bias = nnx.Param(jnp.zeros((K, G, 2, P), dtype))
                self.k_bias = nnx.Param(jnp.zeros((K, 2, P), dtype))
            if E:
                self.q_pass_bias = nnx.Param(jnp.zeros((K, G, E), dtype))
                self.k_pass_bias = nnx.Param(jnp.zeros((K, E), dtype))
            self.v_bias = nnx.Param(jnp.zeros((K, R), dtype))
            self.o_bias = nnx.Param(jnp.zeros((D,), dtype))  # receives the folded v bias after sorting

    def project(self, h, positions, mask, impl):
        """q, k, v of normalized input h [B, T, D]; RoPE applied through the pair indices."""
        cfg, blk = self.cfg, self.blk
        dt = h.dtype
        out = {}
        if blk.qk_pairs:
            q = wdot("btd,dkgcp->btkgcp", h, self.q.get_value(), impl)
            k = wdot("btd,dkcp->btkcp", h, self.k.get_value(), impl)
            if cfg.attention_bias:
                q, k = q + self.q_bias.get_value().astype(dt), k + self.k_bias.get_value().astype(dt)
            if mask is not None:
                m = keep_mask(blk.qk_pairs, mask["qk_pairs"], dt)
                q, k = q * m, k * m  # the same pairs of both halves: pair-consistent
            inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, rope_scaling_dict(cfg))
            if impl == "pallas":
                from pallas_kernels.rope import api as rope_api

                q, k = rope_api.rope(q, k, positions, self.pair_index.get_value(), inv_freq, implementation="pallas")
            else:
                cos, sin = rope_angles(positions, inv_freq, self.pair_index.get_value())
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out["q"], out["k"] = q, k
        if blk.qk_pass:
            qp = wdot("btd,dkge->btkge", h, self.q_pass.get_value(), impl)
            kp = wdot("btd,dke->btke", h, self.k_pass.get_value(), impl)
            if cfg.attention_bias:
                qp, kp = qp + self.q_pass_bias.get_value().astype(dt), kp + self.k_pass_bias.get_value().astype(dt)
            if mask is not None:
                m = keep_mask(blk.qk_pass, mask["qk_pass"], dt)
                qp, kp = qp * m, kp * m
            out["q_pass"], out["k_pass"] = qp, kp
        v = wdot("btd,dkr->btkr", h, self.v.get_value(), impl)
        if cfg.attention_bias:
            v = v + self.v_bias.get_value().astype(dt)
        if mask is not None:
            v = v * keep_mask(blk.vo_rank, mask["vo_rank"], dt)
        out["v"] = v
        return out

    def __call__(self, x, positions, cache=None, mask=None, impl="xla"):
        """x [B, T, D] residual stream; positions [B, T]. Returns (update [B, T, D], cache)."""
        cfg = self.cfg
        h = rms_norm(x, self.norm.get_value(), cfg.rms_norm_eps)
        cur = self.project(h, positions, mask, impl)
        if cache is None:
            keys = {n: cur[n] for n in ("k", "k_pass", "v") if n in cur}
            key_pos = positions
        else:
            start = positions[0, 0]
            keys = {n: jax.lax.dynamic_update_slice_in_dim(cache[n], cur[n].astype(cache[n].dtype), start, axis=1)
                    for n in cache}
            cache = keys
            S = keys["v"].shape[1]
            key_pos = jnp.broadcast_to(jnp.arange(S, dtype=positions.dtype), (x.shape[0], S))
        y = attend(cfg, cur, keys, positions, key_pos)
        y = wdot("btkgr,kgrd->btd", y, self.o.get_value(), impl)
        if cfg.attention_bias:
            y = y + self.o_bias.get_value().astype(y.dtype)
        return y, cache


def attend(cfg: ModelConfig, cur: dict, keys: dict, q_pos, k_pos):
    """Causal softmax attention, float32 scores; returns [B, T, K, G, R]."""
    scores = 0.0
    if "q" in cur:
        scores = scores + jnp.einsum("btkgcp,bskcp->bkgts", cur["q"], keys["k"].astype(cur["q"].dtype),
                                     preferred_element_type=jnp.float32)
    if "q_pass" in cur:
        scores = scores + jnp.einsum("btkge,bske->bkgts", cur["q_pass"], keys["k_pass"].astype(cur["q_pass"].dtype),
                                     preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim ** -0.5)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    scores = jnp.where(causal[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    v = keys["v"]
    return jnp.einsum("bkgts,bskr->btkgr", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)


def init_attention_cache(cfg: ModelConfig, blk: AttentionBlock, batch: int, max_len: int, dtype) -> dict:
    K = cfg.num_kv_heads
    cache = {"v": jnp.zeros((batch, max_len, K, blk.vo_rank), dtype)}
    if blk.qk_pairs:
        cache["k"] = jnp.zeros((batch, max_len, K, 2, blk.qk_pairs), dtype)
    if blk.qk_pass:
        cache["k_pass"] = jnp.zeros((batch, max_len, K, blk.qk_pass), dtype)
    return cache
