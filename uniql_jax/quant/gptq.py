"""GPTQ core (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"): pure array functions, no model walking.

Problem (GPTQ Eq. 1, in our input-axis-first layout ``y = x W``, ``W [Din, Dout]``):
minimise ``||X W - X Ŵ||²_F`` over quantized Ŵ, with ``X [N, Din]`` the layer's
calibration inputs. The objective only depends on the Hessian ``H = 2 Xᵀ X / N``
``[Din, Din]`` and decomposes over output columns, which all share H. Input rows of
W are quantized one at a time; after quantizing row i, the not-yet-quantized rows
absorb its error by the optimal-brain-surgeon update (GPTQ Eq. 2-3)

    δ_F = -(w_i - q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_{i,:}

GPTQ's three steps (Alg. 1), all implemented here:

1. *Arbitrary order*: rows in the natural input order (or by descending diag(H)
   with ``act_order``, the "act-order" heuristic of the GPTQ reference code).
2. *Lazy batch updates*: rows are processed in blocks of B; inside a block the
   update touches only the block's rows; the rest of W gets one rank-B update
   ``W[i2:] -= U[i1:i2, i2:]ᵀ E`` per block (E the scaled errors of the block).
3. *Cholesky reformulation*: the successive eliminated inverses ``H_F⁻¹`` are the
   rows of the upper Cholesky factor U of ``H⁻¹`` (``Uᵀ U = H⁻¹``):
   ``[H_F⁻¹]_{i,:} / [H_F⁻¹]_ii = U_{i,:} / U_ii``, so the scaled error is
   ``e_i = (w_i - q_i) / U_ii`` and the update is ``W[j] -= U_ij e_i``.

Quantizer: symmetric, ``w = s (code - 2**(b-1))``; the group scale
``s = max|w| / (2**(b-1) - 1)`` (stored float16) of the ``group_size`` rows of a
group is computed when its first row is reached, from the rows as updated by every
error propagated so far (as the reference code does; blocks are aligned to groups
here, so unlike the reference with group < block, the intra-block updates of the
block's earlier rows are included too); codes come from the shared
RTN rounding (``rtn.codes_for_scales``), so with H = c·I (no correlation to
exploit) GPTQ returns exactly the RTN result.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from uniql_jax.quant import rtn
from uniql_jax.quant.formats import qarray
from uniql_jax.quant.formats.qarray import QArray

_HIGHEST = jax.lax.Precision.HIGHEST
OUT_CHUNK = 8192  # output columns per row-loop call (gptq_quantize)
_MAX_DAMP_RETRIES = 6  # damping x10 per retry when Cholesky fails (non-PD H in float32)


# ----------------------------------------------------------------------------- Hessian


def init_hessian(d_in: int) -> tuple[jax.Array, jax.Array]:
    """An empty running Hessian: ``(H [Din, Din] float32 zeros, count int32 0)``."""
    return jnp.zeros((d_in, d_in), jnp.float32), jnp.zeros((), jnp.int32)


@jax.jit
def accumulate_hessian(
    hessian_DinxDin: jax.Array, count: jax.Array, x: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Add a batch of layer inputs to the running mean ``H = (2 / N) Σ_t x_t x_tᵀ``.

    ``x [..., Din]`` (any dtype; flattened to rows, float32 arithmetic at HIGHEST
    matmul precision, so TF32 / bf16 passes on accelerators do not round H);
    ``mask [...]`` optionally marks rows with 1 (kept) or 0 (padding, dropped). With
    ``n`` the rows of this batch and ``c`` those seen before:

        H ← H + n/(c+n) · (2 Xᵀ X / n - H)

    an update of the mean rather than of a sum, so H stays O(|x|²) however many
    tokens are seen (GPTQ reference: ``H *= c/(c+n); H += 2/(c+n) XᵀX``). Returns
    ``(H, c + n)``. Summing per-device ``count · H`` and counts (psum) is exact.
    """
    d_in = hessian_DinxDin.shape[0]
    x_NxDin = x.reshape(-1, d_in).astype(jnp.float32)
    if mask is None:
        n_new = jnp.asarray(x_NxDin.shape[0], jnp.int32)
        weighted_NxDin = x_NxDin
    else:
        row_weight_N = mask.reshape(-1).astype(jnp.float32)
        n_new = jnp.sum(row_weight_N).astype(jnp.int32)
        weighted_NxDin = x_NxDin * row_weight_N[:, None]
    total = count + n_new
    batch_hessian = 2.0 * jnp.matmul(weighted_NxDin.T, x_NxDin, precision=_HIGHEST) / jnp.maximum(n_new, 1)
    frac_new = n_new.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)
    return hessian_DinxDin + frac_new * (batch_hessian - hessian_DinxDin), total


