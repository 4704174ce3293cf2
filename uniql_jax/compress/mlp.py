"""MLP sorting by ridge leverage (docs/method.md, "Stage 1: MLP").

Gated (SiLU(x W_g) ⊙ x W_u → W_d) and ungated ReLU² (Nemotron-H) alike: collect the
correlation C of X_int, the input of down_proj [tokens, F]; score each intermediate
channel by s = diag(C (C + λI)⁻¹), λ = 1; permute the output channels of gate/up and
the input rows of down by decreasing s. Permuting F is an exact symmetry of the block.

Block params: gate [D, F] (gated only), up [D, F], down [F, D].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from uniql_jax.compress import lowrank
from uniql_jax.compress.calibration import weighted_rows
from uniql_jax.models.layers import rms_norm
from uniql_jax.models.mlp import activation


# ----------------------------------------------------------------------------- statistics
def collect(cfg, blk, module, x_BxTxD, positions_BxT, w_B) -> dict:
    """{"C_act": Σ aᵀa [F, F]} with a [tokens, F] the input of down_proj (float32)."""
    h = rms_norm(x_BxTxD, module.norm.get_value(), cfg.rms_norm_eps)
    gate = module.gate.get_value() if cfg.mlp_activation == "silu_gated" else None
    a_BxTxF = weighted_rows(activation(cfg, h, gate, module.up.get_value(), "xla").astype(jnp.float32), w_B)
    a_NxF = a_BxTxF.reshape(-1, a_BxTxF.shape[-1])
    return {"C_act": jnp.einsum("nf,ng->fg", a_NxF, a_NxF, preferred_element_type=jnp.float32)}


# ----------------------------------------------------------------------------- orders
def leverage_scores(C_act_FxF, tokens: float, lam: float = 1.0) -> np.ndarray:
    """Ridge leverage [F] of the mean correlation C = Σaᵀa / N of down_proj's input."""
    return np.asarray(lowrank.ridge_leverage(np.asarray(C_act_FxF) / tokens, lam))


def leverage_order(C_act_FxF, tokens: float, lam: float = 1.0) -> np.ndarray:
    """Channel order [F] by decreasing ridge leverage."""
    return lowrank.descending_order(leverage_scores(C_act_FxF, tokens, lam))


def magnitude_order(p: dict) -> np.ndarray:
    """Baseline: channel order by ‖W_g[:, j]‖·‖W_u[:, j]‖·‖W_d[j, :]‖ (weights only, no data)."""
    score = np.linalg.norm(np.asarray(p["up"], np.float64), axis=0) * np.linalg.norm(np.asarray(p["down"], np.float64), axis=1)
    if "gate" in p:
        score = score * np.linalg.norm(np.asarray(p["gate"], np.float64), axis=0)
    return lowrank.descending_order(score)


def random_order(p: dict, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.shape(p["up"])[1]).astype(np.int32)


# ----------------------------------------------------------------------------- apply
def permute_width(p: dict, order_F) -> dict:
    """The block with its intermediate channels reordered: gate/up columns, down rows."""
    out = dict(p)
    for name in ("gate", "up"):
        if name in p:
            out[name] = jnp.asarray(lowrank.permute(p[name], order_F, axis=1))
    out["down"] = jnp.asarray(lowrank.permute(p["down"], order_F, axis=0))
    return out


def sort_block(cfg, blk, p: dict, stats: dict, *, lam: float = 1.0) -> dict:
    """UniQL order of one MLP block from its statistics (`collect` summed over calibration)."""
    return permute_width(p, leverage_order(stats["C_act"], stats["tokens"], lam))


def baseline_block(cfg, blk, p: dict, kind: str, rng: np.random.Generator) -> dict:
    order = magnitude_order(p) if kind == "magnitude" else random_order(p, rng)
    return permute_width(p, order)
