"""Stage 2: layer-wise pruning-rate allocation (docs/method.md, "Stage 2: allocation").

Block influence of layer l (all blocks sharing a Hugging Face decoder layer index):
s_l = 1 − cos(x_l, y_l) between the residual stream entering its first block and
leaving its last one, at the last token of each calibration window (the only
position that has seen the whole window), averaged over windows. For a global rate
p over L layers,

    φ = L · p · softmax(−w ⊙ s / ε),  ε = 0.1,  clipped to [0, 0.85],

and layer l keeps 1 − φ_l of every prunable dimension, rounded to its step. Layers
that change the residual stream most are pruned least. w = 1, except Nemotron-H whose
layers are single modules: its MLP layers weigh 2 (about twice the parameters of a
mixer). "uniform" gives every layer φ = p.

A table is {rate: tuple of per-block BlockConfigs}, the format `prune.prune` reads.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from uniql_jax.compress import calibration
from uniql_jax.compress.prune import abstract_params, rate_config, slice_to_config
from uniql_jax.config import ModelConfig, full_rank_blocks
from uniql_jax.quant.formats import packed

log = logging.getLogger(__name__)

METHODS = ("block_influence", "uniform")
PRUNABLE = {"attention": ("qk_pairs", "qk_pass", "vo_rank"), "mlp": ("width",), "mamba2": ("d_state", "head_dim")}
MAX_PRUNE = 0.85


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(np.floor(np.log2(max(x, 1.0)))))


def default_steps(cfg: ModelConfig) -> dict[str, int]:
    """Rounding multiple of each prunable dimension, scaled to the model's size.

    At full scale (docs/method.md, "Stage 1: Mamba2", last paragraph): MLP width 128, q/k 16
    head channels = 8 pairs, v/o rank 16, d_state 16, Mamba head_dim 2. Tiny models get
    proportionally smaller steps (a power of two near 1/32 of the MLP width, 1/8 of the other
    dimensions), so a grid of rates still yields distinct sizes.
    """
    return {
        "width": min(128, _pow2_floor(cfg.intermediate_size / 32)),
        "qk_pairs": min(8, _pow2_floor(cfg.rotary_pairs / 8)),
        "qk_pass": min(16, _pow2_floor(cfg.pass_dim / 8)),
        "vo_rank": min(16, _pow2_floor(cfg.head_dim / 8)),
        "d_state": min(16, _pow2_floor(cfg.ssm_state / 8)),
        "head_dim": min(2, _pow2_floor(cfg.ssm_head_dim / 8)),
    }


def round_kept(full: int, keep_ratio: float, step: int) -> int:
    """keep_ratio · full rounded to a multiple of `step`, within [min(step, full), full]."""
    if full == 0 or keep_ratio >= 1.0:
        return full
    kept = int(np.round(keep_ratio * full / step)) * step
    return int(min(full, max(min(step, full), kept)))


# ----------------------------------------------------------------------------- scores
def layer_groups(cfg: ModelConfig) -> list[list[int]]:
    """Block indices of each decoder layer, in order (blocks of a layer are contiguous)."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(cfg.blocks):
        groups.setdefault(b.layer, []).append(i)
    for idx in groups.values():
        if idx != list(range(idx[0], idx[-1] + 1)):
            raise ValueError("the blocks of a decoder layer must be contiguous")
    return [groups[layer] for layer in sorted(groups)]