def hessian_error(w_DinxDout: jax.Array, w_hat_DinxDout: jax.Array, hessian_DinxDin: jax.Array) -> jax.Array:
    """The GPTQ objective ``tr(ΔWᵀ H ΔW)`` = ``(2/N) ||X W - X Ŵ||²_F`` for ``H = 2XᵀX/N``."""
    delta = (w_DinxDout - w_hat_DinxDout).astype(jnp.float32)
    return jnp.sum(delta * jnp.matmul(hessian_DinxDin.astype(jnp.float32), delta, precision=_HIGHEST))


# ----------------------------------------------------------------------------- GPTQ


def _upper_cholesky_of_inverse(hessian_damped: jax.Array) -> jax.Array:
    """Upper-triangular U with ``Uᵀ U = H⁻¹`` (GPTQ §"Cholesky reformulation").

    Without forming H⁻¹: with J the reversal permutation, ``chol(J H J) = L`` gives
    ``H = R Rᵀ`` for the upper-triangular ``R = J L J``; then ``H⁻¹ = R⁻ᵀ R⁻¹`` and
    ``U = R⁻¹`` (upper). One Cholesky and one triangular solve.
    """
    d_in = hessian_damped.shape[0]
    lower_rev = jnp.linalg.cholesky(hessian_damped[::-1, ::-1])
    upper = lower_rev[::-1, ::-1]
    eye = jnp.eye(d_in, dtype=hessian_damped.dtype)
    return jax.scipy.linalg.solve_triangular(upper, eye, lower=False)


def _damped_inverse_cholesky(hessian: jax.Array, damp: jax.Array) -> jax.Array:
    """U for ``H + λ I`` with ``λ = damp · mean(diag H)``; λ ×10 (up to 6 times) on failure.

    A float32 Cholesky of an ill-conditioned H can fail (NaNs); the GPTQ reference
    then stops, later tools raise the damping. We raise it too; a Hessian that still
    fails after ``damp·10⁶`` gives NaN weights (a bug in the caller's statistics).
    """
    d_in = hessian.shape[0]
    mean_diag = jnp.mean(jnp.diagonal(hessian))
    eye = jnp.eye(d_in, dtype=jnp.float32)

    def attempt(state):
        lam, _, _, tries = state
        lam = jnp.where(tries == 0, lam, lam * 10.0)
        upper = _upper_cholesky_of_inverse(hessian + lam * mean_diag * eye)
        return lam, upper, jnp.all(jnp.isfinite(upper)), tries + 1

    def failed(state):
        _, _, ok, tries = state
        return jnp.logical_not(ok) & (tries < _MAX_DAMP_RETRIES + 1)

    init = (jnp.asarray(damp, jnp.float32), jnp.zeros_like(hessian), jnp.asarray(False), jnp.asarray(0))
    return jax.lax.while_loop(failed, attempt, init)[1]


