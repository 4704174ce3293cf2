"""BCQ fitting: the pure cores that choose a ``BCQArray`` (docs/method.md, "UniQuan: UniQuanF",
unified initialization).

The format itself (fields, packing, dequantize, slicing, nested planes) is
``formats/bcq.py``; this module only finds planes, scales and offsets for a weight:
the greedy start, the alternating least-squares / nearest-level fit (``bcq_fit``) and
the least-squares rescaling of the first ``k'`` planes (``refit_alpha``), with the
shared pieces ``uniquan`` builds on (sorted levels, nearest patterns, ``psd_solve``).

The fitting cores work on *rows*: every group of every output position becomes one row
``[R, group_size]`` (``R = G * prod(pre + post)``), see ``to_rows``; ``pack_rows`` turns a
row-layout fit into the packed ``BCQArray``. Pure array functions (no Flax, no I/O).

Shape letters as in docs/method.md ("Notation and shape letters"): R rows, E = group_size
elements of a row, K bits, J unknowns of a solve; here also L = 2**K levels of a row and,
in ``R = G * prod(pre + post)``, G the number of groups along the quantized axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.quant.formats.bcq import (BCQArray, SCALE_DTYPE, check_layout, pack_planes, signs_of,
                                         signs_to_patterns)

# Fits run once, offline: full float32 products (no TF32 / bf16 passes on accelerators).
HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Sign patterns and the row layout shared by all fitting code
# ---------------------------------------------------------------------------


def sign_table(bits: int) -> jax.Array:
    """float32 [2**k, k]: row p holds b_i = +-1 of sign pattern p (column 0 = most significant)."""
    p = np.arange(1 << bits)[:, None]
    shifts = bits - 1 - np.arange(bits)[None, :]
    return jnp.asarray(2.0 * ((p >> shifts) & 1) - 1.0, dtype=jnp.float32)


def pattern_signs(patterns: jax.Array, bits: int) -> jax.Array:
    """Sign patterns int [...] -> float32 signs [..., k] (b_i = 2 bit_i - 1, MSB first)."""
    shifts = bits - 1 - jnp.arange(bits, dtype=jnp.int32)
    return 2.0 * ((patterns[..., None] >> shifts) & 1).astype(jnp.float32) - 1.0


def to_rows(x: jax.Array, group_size: int, axis: int) -> jax.Array:
    """Per-weight array pre+(n,)+post -> rows [R, group_size], one row per (group, pre, post).

    Row order is that of ``pre + (G,) + post`` flattened, the order ``group_rows``
    gives the per-group arrays (alpha, offset).
    """
    axis = axis % x.ndim
    grouped = x.reshape(x.shape[:axis] + (x.shape[axis] // group_size, group_size) + x.shape[axis + 1 :])
    return group_rows(grouped, axis)


def from_rows(rows: jax.Array, shape: tuple[int, ...], group_size: int, axis: int) -> jax.Array:
    """Inverse of ``to_rows``: rows [R, group_size] -> per-weight array of ``shape``."""
    lead = shape[:axis] + (shape[axis] // group_size,) + shape[axis + 1 :]
    return rows_to_groups(rows, lead, axis).reshape(shape)


def group_rows(grouped: jax.Array, axis: int) -> jax.Array:
    """pre + (G, m) + post -> rows [R, m] (m = group_size for weights, k for alpha)."""
    moved = jnp.moveaxis(grouped, axis + 1, -1)
    return moved.reshape(-1, moved.shape[-1])


def rows_to_groups(rows: jax.Array, lead_shape: tuple[int, ...], axis: int) -> jax.Array:
    """Inverse of ``group_rows``: rows [R, m] -> pre + (G, m) + post; ``lead_shape = pre+(G,)+post``."""
    return jnp.moveaxis(rows.reshape(tuple(lead_shape) + rows.shape[-1:]), -1, axis + 1)


def _lead_shape(shape: tuple[int, ...], group_size: int, axis: int) -> tuple[int, ...]:
    return shape[:axis] + (shape[axis] // group_size,) + shape[axis + 1 :]


def pack_rows(patterns_RxE, alpha_RxK, offset_R, *, shape, group_size: int, axis: int,
              scale_dtype=SCALE_DTYPE) -> BCQArray:
    """Row-layout fit (sign patterns [R, g], alpha [R, k], offset [R]) -> packed ``BCQArray``.

    ``scale_dtype`` is float16 for storage; float32 exists to test the fold arithmetic
    separately from float16 rounding.
    """
    shape = tuple(shape)
    axis = axis % len(shape)
    bits = alpha_RxK.shape[-1]
    check_layout(bits, group_size, shape[axis])
    lead = _lead_shape(shape, group_size, axis)
    planes = pack_planes(from_rows(patterns_RxE, shape, group_size, axis), bits, axis)
    alpha = rows_to_groups(alpha_RxK, lead, axis).astype(scale_dtype)
    offset = offset_R.reshape(lead).astype(scale_dtype)
    return BCQArray(planes, alpha, offset, bits, group_size, axis, shape)


# ---------------------------------------------------------------------------
# Nearest levels (value-sorted) and the alternating fit
# ---------------------------------------------------------------------------


def sorted_levels(alpha_RxK: jax.Array):
    """Each row's 2**k levels sorted by value.

    Returns (levels_RxL ascending, pattern_at_rank_RxL, rank_of_pattern_RxL, mids_RxL-1)
    where mids are the decision boundaries halfway between consecutive sorted levels.
    """
    bits = alpha_RxK.shape[-1]
    levels = jnp.matmul(alpha_RxK, sign_table(bits).T, precision=HIGHEST)  # [R, L], column = sign pattern
    pattern_at_rank = jnp.argsort(levels, axis=-1).astype(jnp.int32)
    rank_of_pattern = jnp.argsort(pattern_at_rank, axis=-1).astype(jnp.int32)
    levels_sorted = jnp.take_along_axis(levels, pattern_at_rank, axis=-1)
    mids = 0.5 * (levels_sorted[:, 1:] + levels_sorted[:, :-1])
    return levels_sorted, pattern_at_rank, rank_of_pattern, mids


def nearest_patterns(u_RxE: jax.Array, alpha_RxK: jax.Array) -> jax.Array:
    """Full search: the sign pattern of the level nearest to each u (ties to the lower level).

    rank = #{decision boundaries below u} over the value-sorted levels; int32 [R, E].
    """
    _, pattern_at_rank, _, mids = sorted_levels(alpha_RxK)
    rank = jnp.sum(u_RxE[:, :, None] > mids[:, None, :], axis=-1, dtype=jnp.int32)  # [R, E]
    return jnp.take_along_axis(pattern_at_rank, rank, axis=-1)


def level_values(patterns_RxE: jax.Array, alpha_RxK: jax.Array) -> jax.Array:
    """sum_i alpha_i b_i for each sign pattern, float32 [R, E] (exact in alpha: linear)."""
    bits = alpha_RxK.shape[-1]
    total = jnp.zeros(patterns_RxE.shape, jnp.float32)
    for i in range(bits):  # a loop instead of a [R, E, k] gather keeps memory at one weight copy
        b_i = 2.0 * ((patterns_RxE >> (bits - 1 - i)) & 1).astype(jnp.float32) - 1.0
        total = total + alpha_RxK[:, i : i + 1] * b_i
    return total


def canonical_rows(alpha_RxK: jax.Array, patterns_RxE: jax.Array):
    """Same levels with alpha >= 0 sorted descending: flip each plane whose scale is negative,
    then order planes by scale (most significant first, what nested precision keeps)."""
    bits = alpha_RxK.shape[-1]
    signs = pattern_signs(patterns_RxE, bits) * jnp.where(alpha_RxK < 0, -1.0, 1.0)[:, None, :]  # [R, E, k]
    order = jnp.argsort(-jnp.abs(alpha_RxK), axis=-1)  # [R, k]
    alpha = jnp.take_along_axis(jnp.abs(alpha_RxK), order, axis=-1)
    signs = jnp.take_along_axis(signs, order[:, None, :], axis=-1)
    return alpha, signs_to_patterns(signs)


def psd_solve(gram_BxJxJ: jax.Array, rhs_BxJ: jax.Array, rtol: float = 1e-6) -> jax.Array:
    """Minimum-norm solution of batched normal equations ``gram theta = rhs`` (gram PSD).

    Pseudo-inverse through ``eigh``: eigenvalues below ``rtol * max`` are dropped, so
    rank-deficient designs (a plane constant over its group, two equal planes) stay finite.
    """
    eigval, eigvec = jnp.linalg.eigh(gram_BxJxJ)  # [B, J], [B, J, J]
    keep = eigval > rtol * jnp.max(eigval, axis=-1, keepdims=True)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, eigval, 1.0), 0.0)
    coeff = jnp.einsum("bji,bj->bi", eigvec, rhs_BxJ, precision=HIGHEST) * inv
    return jnp.einsum("bij,bj->bi", eigvec, coeff, precision=HIGHEST)


def _least_squares_rows(design_RxExJ: jax.Array, target_RxE: jax.Array) -> jax.Array:
    """Per-row least squares min ||D theta - t||^2 via the normal equations; [R, J]."""
    gram = jnp.einsum("rei,rej->rij", design_RxExJ, design_RxExJ, precision=HIGHEST)
    rhs = jnp.einsum("rei,re->ri", design_RxExJ, target_RxE, precision=HIGHEST)
    return psd_solve(gram, rhs)


def _ls_alpha_offset(x_RxE, patterns_RxE, bits):
    """Least-squares (alpha, o) with codes fixed, canonicalized to alpha >= 0 sorted descending.

    Flipping the sign of a plane together with its scale, or permuting planes, leaves the
    level set unchanged, so the canonical form costs nothing and puts the most significant
    plane first (what nested precision truncates to).
    """
    signs = pattern_signs(patterns_RxE, bits)  # [R, E, k]
    design = jnp.concatenate([signs, jnp.ones_like(signs[..., :1])], axis=-1)  # [R, E, k+1]
    theta = _least_squares_rows(design, x_RxE)
    alpha, offset = theta[:, :bits], theta[:, bits]
    return jnp.sort(jnp.abs(alpha), axis=-1)[:, ::-1], offset


def greedy_fit_rows(x_RxE: jax.Array, bits: int):
    """Greedy BCQ start (docs/method.md, "UniQuan: UniQuanF"): o = mean, then per plane
    alpha_i = mean|residual|, b_i = sign(residual). Returns (alpha [R,k], offset [R], patterns [R,E])."""
    offset = jnp.mean(x_RxE, axis=-1)
    residual = x_RxE - offset[:, None]
    alphas, signs = [], []
    for _ in range(bits):
        b = jnp.where(residual >= 0, 1.0, -1.0)
        a = jnp.mean(jnp.abs(residual), axis=-1)
        residual = residual - a[:, None] * b
        alphas.append(a)
        signs.append(b)
    return jnp.stack(alphas, -1), offset, signs_to_patterns(jnp.stack(signs, -1))


def _row_sq_error(x_RxE, patterns, alpha, offset):
    return jnp.sum((x_RxE - level_values(patterns, alpha) - offset[:, None]) ** 2, axis=-1)


def alternating_fit_rows(x_RxE: jax.Array, *, bits: int, rounds: int, init=None):
    """Alternating BCQ fit per row (docs/method.md, "UniQuan: UniQuanF", unified initialization).

    Start: greedy (``init=None``) or given per-row (alpha [R,k], offset [R]) with nearest codes.
    Each round: least-squares (alpha, o) with codes fixed, then nearest-level codes with
    (alpha, o) fixed. Both steps minimize the same squared error over one block of
    variables, so the per-row error trace is non-increasing.

    Returns (alpha [R,k], offset [R], patterns int32 [R,E], errors [rounds+1, R]) where
    ``errors[t]`` is the squared error after round t (t = 0: the start) and the returned
    fit is each row's best iterate.
    """
    if init is None:
        alpha, offset, patterns = greedy_fit_rows(x_RxE, bits)
    else:
        alpha, offset = init
        patterns = nearest_patterns(x_RxE - offset[:, None], alpha)
    err = _row_sq_error(x_RxE, patterns, alpha, offset)

    def one_round(carry, _):
        alpha, offset, patterns, err, best = carry
        alpha, offset = _ls_alpha_offset(x_RxE, patterns, bits)
        patterns = nearest_patterns(x_RxE - offset[:, None], alpha)
        err = _row_sq_error(x_RxE, patterns, alpha, offset)
        better = err < best[3]
        best = tuple(jnp.where(better.reshape((-1,) + (1,) * (v.ndim - 1)), n, v)
                     for n, v in zip((alpha, offset, patterns, err), best))
        return (alpha, offset, patterns, err, best), err

    start = (alpha, offset, patterns, err)
    (_, _, _, _, best), errs = jax.lax.scan(one_round, start + (start,), None, length=rounds)
    errors = jnp.concatenate([err[None], errs], axis=0)
    return best[0], best[1], best[2], errors


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "rounds", "axis"))
def bcq_fit(W: jax.Array, *, bits: int, group_size: int, rounds: int = 15, axis: int = 0) -> BCQArray:
    """Alternating BCQ fit of a weight (greedy start, ``rounds`` rounds), per group along ``axis``.

    The fitted scales are rounded to float16 storage and the codes re-chosen as the
    nearest stored levels, so the packed weight is exactly what was evaluated last.
    """
    axis = axis % W.ndim
    check_layout(bits, group_size, W.shape[axis])
    x = to_rows(W.astype(jnp.float32), group_size, axis)  # [R, g]
    alpha, offset, _, _ = alternating_fit_rows(x, bits=bits, rounds=rounds)
    alpha = alpha.astype(SCALE_DTYPE).astype(jnp.float32)
    offset = offset.astype(SCALE_DTYPE).astype(jnp.float32)
    patterns = nearest_patterns(x - offset[:, None], alpha)
    return pack_rows(patterns, alpha, offset, shape=W.shape, group_size=group_size, axis=axis)


# ---------------------------------------------------------------------------
# Nested precision: least-squares scales for the first k' planes
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k_new", "column_block"))
def refit_alpha(b: BCQArray, W: jax.Array, k_new: int, *, H: jax.Array | None = None, damp: float = 0.01,
                column_block: int = 64):
    """Least-squares (alpha, offset) for the first ``k_new`` planes of ``b`` (codes fixed).

    Minimizes sum over output positions m of ``(w_m - w_hat_m)^T H (w_m - w_hat_m)`` where
    ``w_m`` is the full-precision column along the quantized axis and
    ``H = X^T X / N`` the calibration correlation of that axis (output error of
    ``X @ W``); ``H=None`` is the weight error (groups then decouple). ``damp`` adds
    ``damp * mean(diag H) * I`` to ``H`` (as GPTQ does); ``damp=0`` gives the exact
    least-squares optimum, hence never worse than truncating the stored scales.
    With ``H`` all groups of a column are solved jointly: a ``[G(k'+1)]^2`` system per
    column, built ``column_block`` columns at a time.

    Returns (alpha_new ``pre + (G, k_new) + post``, offset_new ``pre + (G,) + post``) in
    float16, for ``drop_planes(b, k_new, alpha_new, offset_new)``.
    """
    if not 1 <= k_new <= b.bits:
        raise ValueError(f"k_new must be in [1, {b.bits}], got {k_new}")
    axis, g = b.axis, b.group_size
    lead = _lead_shape(b.shape, g, axis)
    signs = jnp.moveaxis(signs_of(b), axis + 1, -1)[..., :k_new]  # logical shape + (k',)
    if H is None:
        x = to_rows(W.astype(jnp.float32), g, axis)  # [R, g]
        design = jnp.concatenate(
            [jax.vmap(lambda s: to_rows(s, g, axis), in_axes=-1, out_axes=-1)(signs),
             jnp.ones(x.shape + (1,), jnp.float32)], axis=-1)  # [R, g, k'+1]
        theta = _least_squares_rows(design, x)
        alpha = rows_to_groups(theta[:, :k_new], lead, axis)
        offset = theta[:, k_new].reshape(lead)
        return alpha.astype(SCALE_DTYPE), offset.astype(SCALE_DTYPE)

    n = b.shape[axis]
    G, J = n // g, k_new + 1
    H = jnp.asarray(H, jnp.float32)
    H = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(n, dtype=jnp.float32)
    w_Mn = jnp.moveaxis(W.astype(jnp.float32), axis, -1).reshape(-1, n)  # [M, n], columns in pre+post order
    s_Mnk = jnp.moveaxis(signs, axis, -2).reshape(-1, n, k_new)  # [M, n, k']
    M = w_Mn.shape[0]
    blocks = -(-M // column_block)
    pad = blocks * column_block - M  # zero columns solve to zero, then are dropped
    w_blocks = jnp.pad(w_Mn, ((0, pad), (0, 0))).reshape(blocks, column_block, n)
    s_blocks = jnp.pad(s_Mnk, ((0, pad), (0, 0), (0, 0))).reshape(blocks, column_block, n, k_new)
    theta = jax.lax.map(lambda ws: _refit_columns(H, ws[0], ws[1], g), (w_blocks, s_blocks))  # [blocks, B, G*J]
    theta = theta.reshape(blocks * column_block, G, J)[:M]  # [M, G, J]
    rest = b.shape[:axis] + b.shape[axis + 1 :]
    theta = jnp.moveaxis(theta.reshape(rest + (G, J)), (-2, -1), (axis, axis + 1))  # pre + (G, J) + post
    alpha = jax.lax.slice_in_dim(theta, 0, k_new, axis=axis + 1)
    offset = jax.lax.index_in_dim(theta, k_new, axis=axis + 1, keepdims=False)
    return alpha.astype(SCALE_DTYPE), offset.astype(SCALE_DTYPE)


def _refit_columns(H_nxn, w_Bxn, signs_BxnxK, group_size):
    """Joint normal equations of all groups of each column: theta [B, G*J] (J = k'+1).

    Feature (g, j) of a column is plane j (or 1 for the offset) on group g and 0 elsewhere.
    """
    B, n, k = signs_BxnxK.shape
    G = n // group_size
    design = jnp.concatenate([signs_BxnxK, jnp.ones((B, n, 1), jnp.float32)], axis=-1)  # [B, n, J]
    design = design.reshape(B, G, group_size, k + 1)
    HA = jnp.einsum("nhs,bhsj->bnhj", H_nxn.reshape(n, G, group_size), design, precision=HIGHEST)  # [B, n, G, J]
    gram = jnp.einsum("bgsi,bgshj->bgihj", design, HA.reshape(B, G, group_size, G, k + 1), precision=HIGHEST)
    Hw = jnp.matmul(w_Bxn, H_nxn, precision=HIGHEST)  # H symmetric
    rhs = jnp.einsum("bgsi,bgs->bgi", design, Hw.reshape(B, G, group_size), precision=HIGHEST)
    P = G * (k + 1)
    return psd_solve(gram.reshape(B, P, P), rhs.reshape(B, P))
