"""Attention sorting: RoPE-pair-aware Q/K order and quantization-aware V/O SVD (docs/method.md,
"Stage 1: attention Q/K", "Stage 1: attention V/O").

Block params (see uniql_jax/models/attention.py): q [D, K, G, 2, P], k [D, K, 2, P],
pair_index [K, P], q_pass [D, K, G, E], k_pass [D, K, E], v [D, K, R], o [K, G, R, D],
Qwen biases q_bias [K, G, 2, P], k_bias [K, 2, P], q_pass_bias, k_pass_bias, v_bias [K, R],
o_bias [D]. The letters are the attention layout's own (models/attention.py): K kv heads, G query
heads per kv head, P rotary pairs per half, E pass-through channels, R v/o rank.

**Q/K.** Per kv head, channel score s = ‖C_q^{1/2}‖_col ⊙ ‖C_k^{1/2}‖_col from q, k after
RoPE, summed over the G query heads of the group. Rotate-half pairs channel p of half
0 with channel p of half 1, so a pair is scored s[0, p] + s[1, p] and the same pair
order is applied to both halves, to the K head and to all of its query heads; the
original frequency index of each pair follows in `pair_index`. Non-rotary channels
(partial rotary, or no RoPE at all) are sorted on their own scores. q·k sums over the
same permuted channels on both sides, and RoPE gathers its angle through
`pair_index`: the block computes the same function.

**V/O.** A v bias is folded into o_bias first (attention rows sum to 1, so
Σ_s p_s (b_v W_o) = b_v W_o exactly). Then per kv head the two-step
quantization-aware SVD of `lowrank.quantization_aware_svd` with C the correlation of
the attention input (after the block's RMSNorm): W_v ← C^{-1/2} U_v U Σ,
W_o ← Vᵀ, one SVD across all query heads of the group (the paper's two-step form, not
the reference code's single SVD of C^{1/2} W_v).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from uniql_jax.compress import lowrank
from uniql_jax.compress.calibration import weighted_rows
from uniql_jax.models.layers import rms_norm


# ----------------------------------------------------------------------------- statistics
def collect(cfg, blk, module, x_BxTxD, positions_BxT, w_B) -> dict:
    """Sums over tokens: C_x = Σ hᵀh [D, D] of the normalized input h, and Σ q², Σ k² per
    channel after RoPE (q_sq [K, G, 2, P], k_sq [K, 2, P], q_pass_sq [K, G, E], k_pass_sq [K, E])."""
    h = rms_norm(x_BxTxD, module.norm.get_value(), cfg.rms_norm_eps).astype(jnp.float32)
    cur = module.project(h, positions_BxT, None, "xla")
    h_NxD = weighted_rows(h, w_B).reshape(-1, h.shape[-1])
    stats = {"C_x": jnp.einsum("nd,ne->de", h_NxD, h_NxD, preferred_element_type=jnp.float32)}
    for name in ("q", "k", "q_pass", "k_pass"):
        if name in cur:
            u = weighted_rows(cur[name].astype(jnp.float32), w_B)
            stats[name + "_sq"] = jnp.sum(u * u, axis=(0, 1))
    return stats


# ----------------------------------------------------------------------------- Q/K orders
def qk_orders_from_scores(pair_score_Kx2xP=None, pass_score_KxE=None) -> dict:
    """Orders from per-channel scores: pairs by s[half 0] + s[half 1], pass channels by s."""
    orders = {}
    if pair_score_Kx2xP is not None:
        orders["pairs"] = lowrank.descending_order(pair_score_Kx2xP.sum(axis=-2))
    if pass_score_KxE is not None:
        orders["pass"] = lowrank.descending_order(pass_score_KxE)
    return orders


def qk_uniql_scores(stats: dict) -> tuple:
    """(pair scores [K, 2, P] or None, pass scores [K, E] or None): s = Σ_g ‖C_q^{1/2}‖_col ⊙ ‖C_k^{1/2}‖_col
    per kv head, with the column norms of the PSD roots taken as √diag (`lowrank.sqrt_col_norms`)."""
    n = stats["tokens"]

    def score(q_name, k_name):
        if q_name not in stats:
            return None
        q_norm = lowrank.sqrt_col_norms(lowrank.f64(stats[q_name]) / n)  # [K, G, ...]
        k_norm = lowrank.sqrt_col_norms(lowrank.f64(stats[k_name]) / n)  # [K, ...]
        return (q_norm * k_norm[:, None]).sum(axis=1)

    return score("q_sq", "k_sq"), score("q_pass_sq", "k_pass_sq")


def qk_uniql_orders(stats: dict) -> dict:
    """UniQL Q/K orders from the statistics of `collect`."""
    return qk_orders_from_scores(*qk_uniql_scores(stats))


def qk_magnitude_orders(p: dict) -> dict:
    """Baseline: the same rule on weight column norms instead of activation statistics."""
    pair = pas = None
    if "q" in p:
        pair = (np.linalg.norm(lowrank.f64(p["q"]), axis=0) * np.linalg.norm(lowrank.f64(p["k"]), axis=0)[:, None]).sum(axis=1)
    if "q_pass" in p:
        pas = (np.linalg.norm(lowrank.f64(p["q_pass"]), axis=0) * np.linalg.norm(lowrank.f64(p["k_pass"]), axis=0)[:, None]).sum(axis=1)
    return qk_orders_from_scores(pair, pas)


def qk_random_orders(p: dict, rng: np.random.Generator) -> dict:
    orders = {}
    if "k" in p:
        K, _, P = np.shape(p["k"])[1:]
        orders["pairs"] = np.stack([rng.permutation(P) for _ in range(K)]).astype(np.int32)
    if "k_pass" in p:
        K, E = np.shape(p["k_pass"])[1:]
        orders["pass"] = np.stack([rng.permutation(E) for _ in range(K)]).astype(np.int32)
    return orders


def permute_qk(p: dict, orders: dict) -> dict:
    """Apply pair orders [K, P] (both halves, K head, all its query heads, biases, pair_index)
    and pass orders [K, E]."""
    out = dict(p)
    if "pairs" in orders:
        o = orders["pairs"]
        out["q"] = lowrank.permute(p["q"], o, axis=4, head_axes=(1,))
        out["k"] = lowrank.permute(p["k"], o, axis=3, head_axes=(1,))
        out["pair_index"] = lowrank.permute(p["pair_index"], o, axis=1, head_axes=(0,))
        if "q_bias" in p:
            out["q_bias"] = lowrank.permute(p["q_bias"], o, axis=3, head_axes=(0,))
            out["k_bias"] = lowrank.permute(p["k_bias"], o, axis=2, head_axes=(0,))
    if "pass" in orders:
        o = orders["pass"]
        out["q_pass"] = lowrank.permute(p["q_pass"], o, axis=3, head_axes=(1,))
        out["k_pass"] = lowrank.permute(p["k_pass"], o, axis=2, head_axes=(1,))
        if "q_pass_bias" in p:
            out["q_pass_bias"] = lowrank.permute(p["q_pass_bias"], o, axis=2, head_axes=(0,))
            out["k_pass_bias"] = lowrank.permute(p["k_pass_bias"], o, axis=1, head_axes=(0,))
    return {k: jnp.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- V/O
def fold_v_bias(p: dict) -> dict:
    """Move a v bias into o_bias (exact: softmax rows sum to 1) and zero it."""
    if "v_bias" not in p:
        return p
    out = dict(p)
    v_bias = lowrank.f64(p["v_bias"])  # [K, R]
    o = lowrank.f64(p["o"])  # [K, G, R, D]
    out["o_bias"] = jnp.asarray(lowrank.f64(p["o_bias"]) + np.einsum("kr,kgrd->d", v_bias, o), p["o_bias"].dtype)
    out["v_bias"] = jnp.zeros_like(p["v_bias"])
    return out


def vo_svd(p: dict, C_x_DxD) -> dict:
    """UniQL V/O: per kv head, W_v ← C^{-1/2} U_v U Σ and W_o ← Vᵀ (rank ordered by σ)."""
    v, o = lowrank.f64(p["v"]), lowrank.f64(p["o"])  # [D, K, R], [K, G, R, D]
    D, K, R = v.shape
    G = o.shape[1]
    C_sqrt, C_inv_sqrt = lowrank.psd_sqrt_pair(C_x_DxD)
    v_new, o_new = np.empty_like(v), np.empty_like(o)
    for k in range(K):
        Wo_RxGD = o[k].transpose(1, 0, 2).reshape(R, G * D)
        Wv, Wo, _ = lowrank.quantization_aware_svd(C_sqrt, C_inv_sqrt, v[:, k, :], Wo_RxGD)
        v_new[:, k, :] = Wv
        o_new[k] = Wo.reshape(R, G, D).transpose(1, 0, 2)
    return {**p, "v": jnp.asarray(v_new, p["v"].dtype), "o": jnp.asarray(o_new, p["o"].dtype)}


def permute_vo(p: dict, rank_order_KxR) -> dict:
    """Reorder the rank channels of v (and v_bias) and o per kv head (baselines)."""
    out = dict(p)
    out["v"] = jnp.asarray(lowrank.permute(p["v"], rank_order_KxR, axis=2, head_axes=(1,)))
    out["o"] = jnp.asarray(lowrank.permute(p["o"], rank_order_KxR, axis=2, head_axes=(0,)))
    if "v_bias" in p:
        out["v_bias"] = jnp.asarray(lowrank.permute(p["v_bias"], rank_order_KxR, axis=1, head_axes=(0,)))
    return out


def vo_magnitude_order(p: dict) -> np.ndarray:
    """Baseline rank order [K, R] by ‖W_v[:, k, r]‖ · Σ_g ‖W_o[k, g, r, :]‖."""
    return lowrank.descending_order(np.linalg.norm(lowrank.f64(p["v"]), axis=0) * np.linalg.norm(lowrank.f64(p["o"]), axis=-1).sum(axis=1))


# ----------------------------------------------------------------------------- drivers
def sort_block(cfg, blk, p: dict, stats: dict) -> dict:
    """UniQL sorting of one attention block from its statistics (`collect` summed)."""
    p = permute_qk(p, qk_uniql_orders(stats))
    return vo_svd(fold_v_bias(p), lowrank.f64(stats["C_x"]) / stats["tokens"])


def baseline_block(cfg, blk, p: dict, kind: str, rng: np.random.Generator) -> dict:
    """Channel orders without UniQL's statistics: "random" or weight "magnitude"."""
    p = fold_v_bias(p)
    if kind == "magnitude":
        return permute_vo(permute_qk(p, qk_magnitude_orders(p)), vo_magnitude_order(p))
    K, R = np.shape(p["v"])[1:]
    p = permute_qk(p, qk_random_orders(p, rng))
    return permute_vo(p, np.stack([rng.permutation(R) for _ in range(K)]).astype(np.int32))
