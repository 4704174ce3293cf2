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


def _float_after(a, b):
    """a sorts after b in ``jnp.sort`` order (-0.0 == 0.0, NaNs last)."""
    return (a > b) | (jnp.isnan(a) & ~jnp.isnan(b))


def _float_equal(a, b):
    return (a == b) | (jnp.isnan(a) & jnp.isnan(b))


def sorted_levels(alpha_RxK: jax.Array):
    """Each row's 2**k levels sorted by value.

    Returns (levels_RxL ascending, pattern_at_rank_RxL, rank_of_pattern_RxL, mids_RxL-1)
    where mids are the decision boundaries halfway between consecutive sorted levels.

    The order is exactly that of ``jnp.argsort(levels, stable=True)`` (ties to the lower
    pattern, -0.0 == 0.0, NaN last), computed by counting: a pattern's rank is the number
    of levels sorted before it ([R, L, L] compares), then one scatter inverts it. XLA's
    CPU sort costs about a microsecond per row of 16; this is ~20x cheaper.
    """
    bits = alpha_RxK.shape[-1]
    L = 1 << bits
    levels = jnp.matmul(alpha_RxK, sign_table(bits).T, precision=HIGHEST)  # [R, L], column = sign pattern
    mine, other = levels[:, :, None], levels[:, None, :]
    lower_index = jnp.arange(L)[None, None, :] < jnp.arange(L)[None, :, None]
    before = _float_after(mine, other) | (_float_equal(mine, other) & lower_index)  # [R, p, q]: q sorts before p
    rank_of_pattern = jnp.sum(before, axis=-1, dtype=jnp.int32)
    rows = jnp.arange(levels.shape[0])[:, None]
    pattern_at_rank = jnp.zeros_like(rank_of_pattern).at[rows, rank_of_pattern].set(
        jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), rank_of_pattern.shape), unique_indices=True)
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


def _gram_rhs(design_RxExJ: jax.Array, target_RxE: jax.Array):
    """Per-row normal equations of min ||D theta - t||^2: (D^T D [R, J, J], D^T t [R, J])."""
    gram = jnp.einsum("rei,rej->rij", design_RxExJ, design_RxExJ, precision=HIGHEST)
    return gram, jnp.einsum("rei,re->ri", design_RxExJ, target_RxE, precision=HIGHEST)


def _least_squares_rows(design_RxExJ: jax.Array, target_RxE: jax.Array) -> jax.Array:
    """Per-row least squares min ||D theta - t||^2 via the normal equations; [R, J]."""
    return psd_solve(*_gram_rhs(design_RxExJ, target_RxE))


# Rows whose normal equations are this well conditioned (trace(G) trace(G^-1) below it, which
# bounds cond(G)) are solved by Cholesky; psd_solve would keep every eigenvalue of them
# (it drops those under 1e-6 of the largest), so both give the same solution up to rounding.
CHOLESKY_MAX_COND = 1e4


def _cholesky_rows(gram_RxJxJ: jax.Array, rhs_RxJ: jax.Array):
    """Unrolled Cholesky solve of many small SPD systems (elementwise over rows, J <= 9).

    Returns (theta [R, J], well_conditioned [R]): ``well_conditioned`` holds where
    ``trace(G) trace(G^-1) < CHOLESKY_MAX_COND`` (false for singular or non-finite rows).
    Batched ``eigh`` / LAPACK calls cost microseconds per tiny matrix on CPU; this costs
    a few hundred flops per row.
    """
    J = gram_RxJxJ.shape[-1]
    g = [[gram_RxJxJ[:, i, j] for j in range(J)] for i in range(J)]
    low = [[None] * J for _ in range(J)]  # G = low low^T
    for j in range(J):
        d = g[j][j] - sum((low[j][m] * low[j][m] for m in range(j)), jnp.zeros_like(g[j][j]))
        low[j][j] = jnp.sqrt(d)
        for i in range(j + 1, J):
            low[i][j] = (g[i][j] - sum((low[i][m] * low[j][m] for m in range(j)), jnp.zeros_like(d))) / low[j][j]
    inv = [[None] * J for _ in range(J)]  # low^-1, lower triangular
    for i in range(J):
        inv[i][i] = 1.0 / low[i][i]
        for j in range(i):
            inv[i][j] = -inv[i][i] * sum((low[i][m] * inv[m][j] for m in range(j, i)), jnp.zeros_like(low[i][i]))
    y = [sum((inv[i][m] * rhs_RxJ[:, m] for m in range(i + 1)), jnp.zeros_like(rhs_RxJ[:, 0])) for i in range(J)]
    theta = [sum((inv[m][i] * y[m] for m in range(i, J)), jnp.zeros_like(y[0])) for i in range(J)]
    trace_inv = sum(inv[i][j] * inv[i][j] for i in range(J) for j in range(i + 1))  # trace(G^-1)
    trace = sum(g[i][i] for i in range(J))
    ok = trace * trace_inv < CHOLESKY_MAX_COND  # NaN (singular) compares false
    return jnp.stack(theta, -1), ok


