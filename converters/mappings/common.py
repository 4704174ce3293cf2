"""Hooks shared by the mapping tables: HF linear layouts <-> the elastic layout.

HF stores a linear as ``weight [out, in]``; we store ``[in, ...out axes]``. An HF
attention head of dim h is ``[half 0 (P) | half 1 (P) | pass (E)]`` (rotate-half
RoPE on the first 2P channels); query head ``h`` belongs to kv head ``h // G``.
"""

from __future__ import annotations

import numpy as np

from converters.errors import CheckpointError
from uniql_jax.config import AttentionBlock, MLPBlock, ModelConfig  # noqa: F401


def split_head_channels(w: np.ndarray, P: int):
    """[..., h] -> rotary [..., 2, P] and pass [..., h - 2P]."""
    rot = w[..., : 2 * P].reshape(w.shape[:-1] + (2, P))
    return rot, w[..., 2 * P:]


def join_head_channels(rot: np.ndarray | None, pas: np.ndarray | None, lead: tuple[int, ...]) -> np.ndarray:
    parts = []
    if rot is not None:
        parts.append(rot.reshape(lead + (-1,)))
    if pas is not None:
        parts.append(pas)
    return np.concatenate(parts, axis=-1)


def unsort_pairs(rot: np.ndarray, pair_index: np.ndarray, head_axis: int) -> np.ndarray:
    """Put pair p of kv head k back at its frequency slot pair_index[k, p] (HF order)."""
    out = np.empty_like(rot)
    K, P = pair_index.shape
    for k in range(K):
        src = np.take(rot, k, axis=head_axis)
        dst = np.empty_like(src)
        dst[..., pair_index[k]] = src
        idx = [slice(None)] * rot.ndim
        idx[head_axis] = k
        out[tuple(idx)] = dst
    return out


def attention_from_hf(cfg: ModelConfig, blk: AttentionBlock, take, names: dict) -> dict:
    """names: norm, q, k, v, o -> HF tensor names without '.weight' / '.bias' (norm: full name)."""
    D, K, G, h = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    P = cfg.rotary_pairs
    p = {"norm": take(names["norm"], (D,))}
    q = take(names["q"] + ".weight", (K * G * h, D)).T.reshape(D, K, G, h)
    k = take(names["k"] + ".weight", (K * h, D)).T.reshape(D, K, h)
    p["v"] = take(names["v"] + ".weight", (K * h, D)).T.reshape(D, K, h)
    p["o"] = take(names["o"] + ".weight", (D, K * G * h)).T.reshape(K, G, h, D)
    (q_rot, q_pass), (k_rot, k_pass) = split_head_channels(q, P), split_head_channels(k, P)
    if P:
        p["q"], p["k"] = q_rot, k_rot
        p["pair_index"] = np.broadcast_to(np.arange(P, dtype=np.int32), (K, P)).copy()
    if h - 2 * P:
        p["q_pass"], p["k_pass"] = q_pass, k_pass
    if cfg.attention_bias:
        qb = take(names["q"] + ".bias", (K * G * h,)).reshape(K, G, h)
        kb = take(names["k"] + ".bias", (K * h,)).reshape(K, h)
        (qb_rot, qb_pass), (kb_rot, kb_pass) = split_head_channels(qb, P), split_head_channels(kb, P)
        if P:
            p["q_bias"], p["k_bias"] = qb_rot, kb_rot
        if h - 2 * P:
            p["q_pass_bias"], p["k_pass_bias"] = qb_pass, kb_pass
        p["v_bias"] = take(names["v"] + ".bias", (K * h,)).reshape(K, h)
        p["o_bias"] = np.zeros((D,), p["o"].dtype)
    return p