def effective_block_size(d_in: int, group_size: int, block_size: int) -> int:
    """The lazy-batch block actually used: a multiple of ``group_size`` dividing ``d_in``.

    ``group_size * gcd(max(block_size // group_size, 1), d_in // group_size)``. Groups
    then never straddle blocks, so a group's scale (taken at its first row) sees every
    error propagated so far. The block size changes only speed, not the result (up to
    float rounding): lazy batching reorders the same updates (GPTQ §"Lazy batch-updates").
    """
    return group_size * math.gcd(max(block_size // group_size, 1), d_in // group_size)


def gptq_quantize(
    w_DinxDout: jax.Array,
    hessian_DinxDin: jax.Array,
    *,
    bits: int = 4,
    group_size: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    zero_point: bool = False,
    out_chunk: int = OUT_CHUNK,
) -> QArray:
    """GPTQ (Frantar et al. 2022, Alg. 1) of ``W [Din, Dout]`` (``y = x W``) -> ``QArray(axis=0)``.

    ``hessian_DinxDin``: ``2 XᵀX / N`` of the layer inputs (``accumulate_hessian``; any
    positive multiple gives the same result). Steps:

    * dead inputs (``H_ii = 0``: the input is always 0) get ``H_ii = 1`` and ``W_i = 0``,
      so they neither break the Cholesky nor inflate their group's scale;
    * damping ``H += damp · mean(diag H) · I`` (GPTQ §4 "we add 1% of the average diagonal");
    * ``U = chol(H⁻¹)`` upper; rows quantized in order in blocks (``effective_block_size``)
      with lazy batch updates (module docstring);
    * ``act_order=True`` visits rows by descending ``diag(H)``. Choice: *static groups*:
      the packed layout must stay group-contiguous along the original input order
      (slicing whole groups is how pruning works, ``qarray.slice_leading``), so the
      groups are those of the original order and their scales are computed up front
      from the (dead-zeroed) weights before any update (AutoGPTQ's ``static_groups``);
      act-order then only changes the order of error propagation. Without act-order,
      scales are taken from the error-updated rows when a group starts.
    * ``zero_point=True``: every group's grid is the asymmetric min/max one
      (``rtn.group_minmax_grid``, ``scale * code + offset``) taken at the same moments, and the
      row loop rounds to it and propagates the error of *its* values -> ``ZeroPointQArray``.

    * Output columns never interact (every update above is per column), so the row loop runs
      over ``out_chunk`` columns at a time: its temporaries are several copies of the slice of
      W it holds, which for the whole [576, 49152] tied head of SmolLM2 were ~0.7 GB.

    Pure; float32 throughout (HIGHEST matmul precision). Two jitted pieces, so the
    Hessian factorisation compiles once per (Din, act_order) and the row loop once per
    (shape, bits, group_size, block, act_order); ``damp`` is traced. Wrapping the
    call in an outer ``jax.jit`` is fine.
    """
    d_in, d_out = w_DinxDout.shape
    if hessian_DinxDin.shape != (d_in, d_in):
        raise ValueError(f"Hessian shape {hessian_DinxDin.shape} does not match W {w_DinxDout.shape}")
    qarray.check_layout(bits, group_size, d_in)
    upper_DinxDin, perm_Din, dead_Din = _factor_hessian(hessian_DinxDin, damp, act_order=act_order)
    packed, scales, offsets = [], [], []
    for start in range(0, d_out, out_chunk):
        codes_DinxC, scales_GxC, offset_GxC = _quantize_rows(
            w_DinxDout[:, start:start + out_chunk], upper_DinxDin, perm_Din, dead_Din, bits=bits,
            group_size=group_size, block=effective_block_size(d_in, group_size, block_size), act_order=act_order,
            zero_point=zero_point)
        packed.append(qarray.pack_codes(codes_DinxC, bits, 0))  # packed before the chunks join
        scales.append(scales_GxC)
        offsets.append(offset_GxC)
    packed_xDout, scales_GxDout, offset_GxDout = (x[0] if len(x) == 1 else jnp.concatenate(x, axis=1)
                                                  for x in (packed, scales, offsets))
    return qarray.from_packed(packed_xDout, scales_GxDout, bits=bits, group_size=group_size, axis=0,
                              shape=(d_in, d_out), offset=offset_GxDout if zero_point else None)


@functools.partial(jax.jit, static_argnames=("act_order",))
def _factor_hessian(hessian_DinxDin: jax.Array, damp: jax.Array, *, act_order: bool):
    """Dead inputs, visiting order and ``U = chol((H_visit + λI)⁻¹)`` upper.

    Returns ``(U [Din, Din] in visiting order, perm [Din] visit -> original row,
    dead [Din] bool in original order)``.
    """
    hessian = hessian_DinxDin.astype(jnp.float32)
    dead_Din = jnp.diagonal(hessian) == 0
    hessian = hessian + jnp.diag(dead_Din.astype(jnp.float32))  # H_ii = 1 for dead inputs
    if act_order:
        perm_Din = jnp.argsort(-jnp.diagonal(hessian), stable=True)
        hessian = hessian[perm_Din][:, perm_Din]
    else:
        perm_Din = jnp.arange(hessian.shape[0])
    return _damped_inverse_cholesky(hessian, damp), perm_Din, dead_Din


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block", "act_order", "zero_point"))
def _quantize_rows(w_DinxDout, upper_DinxDin, perm_Din, dead_Din, *, bits, group_size, block, act_order, zero_point):
    """GPTQ Alg. 1 row loop: ``(codes [Din, Dout] int32 original order, scales [Din/g, Dout] f16,
    offsets [Din/g, Dout] f16)``; the offsets are the asymmetric grid's (``zero_point``), else unused zeros."""
    d_in, d_out = w_DinxDout.shape
    n_blocks, groups_per_block = d_in // block, block // group_size

    def grid(rows):
        """(scales, offsets) of groups of rows: the quantizer's grid, offsets 0 when symmetric."""
        scales, offset = rtn.group_grid(rows, bits, group_size, 0, zero_point)
        return scales, jnp.zeros_like(scales) if offset is None else offset

    weights = jnp.where(dead_Din[:, None], 0.0, w_DinxDout.astype(jnp.float32))  # [Din, Dout]
    if act_order:  # static groups: original-order groups, grids before any update
        init_scales_GxDout, init_offset_GxDout = grid(weights)
        row_grid = (init_scales_GxDout[perm_Din // group_size], init_offset_GxDout[perm_Din // group_size])
        weights = weights[perm_Din]
    else:  # overwritten group by group as the loop reaches them
        init_scales_GxDout = jnp.ones((d_in // group_size, d_out), qarray.SCALE_DTYPE)
        init_offset_GxDout = jnp.zeros((d_in // group_size, d_out), qarray.SCALE_DTYPE)

    def quantize_row(w_row, scale_row, offset_row):
        """Nearest code of one row on its float16 grid (the shared RTN rounding) and its value."""
        offset_row = offset_row if zero_point else None
        code_row = rtn.codes_for_scales(w_row[None], scale_row[None], bits, 1, 0,
                                        None if offset_row is None else offset_row[None])[0]
        value = qarray.grid_values(code_row, scale_row.astype(jnp.float32),
                                   None if offset_row is None else offset_row.astype(jnp.float32), bits)
        return code_row, value

    def block_step(b, state):
        weights, codes_DinxDout, scales_GxDout, offset_GxDout = state
        i1 = b * block
        w_blk_BxDout = jax.lax.dynamic_slice_in_dim(weights, i1, block, 0)
        u_blk = jax.lax.dynamic_slice(upper_DinxDin, (i1, i1), (block, block))  # [block, block]

        def group_step(g, group_state):
            w_blk, codes_blk, err_blk, scales, offsets = group_state
            start = g * group_size
            if act_order:
                grid_of_row = lambda i: tuple(jax.lax.dynamic_index_in_dim(a, i1 + i, 0, keepdims=False)
                                              for a in row_grid)
            else:  # grid from the error-updated rows of the group, at its first row
                group_rows = jax.lax.dynamic_slice_in_dim(w_blk, start, group_size, 0)
                group_scale, group_offset = (a[0] for a in grid(group_rows))
                scales = jax.lax.dynamic_update_index_in_dim(scales, group_scale, (i1 + start) // group_size, 0)
                offsets = jax.lax.dynamic_update_index_in_dim(offsets, group_offset, (i1 + start) // group_size, 0)
                grid_of_row = lambda i: (group_scale, group_offset)

            def row_step(i, row_state):
                w_blk, codes_blk, err_blk = row_state
                w_row = w_blk[i]
                code_row, q_row = quantize_row(w_row, *grid_of_row(i))
                err_row = (w_row - q_row) / u_blk[i, i]  # e_i = (w_i - q_i) / U_ii
                # W[j] -= U_ij e_i inside the block; U is upper-triangular, so rows < i are untouched.
                w_blk = w_blk - u_blk[i][:, None] * err_row[None, :]
                codes_blk = jax.lax.dynamic_update_index_in_dim(codes_blk, code_row, i, 0)
                err_blk = jax.lax.dynamic_update_index_in_dim(err_blk, err_row, i, 0)
                return w_blk, codes_blk, err_blk

            w_blk, codes_blk, err_blk = jax.lax.fori_loop(start, start + group_size, row_step, (w_blk, codes_blk, err_blk))
            return w_blk, codes_blk, err_blk, scales, offsets

        zeros_blk = jnp.zeros((block, d_out), jnp.float32)
        _, codes_blk, err_blk_BxDout, scales_GxDout, offset_GxDout = jax.lax.fori_loop(
            0, groups_per_block, group_step,
            (w_blk_BxDout, zeros_blk.astype(jnp.int32), zeros_blk, scales_GxDout, offset_GxDout),
        )
        # Lazy batch update of every later row: W[i2:] -= U[i1:i2, i2:]ᵀ E (U is 0 left of the block).
        u_rows_BxDin = jax.lax.dynamic_slice_in_dim(upper_DinxDin, i1, block, 0)
        update_DinxDout = jnp.matmul(u_rows_BxDin.T, err_blk_BxDout, precision=_HIGHEST)
        later_rows_Din = jnp.arange(d_in) >= i1 + block
        weights = weights - jnp.where(later_rows_Din[:, None], update_DinxDout, 0.0)
        codes_DinxDout = jax.lax.dynamic_update_slice_in_dim(codes_DinxDout, codes_blk, i1, 0)
        return weights, codes_DinxDout, scales_GxDout, offset_GxDout

    init = (weights, jnp.zeros((d_in, d_out), jnp.int32), init_scales_GxDout, init_offset_GxDout)
    _, codes_visit_DinxDout, scales_GxDout, offset_GxDout = jax.lax.fori_loop(0, n_blocks, block_step, init)
    if act_order:  # visiting order -> original input order
        codes_visit_DinxDout = jnp.zeros_like(codes_visit_DinxDout).at[perm_Din].set(codes_visit_DinxDout)
    return codes_visit_DinxDout, scales_GxDout, offset_GxDout
