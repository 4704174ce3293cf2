"""The MoDeGPT-style MLP compression UniQL's sorting is compared with (benchmarks/bench_sorting.py modegpt).

MoDeGPT (Lin et al. 2024, type-I / MLP module) keeps a subset of the MLP channels and rebuilds
down_proj as the Nyström least-squares fit of the dropped ones, in FP64, once per rate; UniQL
only sorts once (a ridge-leverage solve) and slices. `output_error` scores both through the
activation correlation C; `synthetic_mlp` is the random problem of the comparison.
"""

from __future__ import annotations

import numpy as np


def modegpt_rebuild(C_FxF: np.ndarray, W_down_FxD: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """MoDeGPT type-I (MLP) compression at one rate: keep channels `kept` and rebuild down_proj
    as the Nyström least-squares fit (S_kᵀ C S_k)⁺ S_kᵀ C W_d [k, D], in float64."""
    C = C_FxF.astype(np.float64)
    C_kk = C[np.ix_(kept, kept)]
    return np.linalg.pinv(C_kk, hermitian=True) @ (C[kept] @ W_down_FxD.astype(np.float64))


def output_error(C, W_down, kept, W_new) -> float:
    """‖X W_d − X_k W'‖² / ‖X W_d‖² through C = XᵀX/N (float64)."""
    C = C.astype(np.float64)
    W = W_down.astype(np.float64)
    E = -W.copy()
    E[kept] += W_new
    return float(np.sum(E * (C @ E)) / np.sum(W * (C @ W)))  # BLAS products (a plain 3-operand einsum loops in C)


def synthetic_mlp(F: int, D: int, seed: int):
    """(C [F, F], W_d [F, D]): a correlation of F activations with a spread of scales and correlations,
    and a random down_proj."""
    rng = np.random.default_rng(seed)
    n = 2 * F
    mix = rng.standard_normal((F, F)).astype(np.float32) / np.sqrt(F)
    X = (rng.standard_normal((n, F)).astype(np.float32) @ (np.eye(F, dtype=np.float32) + mix))
    X *= np.exp(rng.uniform(-3, 1, F)).astype(np.float32)
    C = X.T @ X / n
    return C, (0.02 * rng.standard_normal((F, D))).astype(np.float32)