def attention_to_hf(cfg: ModelConfig, blk: AttentionBlock, p: dict, names: dict) -> dict:
    D, K, G, h = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    if (blk.qk_pairs, blk.qk_pass, blk.vo_rank) != (cfg.rotary_pairs, cfg.pass_dim, h):
        raise CheckpointError(f"layer {blk.layer}: a pruned attention block has no Hugging Face equivalent")
    out = {names["norm"]: p["norm"]}
    q_rot = k_rot = None
    if "q" in p:
        q_rot = unsort_pairs(p["q"], p["pair_index"], head_axis=1)
        k_rot = unsort_pairs(p["k"], p["pair_index"], head_axis=1)
    out[names["q"] + ".weight"] = join_head_channels(q_rot, p.get("q_pass"), (D, K, G)).reshape(D, -1).T
    out[names["k"] + ".weight"] = join_head_channels(k_rot, p.get("k_pass"), (D, K)).reshape(D, -1).T
    out[names["v"] + ".weight"] = p["v"].reshape(D, -1).T
    out[names["o"] + ".weight"] = p["o"].reshape(-1, D).T
    if cfg.attention_bias:
        if np.any(p["o_bias"] != 0):
            raise CheckpointError(f"layer {blk.layer}: a folded o_proj bias has no Hugging Face {cfg.arch} equivalent")
        qb = unsort_pairs(p["q_bias"], p["pair_index"], head_axis=0) if "q_bias" in p else None
        kb = unsort_pairs(p["k_bias"], p["pair_index"], head_axis=0) if "k_bias" in p else None
        out[names["q"] + ".bias"] = join_head_channels(qb, p.get("q_pass_bias"), (K, G)).reshape(-1)
        out[names["k"] + ".bias"] = join_head_channels(kb, p.get("k_pass_bias"), (K,)).reshape(-1)
        out[names["v"] + ".bias"] = p["v_bias"].reshape(-1)
    return out


def mlp_from_hf(cfg: ModelConfig, blk: MLPBlock, take, names: dict) -> dict:
    """names: norm, up, down and (gated MLPs) gate."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    p = {"norm": take(names["norm"], (D,))}
    if cfg.mlp_activation == "silu_gated":
        p["gate"] = take(names["gate"] + ".weight", (F, D)).T
    p["up"] = take(names["up"] + ".weight", (F, D)).T
    p["down"] = take(names["down"] + ".weight", (D, F)).T
    return p


def mlp_to_hf(cfg: ModelConfig, blk: MLPBlock, p: dict, names: dict) -> dict:
    if blk.width != cfg.intermediate_size:
        raise CheckpointError(f"layer {blk.layer}: a pruned MLP block has no Hugging Face equivalent")
    out = {names["norm"]: p["norm"], names["up"] + ".weight": p["up"].T, names["down"] + ".weight": p["down"].T}
    if "gate" in p:
        out[names["gate"] + ".weight"] = p["gate"].T
    return out


def rope_from_hf(reader) -> tuple[float, tuple | None, int]:
    """(theta, llama3 scaling items or None) from `rope_parameters` (transformers 5) or the legacy keys."""
    params = reader.get("rope_parameters")
    legacy_scaling = reader.get("rope_scaling")
    legacy_theta = reader.get("rope_theta")
    rp = dict(params or legacy_scaling or {})
    theta = rp.pop("rope_theta", legacy_theta if legacy_theta is not None else 10000.0)
    rope_type = rp.pop("rope_type", rp.pop("type", "default"))
    partial = rp.pop("partial_rotary_factor", None)
    if rope_type == "default":
        if rp:
            raise CheckpointError(f"unsupported rope parameters {sorted(rp)}")
        return float(theta), None, partial
    if rope_type == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        extra = set(rp) - set(need)
        if extra or any(n not in rp for n in need):
            raise CheckpointError(f"llama3 rope scaling needs exactly {need}, got {sorted(rp)}")
        return float(theta), tuple(sorted((n, float(rp[n])) for n in need)), partial
    raise CheckpointError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")


def rope_to_hf(cfg: ModelConfig) -> dict:
    rp = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        rp.update(rope_type="llama3", **{k: v for k, v in cfg.rope_scaling})
        rp["original_max_position_embeddings"] = int(rp["original_max_position_embeddings"])
    return rp


def embed_from_hf(cfg: ModelConfig, take, embed: str, head: str) -> dict:
    V, D = cfg.vocab_size, cfg.hidden_size
    p = {"embed": take(embed, (V, D))}
    if not cfg.tie_word_embeddings:
        p["lm_head"] = take(head, (V, D)).T
    elif take.has(head):  # some tied checkpoints store the head too: it must be the same tensor
        if not np.array_equal(take(head, (V, D)), p["embed"]):
            raise CheckpointError(f"tie_word_embeddings is set but {head} differs from {embed}")
    return p


def embed_to_hf(cfg: ModelConfig, params: dict, embed: str, head: str) -> dict:
    out = {embed: params["embed"]}
    if not cfg.tie_word_embeddings:
        out[head] = params["lm_head"].T
    return out
