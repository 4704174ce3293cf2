"""Mamba2 sorting over d_state and head_dim (docs/method.md, "Stage 1: Mamba2").

Block params (see uniql_jax/models/mamba2.py): z, x [D, H, P]; B, C [D, G, S]; dt [D, H];
conv_x [w, H, P], conv_B / conv_C [w, G, S] and their biases [H, P] / [G, S];
dt_bias, A_log, D [H]; gnorm [H, P]; out [H, P, D] (letters of docs/method.md; w the conv width;
models/mamba2.py writes P as C, S as N and G as R_g).

**B/C over d_state.** B and C are taken after conv1d + SiLU. Per SSM group g,
score[g, n] = Σ_{heads h of g} ‖C_{ΔB,h}^{1/2}‖_col[n] · ‖C_C^{1/2}‖_col[n], where ΔB_h = Δ_h ⊗ B
is the discretized input of head h; the column norms of the PSD roots are the square
roots of the diagonals (`lowrank.sqrt_col_norms`). One order per group permutes the
columns of W_B and W_C, their conv taps and biases: the SSM contracts B and C over the
same n, so the block computes the same function.

**z / x / out over head_dim, state-aware.** Per head, the ridge leverage of the SSM
*states* h_t [P, S] stacked over tokens (the T·S × P matrix of the paper): with
C_H = Σ_t h_t h_tᵀ [P, P], score = diag(C_H (C_H + λI)⁻¹). The order permutes z and x
columns, conv-x taps and bias, the gated-norm weight and out_proj rows of that head: a
head channel only ever meets itself (state row, D skip, gate, norm weight, out row),
and the gated RMSNorm sums squares over the group, so the function is unchanged.

Heads, groups, dt, A and D are never permuted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.compress import lowrank
from uniql_jax.compress.calibration import F32, weighted_rows
from uniql_jax.models.layers import rms_norm, wdot
from uniql_jax.models.mamba2 import causal_conv, ssd_recurrent_step


# ----------------------------------------------------------------------------- statistics
def ssm_inputs(cfg, module, x_BxTxD) -> dict:
    """What the selective scan of a Mamba2 block sees (float32): x [B, T, H, P], B / C [B, T, G, S]
    after conv1d + SiLU, Δ [B, T, H] (softplus'ed, clipped), A [H] (negative); the same steps as
    `Mamba2.__call__` up to the scan (tests check that the scan of these reproduces the block)."""
    h = rms_norm(x_BxTxD, module.norm.get_value(), cfg.rms_norm_eps)
    bias = (lambda name: getattr(module, name).get_value()) if cfg.conv_bias else (lambda name: None)
    out = {}
    for name, spec in (("x", "btd,dhp->bthp"), ("B", "btd,dgn->btgn"), ("C", "btd,dgn->btgn")):
        u = wdot(spec, h, getattr(module, name).get_value(), "xla")
        u, _ = causal_conv(u, getattr(module, "conv_" + name).get_value(), bias(f"conv_{name}_bias"))
        out[name] = jax.nn.silu(u)
    dt_logit = wdot("btd,dh->bth", h, module.dt.get_value(), "xla")
    dt = jax.nn.softplus(dt_logit.astype(F32) + module.dt_bias.get_value().astype(F32))
    out["dt"] = jnp.clip(dt, *cfg.time_step_limit)
    out["A"] = -jnp.exp(module.A_log.get_value().astype(F32))
    return out


def state_correlation(x_BxTxHxP, dt_BxTxH, A_H, B_BxTxGxS, C_BxTxGxS) -> jax.Array:
    """Σ_t Σ_b h_t h_tᵀ per head, [H, P, P], scanning the recurrence of SSD eq. (1) over time."""
    b, T, H, P = x_BxTxHxP.shape
    S = B_BxTxGxS.shape[-1]

    def step(carry, inputs):
        state, acc = carry
        _, state = ssd_recurrent_step(state, *inputs[:2], A_H, *inputs[2:])
        return (state, acc + jnp.einsum("bhpn,bhqn->hpq", state, state)), None

    init = (jnp.zeros((b, H, P, S), F32), jnp.zeros((H, P, P), F32))
    xs = tuple(jnp.moveaxis(u, 1, 0) for u in (x_BxTxHxP, dt_BxTxH, B_BxTxGxS, C_BxTxGxS))
    (_, acc), _ = jax.lax.scan(step, init, xs)
    return acc


def collect(cfg, blk, module, x_BxTxD, positions_BxT, w_B) -> dict:
    """Sums over tokens: dB_sq [H, S] = Σ (Δ_h B_n)², C_sq [G, S] = Σ C_n², and the state
    correlation state_corr [H, P, P] = Σ_t h_t h_tᵀ (windows weighted by w)."""
    s = ssm_inputs(cfg, module, x_BxTxD)
    Rg = cfg.ssm_groups
    B = weighted_rows(s["B"], w_B)
    C = weighted_rows(s["C"], w_B)
    dt2 = s["dt"] ** 2
    dt2 = dt2.reshape(dt2.shape[:2] + (Rg, -1))  # [b, t, g, h]: heads of a group are contiguous
    dB_sq = jnp.einsum("btgh,btgn->ghn", dt2, B * B).reshape(cfg.ssm_heads, -1)
    # the state is linear in x: √w on x weighs each window's state outer products by w
    corr = state_correlation(weighted_rows(s["x"], w_B), s["dt"], s["A"], s["B"], s["C"])
    return {"dB_sq": dB_sq, "C_sq": jnp.sum(C * C, axis=(0, 1)), "state_corr": corr}


# ----------------------------------------------------------------------------- orders
def state_scores_uniql(cfg, stats: dict) -> np.ndarray:
    """d_state scores [G, S]: Σ_{h in g} ‖C_ΔB^{1/2}‖_col ⊙ ‖C_C^{1/2}‖_col."""
    n = stats["tokens"]
    dB = lowrank.sqrt_col_norms(lowrank.f64(stats["dB_sq"]) / n)  # [H, S]
    dB = dB.reshape(cfg.ssm_groups, -1, dB.shape[-1])  # [g, h, n]
    Cn = lowrank.sqrt_col_norms(lowrank.f64(stats["C_sq"]) / n)  # [g, n]
    return (dB * Cn[:, None]).sum(axis=1)


def head_dim_scores_uniql(stats: dict, lam: float = 1.0) -> np.ndarray:
    """head_dim scores [H, P]: ridge leverage of each head's state correlation."""
    return np.asarray(lowrank.ridge_leverage(lowrank.f64(stats["state_corr"]) / stats["tokens"], lam))


def state_order_magnitude(p: dict) -> np.ndarray:
    return lowrank.descending_order(np.linalg.norm(lowrank.f64(p["B"]), axis=0) * np.linalg.norm(lowrank.f64(p["C"]), axis=0))


def head_dim_order_magnitude(p: dict) -> np.ndarray:
    score = np.linalg.norm(lowrank.f64(p["z"]), axis=0) * np.linalg.norm(lowrank.f64(p["x"]), axis=0)
    return lowrank.descending_order(score * np.linalg.norm(lowrank.f64(p["out"]), axis=-1))


def random_orders(p: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    _, Rg, N = np.shape(p["B"])
    _, H, C = np.shape(p["x"])
    state = np.stack([rng.permutation(N) for _ in range(Rg)]).astype(np.int32)
    head = np.stack([rng.permutation(C) for _ in range(H)]).astype(np.int32)
    return state, head


# ----------------------------------------------------------------------------- apply
STATE_AXES = {"B": (2, 1), "C": (2, 1), "conv_B": (2, 1), "conv_C": (2, 1), "conv_B_bias": (1, 0), "conv_C_bias": (1, 0)}
HEAD_DIM_AXES = {"z": (2, 1), "x": (2, 1), "conv_x": (2, 1), "conv_x_bias": (1, 0), "gnorm": (1, 0), "out": (1, 0)}


def permute_mixer(p: dict, state_order_GxS, head_order_HxP) -> dict:
    """Apply a d_state order per group and a head_dim order per head (name -> (axis, head axis))."""
    out = dict(p)
    for axes, order in ((STATE_AXES, state_order_GxS), (HEAD_DIM_AXES, head_order_HxP)):
        for name, (axis, head_axis) in axes.items():
            if name in p:
                out[name] = jnp.asarray(lowrank.permute(p[name], order, axis=axis, head_axes=(head_axis,)))
    return out


def sort_block(cfg, blk, p: dict, stats: dict, *, lam: float = 1.0) -> dict:
    """UniQL sorting of one Mamba2 block from its statistics (`collect` summed)."""
    return permute_mixer(p, lowrank.descending_order(state_scores_uniql(cfg, stats)),
                         lowrank.descending_order(head_dim_scores_uniql(stats, lam)))


def baseline_block(cfg, blk, p: dict, kind: str, rng: np.random.Generator) -> dict:
    if kind == "magnitude":
        return permute_mixer(p, state_order_magnitude(p), head_dim_order_magnitude(p))
    return permute_mixer(p, *random_orders(p, rng))
