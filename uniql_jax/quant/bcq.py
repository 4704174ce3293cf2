"""Packed binary-coding quantized weights (BCQ) and their pure fitting cores.

UNIQUAN.md, "Two formats": a k-bit BCQ weight is ``w = sum_i alpha_i * b_i + o``
with ``b_i in {-1, +1}``, ``k`` scales ``alpha_i`` and one offset ``o`` per group
(``group_size`` contiguous weights along the matmul input axis ``axis``).

``BCQArray`` layout for a weight of logical shape ``shape = pre + (n,) + post``
(``n = shape[axis]``, ``G = n // group_size``):

* ``planes``  uint8   ``pre + (n // 8, k) + post``. Plane ``i`` (``i = 0`` the most
  significant) holds bit ``bit_i`` of every weight, 8 consecutive weights along
  ``axis`` per byte, weight ``8 * byte + j`` in bit ``j`` (LSB first, the 1-bit case
  of ``qarray.pack_codes``). ``b_i = 2 * bit_i - 1``.
* ``alpha``   float16 ``pre + (G, k) + post``: the ``k`` scales of each group.
* ``offset``  float16 ``pre + (G,) + post``: the offset of each group.
* ``w = sum_i alpha[g, i] * b_i + offset[g]``, accumulated in float32.

The integer ``p = sum_i bit_i << (k - 1 - i)`` is a weight's *sign pattern*; its
level is ``sum_i alpha_i (2 bit_i - 1)``. With power-of-two scales
``alpha_i = s * 2**(k - 2 - i)`` the pattern is exactly the uniform code ``q`` and the
level is ``s * (q - (2**k - 1) / 2)``: the UQ <-> BCQ bridge (``from_uniform``).

Invariant: ``group_size % 8 == 0`` and ``n % group_size == 0``, so a leading slice of
whole groups along ``axis`` is again a valid ``BCQArray`` made of exactly the same
bytes (``slice_leading``): pruning never re-quantizes; any leading slice of another
axis is free. The first ``k' < k`` planes with their scales (or scales refit by
``refit_alpha``) are a valid ``k'``-bit ``BCQArray`` (``drop_planes``): nested
precision from one set of planes.

Internally the fitting cores work on *rows*: every group of every output position
becomes one row ``[R, group_size]`` (``R = G * prod(pre + post)``), see ``to_rows``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.quant import qarray

SCALE_DTYPE = qarray.SCALE_DTYPE
MAX_BITS = 8
# Fits run once, offline: full float32 products (no TF32 / bf16 passes on accelerators).
HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BCQArray:
    planes: jax.Array  # uint8 pre + (n//8, k) + post, see module docstring
    alpha: jax.Array  # float16 pre + (G, k) + post
    offset: jax.Array  # float16 pre + (G,) + post
    bits: int = dataclasses.field(metadata=dict(static=True))  # k, number of bit-planes
    group_size: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))  # non-negative, the matmul input axis
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # logical shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in (self.planes, self.alpha, self.offset)))

    @property
    def dtype(self):
        return self.alpha.dtype

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """Dense weight of logical shape; the models call ``w.dequantize(dtype)``."""
        return dequantize(self, dtype)

    def __repr__(self):
        return f"BCQArray(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, axis={self.axis})"


def is_bcq(x) -> bool:
    return isinstance(x, BCQArray)


def check_layout(bits: int, group_size: int, n: int):
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    if group_size % 8 or n % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of 8 dividing the quantized axis ({n})")


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


def signs_to_patterns(signs: jax.Array) -> jax.Array:
    """float signs [..., k] (+-1) -> int32 sign patterns [...]."""
    bits = signs.shape[-1]
    weights = (1 << (bits - 1 - jnp.arange(bits, dtype=jnp.int32)))
    return jnp.sum((signs > 0).astype(jnp.int32) * weights, axis=-1)


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


# ---------------------------------------------------------------------------
# Pack / unpack
# ---------------------------------------------------------------------------


def pack_planes(patterns: jax.Array, bits: int, axis: int) -> jax.Array:
    """Sign patterns (logical shape) -> uint8 planes ``pre + (n/8, k) + post``, MSB plane first."""
    bits_kx = (patterns[..., None] >> (bits - 1 - jnp.arange(bits, dtype=jnp.int32))) & 1  # shape + (k,)
    return qarray.pack_codes(jnp.moveaxis(bits_kx, -1, axis + 1), 1, axis)  # 8 weights per byte along axis


def pack_rows(patterns_RxS, alpha_RxK, offset_R, *, shape, group_size: int, axis: int,
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
    planes = pack_planes(from_rows(patterns_RxS, shape, group_size, axis), bits, axis)
    alpha = rows_to_groups(alpha_RxK, lead, axis).astype(scale_dtype)
    offset = offset_R.reshape(lead).astype(scale_dtype)
    return BCQArray(planes, alpha, offset, bits, group_size, axis, shape)


def signs_of(b: BCQArray) -> jax.Array:
    """float32 signs b_i = +-1, shape pre + (n, k) + post."""
    bits01 = qarray.unpack_codes(b.planes, 1, b.axis)
    return 2.0 * bits01.astype(jnp.float32) - 1.0


@jax.jit
def patterns_of(b: BCQArray) -> jax.Array:
    """int32 sign patterns, logical shape."""
    return signs_to_patterns(jnp.moveaxis(signs_of(b), b.axis + 1, -1))


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(b: BCQArray, dtype: Any = jnp.float32) -> jax.Array:
    """w = sum_i alpha_i b_i + o (UNIQUAN.md "Two formats"), float32 arithmetic, cast to `dtype`."""
    signs = signs_of(b)  # pre + (n, k) + post
    alpha = qarray.expand_groups(b.alpha.astype(jnp.float32), b.group_size, b.axis)  # pre + (n, k) + post
    offset = qarray.expand_groups(b.offset.astype(jnp.float32), b.group_size, b.axis)  # logical shape
    return (jnp.sum(alpha * signs, axis=b.axis + 1) + offset).astype(dtype)


# ---------------------------------------------------------------------------
# Slicing: rates (leading boxes) and precisions (leading planes)
# ---------------------------------------------------------------------------


def slice_leading(b: BCQArray, axis: int, n: int) -> BCQArray:
    """Keep the first `n` entries of logical `axis` by slicing bytes only (never re-quantizes).

    Along the quantized axis `n` must be a multiple of ``group_size`` (whole groups,
    whole bytes); any other axis can be cut anywhere.
    """
    axis = axis % b.ndim
    if n == b.shape[axis]:
        return b
    shape = b.shape[:axis] + (n,) + b.shape[axis + 1 :]
    if axis != b.axis:
        array_axis = axis if axis < b.axis else axis + 1  # planes / alpha carry the k axis after b.axis
        return BCQArray(
            jax.lax.slice_in_dim(b.planes, 0, n, axis=array_axis),
            jax.lax.slice_in_dim(b.alpha, 0, n, axis=array_axis),
            jax.lax.slice_in_dim(b.offset, 0, n, axis=axis),
            b.bits, b.group_size, b.axis, shape,
        )
    if n % b.group_size:
        raise ValueError(
            f"cannot keep {n} of {b.shape[axis]} entries of the quantized axis: not a multiple of group size {b.group_size}"
        )
    groups = n // b.group_size
    return BCQArray(
        jax.lax.slice_in_dim(b.planes, 0, n // 8, axis=axis),
        jax.lax.slice_in_dim(b.alpha, 0, groups, axis=axis),
        jax.lax.slice_in_dim(b.offset, 0, groups, axis=axis),
        b.bits, b.group_size, b.axis, shape,
    )


def drop_planes(b: BCQArray, k_new: int, alpha_new=None, offset_new=None) -> BCQArray:
    """The nested ``k_new``-bit model: the first ``k_new`` planes (bytes untouched).

    Without ``alpha_new`` the first ``k_new`` stored scales are kept (AnyBCQ-style
    truncation); pass the per-precision scales (and offset) of ``refit_alpha`` for
    the least-squares refit.
    """
    if not 1 <= k_new <= b.bits:
        raise ValueError(f"k_new must be in [1, {b.bits}], got {k_new}")
    kept_alpha = jax.lax.slice_in_dim(b.alpha, 0, k_new, axis=b.axis + 1)
    alpha = kept_alpha if alpha_new is None else alpha_new
    offset = b.offset if offset_new is None else offset_new
    if alpha.shape != kept_alpha.shape or offset.shape != b.offset.shape:
        raise ValueError(f"alpha_new {alpha.shape} / offset_new {offset.shape} do not match the {k_new}-plane layout")
    return BCQArray(
        jax.lax.slice_in_dim(b.planes, 0, k_new, axis=b.axis + 1),
        alpha.astype(SCALE_DTYPE),
        offset.astype(SCALE_DTYPE),
        k_new, b.group_size, b.axis, b.shape,
    )


# ---------------------------------------------------------------------------
# UQ <-> BCQ identity
# ---------------------------------------------------------------------------


def uniform_as_bcq(scale, zero, bits: int):
    """UNIQUAN.md "Bridge": UQ(s, z) == BCQ with alpha_i = s 2^(k-2-i), o = s((2^k-1)/2 - z).

    ``scale``, ``zero`` [...] -> (alpha [..., k], offset [...]) in float32; the sign
    pattern of a weight is its UQ code.
    """
    scale = jnp.asarray(scale, jnp.float32)
    powers = 2.0 ** (bits - 2 - jnp.arange(bits, dtype=jnp.float32))  # [k]
    alpha = scale[..., None] * powers
    offset = scale * ((2**bits - 1) / 2 - jnp.asarray(zero, jnp.float32))
    return alpha, offset


def from_uniform(q: qarray.QArray) -> BCQArray:
    """A uniform ``QArray`` as the ``BCQArray`` with the same dequantized values, bit for bit.

    ``QArray`` is symmetric with zero point ``2**(k-1)``, so ``o = -s/2``. Every scale
    ``s * 2**j`` is exact in float16 unless it leaves float16's normal range; in that
    case (checked when the scales are concrete) this raises instead of rounding.
    The planes of weight ``w`` are the binary digits of its code, MSB first.
    """
    b, exact = _from_uniform(q)
    if not isinstance(exact, jax.core.Tracer) and not bool(exact):
        raise ValueError("some scale * 2**j is not representable in float16 (subnormal or overflow)")
    return b


@jax.jit
def _from_uniform(q: qarray.QArray):
    bits, axis = q.bits, q.axis
    codes = qarray.codes_of(q)  # logical shape, pattern == code
    alpha32, offset32 = uniform_as_bcq(q.scales, 2 ** (bits - 1), bits)  # scales pre+(G,)+post -> +(k,)
    alpha32 = jnp.moveaxis(alpha32, -1, axis + 1)  # pre + (G, k) + post
    alpha16, offset16 = alpha32.astype(SCALE_DTYPE), offset32.astype(SCALE_DTYPE)
    exact = jnp.all(alpha16.astype(jnp.float32) == alpha32) & jnp.all(offset16.astype(jnp.float32) == offset32)
    planes = pack_planes(codes, bits, axis)
    return BCQArray(planes, alpha16, offset16, bits, q.group_size, axis, q.shape), exact


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


def nearest_patterns(u_RxS: jax.Array, alpha_RxK: jax.Array) -> jax.Array:
    """Full search: the sign pattern of the level nearest to each u (ties to the lower level).

    rank = #{decision boundaries below u} over the value-sorted levels; int32 [R, S].
    """
    _, pattern_at_rank, _, mids = sorted_levels(alpha_RxK)
    rank = jnp.sum(u_RxS[:, :, None] > mids[:, None, :], axis=-1, dtype=jnp.int32)  # [R, S]
    return jnp.take_along_axis(pattern_at_rank, rank, axis=-1)


def level_values(patterns_RxS: jax.Array, alpha_RxK: jax.Array) -> jax.Array:
    """sum_i alpha_i b_i for each sign pattern, float32 [R, S] (exact in alpha: linear)."""
    bits = alpha_RxK.shape[-1]
    total = jnp.zeros(patterns_RxS.shape, jnp.float32)
    for i in range(bits):  # a loop instead of a [R, S, k] gather keeps memory at one weight copy
        b_i = 2.0 * ((patterns_RxS >> (bits - 1 - i)) & 1).astype(jnp.float32) - 1.0
        total = total + alpha_RxK[:, i : i + 1] * b_i
    return total


def canonical_rows(alpha_RxK: jax.Array, patterns_RxS: jax.Array):
    """Same levels with alpha >= 0 sorted descending: flip each plane whose scale is negative,
    then order planes by scale (most significant first, what nested precision keeps)."""
    bits = alpha_RxK.shape[-1]
    signs = pattern_signs(patterns_RxS, bits) * jnp.where(alpha_RxK < 0, -1.0, 1.0)[:, None, :]  # [R, S, k]
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


def _least_squares_rows(design_RxSxJ: jax.Array, target_RxS: jax.Array) -> jax.Array:
    """Per-row least squares min ||D theta - t||^2 via the normal equations; [R, J]."""
    gram = jnp.einsum("rsi,rsj->rij", design_RxSxJ, design_RxSxJ, precision=HIGHEST)
    rhs = jnp.einsum("rsi,rs->ri", design_RxSxJ, target_RxS, precision=HIGHEST)
    return psd_solve(gram, rhs)


def _ls_alpha_offset(x_RxS, patterns_RxS, bits):
    """Least-squares (alpha, o) with codes fixed, canonicalized to alpha >= 0 sorted descending.

    Flipping the sign of a plane together with its scale, or permuting planes, leaves the
    level set unchanged, so the canonical form costs nothing and puts the most significant
    plane first (what nested precision truncates to).
    """
    signs = pattern_signs(patterns_RxS, bits)  # [R, S, k]
    design = jnp.concatenate([signs, jnp.ones_like(signs[..., :1])], axis=-1)  # [R, S, k+1]
    theta = _least_squares_rows(design, x_RxS)
    alpha, offset = theta[:, :bits], theta[:, bits]
    return jnp.sort(jnp.abs(alpha), axis=-1)[:, ::-1], offset


def greedy_fit_rows(x_RxS: jax.Array, bits: int):
    """Greedy BCQ start (UNIQUAN.md "Unified initialization"): o = mean, then per plane
    alpha_i = mean|residual|, b_i = sign(residual). Returns (alpha [R,k], offset [R], patterns [R,S])."""
    offset = jnp.mean(x_RxS, axis=-1)
    residual = x_RxS - offset[:, None]
    alphas, signs = [], []
    for _ in range(bits):
        b = jnp.where(residual >= 0, 1.0, -1.0)
        a = jnp.mean(jnp.abs(residual), axis=-1)
        residual = residual - a[:, None] * b
        alphas.append(a)
        signs.append(b)
    return jnp.stack(alphas, -1), offset, signs_to_patterns(jnp.stack(signs, -1))


def _row_sq_error(x_RxS, patterns, alpha, offset):
    return jnp.sum((x_RxS - level_values(patterns, alpha) - offset[:, None]) ** 2, axis=-1)


def alternating_fit_rows(x_RxS: jax.Array, *, bits: int, rounds: int, init=None):
    """Alternating BCQ fit per row (UNIQUAN.md "Unified initialization").

    Start: greedy (``init=None``) or given per-row (alpha [R,k], offset [R]) with nearest codes.
    Each round: least-squares (alpha, o) with codes fixed, then nearest-level codes with
    (alpha, o) fixed. Both steps minimize the same squared error over one block of
    variables, so the per-row error trace is non-increasing.

    Returns (alpha [R,k], offset [R], patterns int32 [R,S], errors [rounds+1, R]) where
    ``errors[t]`` is the squared error after round t (t = 0: the start) and the returned
    fit is each row's best iterate.
    """
    if init is None:
        alpha, offset, patterns = greedy_fit_rows(x_RxS, bits)
    else:
        alpha, offset = init
        patterns = nearest_patterns(x_RxS - offset[:, None], alpha)
    err = _row_sq_error(x_RxS, patterns, alpha, offset)

    def one_round(carry, _):
        alpha, offset, patterns, err, best = carry
        alpha, offset = _ls_alpha_offset(x_RxS, patterns, bits)
        patterns = nearest_patterns(x_RxS - offset[:, None], alpha)
        err = _row_sq_error(x_RxS, patterns, alpha, offset)
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


# ---------------------------------------------------------------------------
# Storage accounting
# ---------------------------------------------------------------------------


def bits_per_weight(tree) -> float:
    """Stored bits per logical weight of a params tree, measured from its arrays.

    Packed weights (``QArray``, ``BCQArray``) count their stored bytes (codes / planes
    plus scales / offsets) over their logical element count; plain arrays their itemsize.
    BCQ: k + 16(k+1)/g; symmetric uniform QArray: k + 16/g.
    """
    packed = lambda x: qarray.is_qarray(x) or is_bcq(x)
    total_bytes, total_weights = 0, 0
    for leaf in jax.tree.leaves(tree, is_leaf=packed):
        if packed(leaf):
            total_bytes += leaf.nbytes
            total_weights += math.prod(leaf.shape)
        else:
            total_bytes += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
            total_weights += int(np.prod(leaf.shape))
    return 8.0 * total_bytes / max(total_weights, 1)
