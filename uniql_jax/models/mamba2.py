"""Mamba2 mixer (selective state-space duality, SSD) in the elastic layout.

Reference: T. Dao and A. Gu, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality", ICML 2024
(arXiv 2405.21060). Section numbers below refer to that paper.

One block is ``x + out(gnorm(SSM(conv(in_proj(norm(x))))))`` where the Hugging Face
``in_proj`` packs ``[z | x | B | C | dt]`` and the depthwise causal conv runs over
``[x | B | C]``. Here every packed part is its own weight and every prunable axis its
own array axis, so a pruning rate keeps a leading box of each array. Shape letters in this
module are its own (C is the name of the SSM output projection here): C = head_dim (P of
docs/method.md), N = d_state (S), R_g = SSM groups (G), W = conv kernel width, L = SSD chunk
length (C there); P in the SSD core is head_dim as in docs/method.md. The arrays:

  norm   [D]            block pre-norm
  z, x   [D, H, C]      gate and SSM input, C = kept Mamba head_dim
  B, C   [D, R_g, N]    input / output state projections, N = kept d_state per group
  dt     [D, H]         time-step logits (never pruned)
  conv_x [W, H, C], conv_B / conv_C [W, R_g, N]   depthwise causal conv taps
  conv_x_bias [H, C], conv_B_bias / conv_C_bias [R_g, N]   (when cfg.conv_bias)
  dt_bias, A_log, D [H] per-head time-step bias, log(-A), skip (never pruned)
  gnorm  [H, C]         gated RMSNorm weight
  out    [H, C, D]      out_proj (quantized along C later)

Heads, groups, dt, A and D are never pruned. The gated RMSNorm normalizes each group of
heads over its *kept* channels only, so a masked full model equals the sliced model
(docs/method.md, "What we do differently from the reference code", 1). The time step is clipped to
``cfg.time_step_limit`` in both the chunked and the recurrent path (transformers clips only in
its chunked path), so cached decoding equals the full forward.

Letters: b batch, t/l/s time (l, s inside a chunk), c/z chunk, g SSM group, h head
inside its group (H = R_g * h), p head channel (C), n state channel (N), w conv tap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniql_jax.config import Mamba2Block, ModelConfig
from uniql_jax.models.attention import keep_mask
from uniql_jax.models.layers import dense_init, rms_norm, wdot

F32 = jnp.float32


# --------------------------------------------------------------------------- SSD core
def segsum(a: jax.Array) -> jax.Array:
    """Stable segment sums: a [..., L] -> S [..., L, L], S[i, j] = sum_{j<k<=i} a[k], -inf above the diagonal.

    exp(S) is the 1-semiseparable mask L of SSD Sec. 3 (scalar-times-identity A: the decay from step j to
    step i). A masked cumulative sum avoids the cancellation of cumsum(a)[i] - cumsum(a)[j].
    """
    L = a.shape[-1]
    a_kj = jnp.broadcast_to(a[..., :, None], a.shape + (L,))  # [..., k, j] = a[k]
    strictly_below = jnp.tril(jnp.ones((L, L), bool), -1)  # k > j
    s_ij = jnp.cumsum(jnp.where(strictly_below, a_kj, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((L, L), bool)), s_ij, -jnp.inf)


def _split_heads(x_BxTxHxP: jax.Array, groups: int) -> jax.Array:
    """[..., H, P] -> [..., R_g, H/R_g, P]: heads of one group are contiguous (as in HF / mamba_ssm)."""
    *lead, H, P = x_BxTxHxP.shape
    return x_BxTxHxP.reshape(*lead, groups, H // groups, P)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """Chunked SSD scan: the block decomposition of the semiseparable matrix (SSD Sec. 6).

    The sequence is cut into chunks of `chunk_size` (the tail zero-padded: dt = 0 there, so
    padding neither decays nor feeds the state). Within a chunk the output is the quadratic
    "attention-like" form (diagonal blocks, step 1); chunk states are summarized
    (step 2), passed between chunks by a short recurrence written as a semiseparable matrix over
    chunks (step 3), and read out by C (step 4).

    x [B, T, H, P], dt [B, T, H] (already softplus'ed and clipped), A [H] (negative),
    B, C [B, T, R_g, N], initial_state [B, H, P, N] or None.
    Returns y [B, T, H, P] (float32, without the D skip) and the final state [B, H, P, N] (float32).
    """
    b, T, H, P = x.shape
    Rg, N = B.shape[-2:]
    L = chunk_size
    pad = (-T) % L
    nc = (T + pad) // L

    dt = dt.astype(F32)
    xdt = x.astype(F32) * dt[..., None]  # Δ·x: the discretized input (B̄ x with B̄ = Δ B)
    a = dt * A.astype(F32)  # [b, T, H] log of the per-step decay Ā = exp(Δ A)

    def chunks(u):  # [b, T, ...] -> [b, nc, L, ...]
        u = jnp.pad(u, [(0, 0), (0, pad)] + [(0, 0)] * (u.ndim - 2))
        return u.reshape(b, nc, L, *u.shape[2:])

    X = _split_heads(chunks(xdt), Rg)  # [b, c, l, g, h, p]
    Bc, Cc = chunks(B.astype(F32)), chunks(C.astype(F32))  # [b, c, l, g, n]
    a = chunks(a).reshape(b, nc, L, Rg, H // Rg).transpose(0, 3, 4, 1, 2)  # [b, g, h, c, l]
    a_cs = jnp.cumsum(a, axis=-1)  # [b, g, h, c, l]

    # 1. intra-chunk outputs: (C_l · B_s) * decay(s -> l), the structured masked attention of Sec. 4-5.
    decay_ls = jnp.exp(segsum(a))  # [b, g, h, c, l, s]
    CB = jnp.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y_diag = jnp.einsum("bcgls,bghcls,bcsghp->bclghp", CB, decay_ls, X)

    # 2. state of each chunk at its end, starting from zero.
    decay_to_end = jnp.exp(a_cs[..., -1:] - a_cs)  # [b, g, h, c, l]
    chunk_states = jnp.einsum("bclgn,bghcl,bclghp->bcghpn", Bc, decay_to_end, X)

    # 3. inter-chunk recurrence: state entering each chunk (plus the final one).
    if initial_state is None:
        h0 = jnp.zeros((b, 1, Rg, H // Rg, P, N), F32)
    else:
        h0 = _split_heads(initial_state.astype(F32).reshape(b, H, P * N), Rg).reshape(b, 1, Rg, H // Rg, P, N)
    states = jnp.concatenate([h0, chunk_states], axis=1)  # [b, c+1, g, h, p, n]
    chunk_decay = jnp.exp(segsum(jnp.pad(a_cs[..., -1], [(0, 0)] * 3 + [(1, 0)])))  # [b, g, h, z, c]
    entering = jnp.einsum("bghzc,bcghpn->bzghpn", chunk_decay, states)  # [b, c+1, g, h, p, n]
    prev_states, final_state = entering[:, :-1], entering[:, -1]

    # 4. contribution of the entering state to each position: C_l · h decayed to l.
    y_off = jnp.einsum("bclgn,bcghpn,bghcl->bclghp", Cc, prev_states, jnp.exp(a_cs))

    y = (y_diag + y_off).reshape(b, nc * L, H, P)[:, :T]
    return y, final_state.reshape(b, H, P, N)


def ssd_recurrent_step(state, x, dt, A, B, C):
    """One step of the selective SSM recurrence (SSD eq. (1), discretized: Ā = exp(Δ A), B̄ = Δ B):

        h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ,     y_t = h_t C_t

    state [B, H, P, N] float32, x [B, H, P], dt [B, H] (softplus'ed, clipped), A [H],
    B, C [B, R_g, N]. Returns y [B, H, P] float32 (without the D skip) and the new state.
    """
    b, H, P = x.shape
    Rg, N = B.shape[-2:]
    dt = dt.astype(F32)
    decay = jnp.exp(dt * A.astype(F32))  # [b, H]
    h = state.astype(F32).reshape(b, Rg, H // Rg, P, N)
    dx = _split_heads((dt[..., None] * x.astype(F32)), Rg)  # [b, g, h, p]
    h = h * decay.reshape(b, Rg, H // Rg, 1, 1) + jnp.einsum("bghp,bgn->bghpn", dx, B.astype(F32))
    y = jnp.einsum("bghpn,bgn->bghp", h, C.astype(F32))
    return y.reshape(b, H, P), h.reshape(b, H, P, N)


def ssd_sequential(x, dt, A, B, C, initial_state=None):
    """Reference: `ssd_recurrent_step` scanned over time (the linear recurrence, SSD eq. (1)).

    Same arguments and results as `ssd_chunked`; used by the tests as ground truth.
    """
    b, T, H, P = x.shape
    N = B.shape[-1]
    h0 = jnp.zeros((b, H, P, N), F32) if initial_state is None else initial_state.astype(F32)

    def step(h, inputs):
        y, h = ssd_recurrent_step(h, *inputs[:2], A, *inputs[2:])
        return h, y

    xs = tuple(jnp.moveaxis(u, 1, 0) for u in (x, dt, B, C))
    final, ys = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(ys, 0, 1), final


# --------------------------------------------------------------------------- pieces
def causal_conv(u, taps, bias, state=None):
    """Depthwise causal conv1d (PyTorch cross-correlation with W-1 left padding, as HF's conv1d).

    u [B, T, ...channels], taps [W, ...channels] (tap W-1 multiplies the current token),
    bias [...channels] or None, state [B, W-1, ...channels]: the W-1 inputs before u (zeros at
    the start of a sequence). Returns (out [B, T, ...] float32, new state: the last W-1 inputs).
    """
    W, T = taps.shape[0], u.shape[1]
    if state is None:
        state = jnp.zeros((u.shape[0], W - 1) + u.shape[2:], u.dtype)
    full = jnp.concatenate([state.astype(u.dtype), u], axis=1)  # [B, W-1+T, ...]
    fullf, tapsf = full.astype(F32), taps.astype(F32)
    out = sum(fullf[:, k:k + T] * tapsf[k] for k in range(W))
    if bias is not None:
        out = out + bias.astype(F32)
    return out, full[:, T:].astype(state.dtype)


def gated_group_rms_norm(y, z, w, groups: int, eps: float, kept=None):
    """Gated RMSNorm of Mamba2 (norm_before_gate=False): g = y * silu(z), normalized per group.

    y, z [B, T, H, C]; w [H, C]. A group is H/R_g consecutive heads, i.e. (H/R_g)·C channels.
    `kept` (possibly traced) is the number of kept channels per head when the channels beyond
    it are masked to zero: the mean is then taken over the kept channels only, so the masked
    model equals the sliced one. Returns float32 [B, T, H, C].
    """
    g = y.astype(F32) * jax.nn.silu(z.astype(F32))
    b, T, H, C = g.shape
    gg = g.reshape(b, T, groups, H // groups * C)
    count = (H // groups) * (C if kept is None else kept)
    var = jnp.sum(gg * gg, axis=-1, keepdims=True) / jnp.asarray(count, F32)
    gg = gg * jax.lax.rsqrt(var + eps)
    return gg.reshape(b, T, H, C) * w.astype(F32)


def _inverse_softplus(y: np.ndarray) -> np.ndarray:
    return y + np.log(-np.expm1(-y))


# --------------------------------------------------------------------------- module
class Mamba2(nnx.Module):
    """One Mamba2 block: returns the residual update mixer(norm(x)) and the updated cache."""

    def __init__(self, cfg: ModelConfig, blk: Mamba2Block, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.blk = cfg, blk
        D, H, Rg, W = cfg.hidden_size, cfg.ssm_heads, cfg.ssm_groups, cfg.conv_kernel
        if H % Rg:
            raise ValueError(f"ssm_heads ({H}) must be a multiple of ssm_groups ({Rg})")
        C, N = blk.head_dim, blk.d_state
        self.norm = nnx.Param(jnp.ones((D,), dtype))
        self.z = nnx.Param(dense_init(rngs, (D, H, C), D, dtype))
        self.x = nnx.Param(dense_init(rngs, (D, H, C), D, dtype))
        self.B = nnx.Param(dense_init(rngs, (D, Rg, N), D, dtype))
        self.C = nnx.Param(dense_init(rngs, (D, Rg, N), D, dtype))
        self.dt = nnx.Param(dense_init(rngs, (D, H), D, dtype))
        conv_scale = 1.0 / np.sqrt(W)  # kaiming-uniform-like magnitude for fan_in = W
        self.conv_x = nnx.Param((conv_scale * jax.random.normal(rngs.params(), (W, H, C))).astype(dtype))
        self.conv_B = nnx.Param((conv_scale * jax.random.normal(rngs.params(), (W, Rg, N))).astype(dtype))
        self.conv_C = nnx.Param((conv_scale * jax.random.normal(rngs.params(), (W, Rg, N))).astype(dtype))
        if cfg.conv_bias:
            self.conv_x_bias = nnx.Param(jnp.zeros((H, C), dtype))
            self.conv_B_bias = nnx.Param(jnp.zeros((Rg, N), dtype))
            self.conv_C_bias = nnx.Param(jnp.zeros((Rg, N), dtype))
        # mamba_ssm's Mamba2 init: Δ log-spaced in [1e-3, 1e-1] (through dt_bias), A = -(1..H)
        dt0 = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), H))
        self.dt_bias = nnx.Param(jnp.asarray(_inverse_softplus(dt0), dtype))
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, H + 1, dtype=F32)).astype(dtype))
        self.D = nnx.Param(jnp.ones((H,), dtype))
        self.gnorm = nnx.Param(jnp.ones((H, C), dtype))
        self.out = nnx.Param(dense_init(rngs, (H, C, D), H * C, dtype))

    def _conv_bias(self, name):
        return getattr(self, name).get_value() if self.cfg.conv_bias else None

    def __call__(self, x, positions=None, cache=None, mask=None, impl="xla"):
        """x [B, T, D] residual stream (positions unused: the SSM is position-free).

        cache: None, or the dict of `init_mamba2_cache` (T >= 1 new tokens; T == 1 takes the
        recurrent step, T > 1 the chunked scan started from the cached state).
        mask: None, or {"d_state": kept N, "head_dim": kept C} (ints, possibly traced).
        Returns (update [B, T, D], cache).
        """
        cfg = self.cfg
        T = x.shape[1]
        h = rms_norm(x, self.norm.get_value(), cfg.rms_norm_eps)
        z = wdot("btd,dhp->bthp", h, self.z.get_value(), impl)
        xs = wdot("btd,dhp->bthp", h, self.x.get_value(), impl)
        Bs = wdot("btd,dgn->btgn", h, self.B.get_value(), impl)
        Cs = wdot("btd,dgn->btgn", h, self.C.get_value(), impl)
        dt_logit = wdot("btd,dh->bth", h, self.dt.get_value(), impl)

        # depthwise causal conv over [x | B | C] + SiLU (the Mamba-2 block, SSD Sec. 7.1)
        state = cache or {}
        xs_c, conv_x = causal_conv(xs, self.conv_x.get_value(), self._conv_bias("conv_x_bias"), state.get("conv_x"))
        Bs_c, conv_B = causal_conv(Bs, self.conv_B.get_value(), self._conv_bias("conv_B_bias"), state.get("conv_B"))
        Cs_c, conv_C = causal_conv(Cs, self.conv_C.get_value(), self._conv_bias("conv_C_bias"), state.get("conv_C"))
        xs_c, Bs_c, Cs_c = (jax.nn.silu(u) for u in (xs_c, Bs_c, Cs_c))  # float32
        kept_c = None
        if mask is not None:
            kept_c = mask["head_dim"]
            xs_c = xs_c * keep_mask(self.blk.head_dim, kept_c, F32)
            m_n = keep_mask(self.blk.d_state, mask["d_state"], F32)
            Bs_c, Cs_c = Bs_c * m_n, Cs_c * m_n

        dt = jax.nn.softplus(dt_logit.astype(F32) + self.dt_bias.get_value().astype(F32))
        dt = jnp.clip(dt, *cfg.time_step_limit)
        A = -jnp.exp(self.A_log.get_value().astype(F32))

        if cache is not None and T == 1:
            y, ssm = ssd_recurrent_step(cache["ssm"], xs_c[:, 0], dt[:, 0], A, Bs_c[:, 0], Cs_c[:, 0])
            y = y[:, None]
        else:
            init = None if cache is None else cache["ssm"]
            y, ssm = ssd_chunked(xs_c, dt, A, Bs_c, Cs_c, cfg.ssm_chunk_size, init)
        y = y + self.D.get_value().astype(F32)[:, None] * xs_c  # D skip on the (conv'ed) input

        g = gated_group_rms_norm(y, z, self.gnorm.get_value(), cfg.ssm_groups, cfg.ssm_norm_eps, kept_c)
        if mask is not None:  # zero already unless the cached state was filled at a larger size
            g = g * keep_mask(self.blk.head_dim, kept_c, F32)
        out = wdot("bthp,hpd->btd", g.astype(x.dtype), self.out.get_value(), impl)
        if cache is not None:
            cache = {"conv_x": conv_x, "conv_B": conv_B, "conv_C": conv_C, "ssm": ssm}
        return out, cache


def init_mamba2_cache(cfg: ModelConfig, blk: Mamba2Block, batch: int, max_len: int, dtype) -> dict:
    """Decode state of one Mamba2 block; its size does not depend on `max_len`.

    conv_x [B, W-1, H, C], conv_B / conv_C [B, W-1, R_g, N]: the last W-1 conv inputs (dtype);
    ssm [B, H, C, N] float32: the SSM state h of SSD eq. (1).
    """
    del max_len
    H, Rg, Wm1 = cfg.ssm_heads, cfg.ssm_groups, cfg.conv_kernel - 1
    C, N = blk.head_dim, blk.d_state
    return {
        "conv_x": jnp.zeros((batch, Wm1, H, C), dtype),
        "conv_B": jnp.zeros((batch, Wm1, Rg, N), dtype),
        "conv_C": jnp.zeros((batch, Wm1, Rg, N), dtype),
        "ssm": jnp.zeros((batch, H, C, N), F32),
    }