def cosine_rows(a_NxD, b_NxD) -> np.ndarray:
    a, b = np.asarray(a_NxD, np.float64), np.asarray(b_NxD, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def block_influence(cfg: ModelConfig, params: dict, calib, *, batch_size: int = 8, mesh=None,
                    progress: bool = False) -> np.ndarray:
    """s_l = 1 − mean cos(x_l, y_l) per decoder layer (last token of each window), float64 [L]."""
    run = calibration.run_blocks(cfg, params, calib, batch_size=batch_size, mesh=mesh, progress=progress,
                                 desc="block influence")
    last = run["last_token"]  # [n_blocks + 1, W, D]
    return np.asarray([1.0 - cosine_rows(last[g[0]], last[g[-1] + 1]).mean() for g in layer_groups(cfg)])


def layer_weights(cfg: ModelConfig) -> np.ndarray:
    """w_l: 2 for the MLP layers of Nemotron-H (per-module scores), else 1."""
    return np.asarray([2.0 if cfg.arch == "nemotron_h" and all(cfg.blocks[i].kind == "mlp" for i in g) else 1.0
                       for g in layer_groups(cfg)])


def prune_fractions(scores_L, rate: float, *, eps: float = 0.1, weights_L=None, max_prune: float = MAX_PRUNE):
    """φ = L·p·softmax(−w ⊙ s / ε), clipped to [0, max_prune] (float64 [L])."""
    s = np.asarray(scores_L, np.float64)
    w = np.ones_like(s) if weights_L is None else np.asarray(weights_L, np.float64)
    logits = -w * s / eps
    soft = np.exp(logits - logits.max())
    phi = len(s) * rate * soft / soft.sum()
    return np.clip(phi, 0.0, max_prune)


def blocks_for_fractions(cfg: ModelConfig, phi_L, steps: dict) -> tuple:
    """Per-block kept sizes when layer l prunes a fraction phi_L[l] of each prunable dimension."""
    full = full_rank_blocks(cfg)
    out = list(full)
    for g, phi in zip(layer_groups(cfg), phi_L):
        for i in g:
            blk = full[i]
            out[i] = dataclasses.replace(blk, **{name: round_kept(getattr(blk, name), 1.0 - float(phi), steps[name])
                                                 for name in PRUNABLE[blk.kind]})
    return tuple(out)


def allocate(cfg: ModelConfig, params: dict, calib, rates, *, method: str = "block_influence", steps=None,
             eps: float = 0.1, max_prune: float = MAX_PRUNE, batch_size: int = 8, mesh=None,
             progress: bool = False) -> dict:
    """UniQL layer-wise allocation (`uq.allocate`, docs/api.md): {rate: per-block kept sizes}.

    rates: global pruning rates in [0, max_prune]; steps: rounding multiple per prunable
    dimension (`default_steps` when None; keys width, qk_pairs, qk_pass, vo_rank,
    d_state, head_dim); method "block_influence" (calibration pass) or "uniform".
    """
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}; expected one of {METHODS}")
    steps = {**default_steps(cfg), **(steps or {})}
    rates = [float(r) for r in rates]
    bad = [r for r in rates if not 0.0 <= r <= max_prune]
    if bad:
        raise ValueError(f"rates must lie in [0, {max_prune}], got {bad}")
    t0 = time.perf_counter()
    n_layers = len(layer_groups(cfg))
    if method == "block_influence":
        scores, weights = block_influence(cfg, params, calib, batch_size=batch_size, mesh=mesh,
                                          progress=progress), layer_weights(cfg)
        log.info("block influence per layer: %s", np.array2string(scores, precision=4))
    table = {}
    for r in rates:
        if method == "uniform":
            phi = np.full(n_layers, min(r, max_prune))
        else:
            phi = prune_fractions(scores, r, eps=eps, weights_L=weights, max_prune=max_prune)
        table[r] = blocks_for_fractions(cfg, phi, steps)
    log.info("allocated %d rates in %.1f s", len(rates), time.perf_counter() - t0)
    return table


# ----------------------------------------------------------------------------- reporting
def param_count(cfg: ModelConfig) -> int:
    """Number of parameters (dense elements) of a model of this config."""
    return int(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params(cfg))))


def evaluate_rates(cfg: ModelConfig, params: dict, table: dict, tokens, *, seq_len: int, batch_size: int = 4,
                   progress: bool = False) -> list[dict]:
    """[{"rate", "ppl", "params", "param_bytes"}] for every rate of `table`, each on the sliced model.

    The full params go to the evaluation with the rate's config: each block program slices its
    own block (``eval._block_residual``), so no sliced copy of the model is ever held."""
    from uniql_jax.eval import perplexity

    rows = []
    for r in sorted(table, key=float):
        cfg_p = rate_config(cfg, table, r)
        ppl = perplexity(cfg_p, params, tokens, seq_len=seq_len, batch_size=batch_size, progress=progress)
        sliced = jax.eval_shape(lambda p, cfg_p=cfg_p: slice_to_config(cfg_p, p), params)  # shapes only
        rows.append({"rate": float(r), "ppl": ppl, "params": param_count(cfg_p), "param_bytes": packed.deployed_bytes(sliced)})
    return rows
