"""Pure array primitives of UniQL stage 1 (docs/method.md, "Stage 1: MLP" .. "Stage 1: Mamba2").

No Flax, no I/O: ridge leverage scores (float32, jit-able), PSD square roots and the
quantization-aware two-step SVD (float64, NumPy), channel orders, and per-head
permutations. The drivers in `mlp.py`, `attention.py` and `ssm.py` call these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _ridge_leverage_jax(C_FxF: jax.Array, lam: jax.Array) -> jax.Array:
    F = C_FxF.shape[-1]
    C_FxF = 0.5 * (C_FxF + jnp.swapaxes(C_FxF, -1, -2))  # accumulated sums are symmetric up to rounding
    L_FxF = jnp.linalg.cholesky(C_FxF + lam * jnp.eye(F, dtype=C_FxF.dtype))
    eye_FxF = jnp.broadcast_to(jnp.eye(F, dtype=C_FxF.dtype), C_FxF.shape)
    Linv_FxF = jax.scipy.linalg.solve_triangular(L_FxF, eye_FxF, lower=True)
    return jnp.sum(Linv_FxF * (Linv_FxF @ C_FxF), axis=-2)


def _ridge_leverage_numpy(C_FxF: np.ndarray, lam: float) -> np.ndarray:
    from scipy.linalg import blas, lapack

    F = C_FxF.shape[-1]
    out = np.empty(C_FxF.shape[:-1], np.float32)
    for idx in np.ndindex(C_FxF.shape[:-2]):
        C = 0.5 * (C_FxF[idx] + C_FxF[idx].T)  # a fresh buffer: overwritten by L⁻¹ C below
        A = C + np.float32(lam) * np.eye(F, dtype=np.float32)
        L, info = lapack.spotrf(A, lower=1, clean=1, overwrite_a=1)  # A = L Lᵀ
        if info:
            raise np.linalg.LinAlgError(f"Cholesky of C + λI failed (info={info})")
        Linv, info = lapack.strtri(L, lower=1, overwrite_c=1)  # in place: n³/3 flops
        Z = blas.strmm(1.0, Linv, C, lower=1, overwrite_b=1)  # L⁻¹ C, triangular product: n³ flops
        out[idx] = np.sum(Linv * Z, axis=0)
    return out


def ridge_leverage(C_FxF, lam: float = 1.0, backend: str = "auto"):
    """Ridge leverage scores s = diag(C (C + λI)⁻¹) of a correlation C = XᵀX/N (docs/method.md, "Stage 1: MLP").

    One float32 Cholesky factorization L Lᵀ = C + λI and one triangular solve: the
    "pseudo-inverse-free" score of UniQL (no per-rate reconstruction). Computed as
    diag((C+λI)⁻¹ C) = column sums of L⁻¹ ⊙ (L⁻¹ C), which has no cancellation, so the
    small scores (whose order matters at high pruning rates) stay accurate; the
    shortcut 1 − λ·diag((C+λI)⁻¹) loses them to float32 rounding. Batched over leading
    axes ([..., F, F] -> [..., F]); each score lies in [0, 1).

    backend: "jax" (jitted, on the default device), "numpy" (LAPACK on the host: on a
    CPU-only machine it skips XLA's slow compilation of Cholesky for every new F),
    or "auto" (numpy when JAX runs on CPU, else jax).
    """
    if backend == "auto":
        backend = "numpy" if jax.default_backend() == "cpu" else "jax"
    if backend == "numpy":
        return _ridge_leverage_numpy(np.asarray(C_FxF, np.float32), lam)
    return _ridge_leverage_jax(jnp.asarray(C_FxF, jnp.float32), jnp.float32(lam))


def psd_sqrt_pair(C_DxD, floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(C^{1/2}, C^{-1/2}) of a PSD matrix in float64, eigenvalues clamped at floor·λ_max.

    Both roots come from the same clamped eigendecomposition, so C^{-1/2} C^{1/2} = I
    exactly (up to float64 rounding) even when C is rank deficient: whitening with
    them is always an invertible change of basis.
    """
    C = np.asarray(C_DxD, np.float64)
    C = 0.5 * (C + C.T)
    evals, evecs = np.linalg.eigh(C)
    evals = np.maximum(evals, floor * max(float(evals[-1]), np.finfo(np.float64).tiny))
    root = np.sqrt(evals)
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def sqrt_col_norms(diag_C) -> np.ndarray:
    """Column norms of C^{1/2} from the diagonal of C (docs/method.md,
    "Stage 1: attention Q/K"; "Stage 1: Mamba2", B/C).

    C^{1/2} is symmetric, so ‖C^{1/2} e_j‖² = (C^{1/2} C^{1/2})_jj = C_jj: the column
    norms the paper computes through an eigendecomposition are exactly √diag(C)
    (the eigenvalue clamp at 1e-6 only moves them by O(√1e-6)). Only the diagonal
    has to be accumulated, never the full [d, d] correlation.
    """
    return np.sqrt(np.maximum(np.asarray(diag_C, np.float64), 0.0))


def quantization_aware_svd(C_sqrt_DxD, C_inv_sqrt_DxD, Wv_DxR, Wo_RxM):
    """The two-step quantization-aware SVD of one kv head's v/o product (docs/method.md,
    "Stage 1: attention V/O").

    SVD(C^{1/2} W_v) = U_v Σ_v V_vᵀ, then SVD(Σ_v V_vᵀ W_o) = U Σ Vᵀ (float64), and
        W_v' = C^{-1/2} U_v U Σ      [D, R]   (σ folded into V's output columns)
        W_o' = Vᵀ                    [R, M]   (orthonormal rows)
    so W_v' W_o' = W_v W_o, with rank components in decreasing σ: truncating to the
    leading r keeps the best rank-r approximation of C^{1/2} W_v W_o. M stacks the
    o_proj input rows of every query head that reads this kv head (GQA). R (the v/o rank) and
    M are local to this function.
    Returns (W_v' [D, R], W_o' [R, M], σ [R]) in float64.
    """
    Wv = np.asarray(Wv_DxR, np.float64)
    Wo = np.asarray(Wo_RxM, np.float64)
    U_v, s_v, Vt_v = np.linalg.svd(np.asarray(C_sqrt_DxD, np.float64) @ Wv, full_matrices=False)
    U, s, Vt = np.linalg.svd((s_v[:, None] * Vt_v) @ Wo, full_matrices=False)
    Wv_new = np.asarray(C_inv_sqrt_DxD, np.float64) @ (U_v @ (U * s))
    return Wv_new, Vt, s


def f64(a) -> np.ndarray:
    """A float64 host copy (statistics and weights entering the float64 algebra)."""
    return np.asarray(a, np.float64)


def descending_order(scores) -> np.ndarray:
    """Indices sorting the last axis by decreasing score (stable: ties keep their original order)."""
    scores = np.asarray(scores, np.float64)
    return np.argsort(-scores, axis=-1, kind="stable").astype(np.int32)


def permute(a, order, axis: int, head_axes: tuple[int, ...] = ()) -> np.ndarray:
    """Reorder `axis` of `a` by `order`, one order per head.

    order has shape [*heads, n] where heads are the sizes of `a` at `head_axes` (in that
    order) and n = a.shape[axis]; out[..., j, ...] = a[..., order[heads, j], ...].
    """
    a = np.asarray(a)
    order = np.asarray(order)
    axis = axis % a.ndim
    head_axes = tuple(h % a.ndim for h in head_axes)
    # put the order's axes where they sit in `a`, size 1 elsewhere, and let take_along_axis broadcast
    src_axes = head_axes + (axis,)
    perm = sorted(range(len(src_axes)), key=lambda i: src_axes[i])
    idx = np.transpose(order, perm)
    shape = [1] * a.ndim
    for i in sorted(src_axes):
        shape[i] = a.shape[i]
    idx = idx.reshape(shape)
    return np.take_along_axis(a, np.broadcast_to(idx, a.shape[:axis] + (a.shape[axis],) + a.shape[axis + 1:]), axis)