def small_psd_solve(gram_RxJxJ: jax.Array, rhs_RxJ: jax.Array, fallback_rows: int | None = None) -> jax.Array:
    """``psd_solve`` for many tiny systems: Cholesky where well conditioned, ``psd_solve``
    (minimum norm through ``eigh``) on the other rows.

    The ill-conditioned rows (rank-deficient designs: a plane constant over its group,
    fewer distinct codes than unknowns) are gathered into a buffer of ``fallback_rows``
    rows (default R / 32); if more rows need it, every row goes through ``psd_solve``.
    """
    R = gram_RxJxJ.shape[0]
    theta, ok = _cholesky_rows(gram_RxJxJ, rhs_RxJ)
    bad = ~ok
    size = min(R, fallback_rows or max(R // 32, 8))
    idx = jnp.nonzero(bad, size=size, fill_value=0)[0]

    def some():
        fixed = theta.at[idx].set(psd_solve(gram_RxJxJ[idx], rhs_RxJ[idx]))
        return jnp.where(bad[:, None], fixed, theta)

    return jax.lax.cond(jnp.sum(bad) > size, lambda: psd_solve(gram_RxJxJ, rhs_RxJ), some)


def _sort_descending(a_RxK: jax.Array) -> jax.Array:
    """``jnp.sort(a, -1)[:, ::-1]`` for a few columns (odd-even transposition network: exact
    min / max, no XLA sort). NaN-free input."""
    cols = [a_RxK[:, i] for i in range(a_RxK.shape[-1])]
    for r in range(len(cols)):
        for i in range(r % 2, len(cols) - 1, 2):
            cols[i], cols[i + 1] = jnp.maximum(cols[i], cols[i + 1]), jnp.minimum(cols[i], cols[i + 1])
    return jnp.stack(cols, -1)


def _canonical_alpha_offset(theta_RxJ, bits):
    """(alpha, o) from a least-squares solution, alpha -> |alpha| sorted descending.

    Flipping the sign of a plane together with its scale, or permuting planes, leaves the
    level set unchanged, so the canonical form costs nothing and puts the most significant
    plane first (what nested precision truncates to).
    """
    return _sort_descending(jnp.abs(theta_RxJ[:, :bits])), theta_RxJ[:, bits]


def _normal_equations(x_RxE, patterns_RxE, bits):
    """Gram [R, k+1, k+1] and right-hand side [R, k+1] of (alpha, o) with codes fixed (any codes)."""
    signs = pattern_signs(patterns_RxE, bits)  # [R, E, k]
    return _gram_rhs(jnp.concatenate([signs, jnp.ones_like(signs[..., :1])], axis=-1), x_RxE)  # design [R, E, k+1]


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


def _row_counts_at_most(rank_RxE: jax.Array, levels: int) -> jax.Array:
    """#{e : rank[e] <= j} for j < levels - 1, int32 [R, levels-1].

    Several counts share one int32 row sum, each in its own bit field wide enough for E:
    XLA on CPU reduces a [R, E] row fast but a [R, M, E] one over E ~50x slower.
    """
    E = rank_RxE.shape[-1]
    width = E.bit_length()  # a field holds counts up to E
    per_word = max(31 // width, 1)
    counts = []
    for first in range(0, levels - 1, per_word):
        js = range(first, min(first + per_word, levels - 1))
        word = jnp.sum(sum((rank_RxE <= j).astype(jnp.int32) << (width * (j - first)) for j in js), axis=-1)
        counts += [(word >> (width * (j - first))) & ((1 << width) - 1) for j in js]
    return jnp.stack(counts, -1)


def _nearest_step_sorted(x_RxE, prefix_RxE1, alpha_RxK, offset_R):
    """Nearest-level codes of ascending rows under (alpha, o), kept implicit: (error [R], gram, rhs).

    The codes are those of ``nearest_patterns(x - o, alpha)`` (same compares); the error is
    that of ``_row_sq_error`` up to float rounding. With rows sorted the assignment is
    monotone: level rank r covers the elements between consecutive counts, so the per-level
    counts n_r are differences of the counts and the per-level sums S_r differences of the
    row prefix sums ``prefix [R, E+1]``. Moved to pattern order (n_p, S_p), the normal
    equations of the next least-squares step are G = sum_p n_p t_p t_p^T, rhs = sum_p S_p t_p
    with t_p = (signs of pattern p, 1): two plain matmuls; G holds exact integers, as from
    the codes themselves.
    """
    bits = alpha_RxK.shape[-1]
    L = 1 << bits
    levels, pattern_at_rank, _, mids = sorted_levels(alpha_RxK)
    R, E = x_RxE.shape
    u = x_RxE - offset_R[:, None]
    rank = jnp.sum(u[:, :, None] > mids[:, None, :], axis=-1, dtype=jnp.int32)  # [R, E], as nearest_patterns
    rank = jax.lax.optimization_barrier(rank)  # computed once, not re-fused into each consumer below
    err = jnp.sum((u - jnp.take_along_axis(levels, rank, axis=-1)) ** 2, axis=-1)
    edges = jnp.concatenate([jnp.zeros((R, 1), jnp.int32), _row_counts_at_most(rank, L),
                             jnp.full((R, 1), E, jnp.int32)], axis=-1)  # [R, L+1]
    cum = jnp.take_along_axis(prefix_RxE1, edges, axis=-1)
    rows = jnp.arange(R)[:, None]
    by_pattern = jnp.zeros((R, 2, L), jnp.float32).at[rows, :, pattern_at_rank].set(  # rank order -> pattern order
        jnp.stack([edges[:, 1:] - edges[:, :-1], cum[:, 1:] - cum[:, :-1]], axis=-1).astype(jnp.float32),
        unique_indices=True)
    table = jnp.concatenate([sign_table(bits), jnp.ones((L, 1), jnp.float32)], axis=-1)  # [L, J]: t_p
    J = bits + 1
    outer = (table[:, :, None] * table[:, None, :]).reshape(L, J * J)
    gram = jnp.matmul(by_pattern[:, 0], outer, precision=HIGHEST).reshape(R, J, J)  # sum_p n_p t_p t_p^T
    rhs = jnp.matmul(by_pattern[:, 1], table, precision=HIGHEST)  # sum_p S_p t_p
    return err, gram, rhs


def alternating_fit_sorted(x_RxE: jax.Array, *, bits: int, rounds: int, start):
    """The alternating fit on rows sorted ascending (``alternating_fit_rows`` is the general entry).

    ``start``: (alpha [R,k], offset [R], patterns [R,E]), any codes (the greedy ones are not
    nearest-level). Returns (alpha [R,k], offset [R], errors [rounds+1, R], best_is_start [R]):
    each row's best iterate (the first of least error) and whether that is the start, whose
    codes are then ``start``'s; any later iterate's codes are
    ``nearest_patterns(x - offset, alpha)`` (recompute them: only scales travel the loop).
    """
    alpha, offset, patterns = start
    err = _row_sq_error(x_RxE, patterns, alpha, offset)
    zero = jnp.zeros((x_RxE.shape[0], 1), jnp.float32)
    prefix = jnp.concatenate([zero, jnp.cumsum(x_RxE, axis=-1)], axis=-1)  # [R, E+1]

    def one_round(carry, _):
        (gram, rhs), best = carry
        alpha, offset = _canonical_alpha_offset(small_psd_solve(gram, rhs), bits)
        err, gram, rhs = _nearest_step_sorted(x_RxE, prefix, alpha, offset)
        better = err < best[2]
        best = (jnp.where(better[:, None], alpha, best[0]), jnp.where(better, offset, best[1]),
                jnp.where(better, err, best[2]), best[3] & ~better)
        return ((gram, rhs), best), err

    best = (alpha, offset, err, jnp.ones(err.shape, bool))
    first = _normal_equations(x_RxE, patterns, bits)
    (_, best), errs = jax.lax.scan(one_round, (first, best), None, length=rounds)
    return best[0], best[1], jnp.concatenate([err[None], errs], axis=0), best[3]


def sort_rows(x_RxE: jax.Array):
    """(rows sorted ascending, the permutation: sorted[:, e] = x[:, perm[:, e]])."""
    perm = jnp.argsort(x_RxE, axis=-1).astype(jnp.int32)
    return jnp.take_along_axis(x_RxE, perm, axis=-1), perm


def unsort_rows(values_RxE: jax.Array, perm_RxE: jax.Array) -> jax.Array:
    """Inverse of ``sort_rows``' permutation: out[:, perm[:, e]] = values[:, e]."""
    rows = jnp.arange(values_RxE.shape[0])[:, None]
    return jnp.zeros_like(values_RxE).at[rows, perm_RxE].set(values_RxE, unique_indices=True)


def alternating_fit_rows(x_RxE: jax.Array, *, bits: int, rounds: int, init=None):
    """Alternating BCQ fit per row (docs/method.md, "UniQuan: UniQuanF", unified initialization).

    Start: greedy (``init=None``) or given per-row (alpha [R,k], offset [R]) with nearest codes.
    Each round: least-squares (alpha, o) with codes fixed, then nearest-level codes with
    (alpha, o) fixed. Both steps minimize the same squared error over one block of
    variables, so the per-row error trace is non-increasing.

    Returns (alpha [R,k], offset [R], patterns int32 [R,E], errors [rounds+1, R]) where
    ``errors[t]`` is the squared error after round t (t = 0: the start) and the returned
    fit is each row's best iterate.

    Runs on each row sorted ascending (``alternating_fit_sorted``): the codes are
    permuted with the elements, the errors and scales are those of the unsorted rows up
    to float summation order.
    """
    x_sorted, perm = sort_rows(x_RxE)
    if init is None:
        start = greedy_fit_rows(x_sorted, bits)
    else:
        start = (init[0], init[1], nearest_patterns(x_sorted - init[1][:, None], init[0]))
    alpha, offset, errors, best_is_start = alternating_fit_sorted(x_sorted, bits=bits, rounds=rounds, start=start)
    patterns = jnp.where(best_is_start[:, None], start[2], nearest_patterns(x_sorted - offset[:, None], alpha))
    return alpha, offset, unsort_rows(patterns, perm), errors


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
