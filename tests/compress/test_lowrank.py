"""Pure primitives of stage 1: ridge leverage, PSD roots, quantization-aware SVD, per-head permutations."""

import numpy as np
import pytest

from uniql_jax.compress import lowrank


def random_correlation(n, rank=None, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4 * n, rank or n)) @ rng.standard_normal((rank or n, n)) * scale
    X[:, 0] *= 30.0  # a wide spread of scales, as real activations have
    return X.T @ X / len(X)


def leverage_reference(C, lam):
    evals, evecs = np.linalg.eigh(np.asarray(C, np.float64))
    return (evecs ** 2) @ (evals / (evals + lam))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_ridge_leverage_matches_eigendecomposition(backend):
    C = np.stack([random_correlation(24, seed=s, scale=0.05 * (s + 1)) for s in range(3)])  # batched
    for lam in (1.0, 0.1):
        ref = np.stack([leverage_reference(c, lam) for c in C])
        got = np.asarray(lowrank.ridge_leverage(C, lam, backend=backend))
        assert got.shape == (3, 24)
        assert np.max(np.abs(got - ref)) < 2e-6
        # relative accuracy on the small scores too (no 1 - x cancellation)
        small = ref < 1e-3
        if small.any():
            assert np.max(np.abs(got[small] - ref[small]) / ref[small]) < 1e-2


def test_ridge_leverage_of_dead_channel_is_zero():
    C = random_correlation(16)
    C[5, :] = C[:, 5] = 0.0
    s = np.asarray(lowrank.ridge_leverage(C, backend="numpy"))
    assert s[5] == 0.0 and np.all(np.delete(s, 5) > 0)
    assert lowrank.descending_order(s)[-1] == 5


def test_sqrt_col_norms_equal_eigh_column_norms():
    """The paper's ‖C^{1/2}‖_col through eigh (eigenvalues clamped at 1e-6) equals √diag(C)."""
    for C in (random_correlation(12, seed=1), random_correlation(12, rank=5, seed=2)):  # full rank, singular
        evals, evecs = np.linalg.eigh(C)
        root = (evecs * np.sqrt(np.maximum(evals, 1e-6))) @ evecs.T
        assert np.allclose(np.linalg.norm(root, axis=0), lowrank.sqrt_col_norms(np.diag(C)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rank", [None, 6])  # full-rank and singular input correlations
def test_psd_sqrt_pair_inverts_exactly(rank):
    C = random_correlation(10, rank=rank, seed=3)
    S, S_inv = lowrank.psd_sqrt_pair(C)
    assert np.allclose(S_inv @ S, np.eye(10), atol=1e-8)
    if rank is None:
        assert np.allclose(S @ S, C, rtol=1e-8, atol=1e-8 * np.abs(C).max())


def test_quantization_aware_svd_preserves_product_and_orders_rank():
    rng = np.random.default_rng(0)
    D, R, M = 16, 6, 3 * 16
    C = random_correlation(D, seed=4)
    Wv, Wo = rng.standard_normal((D, R)), rng.standard_normal((R, M))
    S, S_inv = lowrank.psd_sqrt_pair(C)
    Wv2, Wo2, sigma = lowrank.quantization_aware_svd(S, S_inv, Wv, Wo)
    assert np.allclose(Wv2 @ Wo2, Wv @ Wo, rtol=1e-9, atol=1e-9 * np.abs(Wv @ Wo).max())
    assert np.all(np.diff(sigma) <= 0)
    assert np.allclose(Wo2 @ Wo2.T, np.eye(R), atol=1e-10)  # W_o' orthonormal, σ on V's side
    assert np.allclose(np.linalg.norm(S @ Wv2, axis=0), sigma)
    # truncation to r is the best rank-r fit of the whitened product (Eckart-Young), and at
    # least as good as the reference code's single SVD of C^{1/2} W_v
    target = S @ Wv @ Wo
    _, s_v, Vt_v = np.linalg.svd(S @ Wv, full_matrices=False)
    one_step_v, one_step_o = S_inv @ np.linalg.svd(S @ Wv, full_matrices=False)[0] * s_v, Vt_v @ Wo
    for r in range(1, R):
        err_two = np.linalg.norm(target - S @ Wv2[:, :r] @ Wo2[:r]) ** 2
        assert np.isclose(err_two, np.sum(sigma[r:] ** 2), rtol=1e-8)
        err_one = np.linalg.norm(target - S @ one_step_v[:, :r] @ one_step_o[:r]) ** 2
        assert err_two <= err_one * (1 + 1e-9)


def test_permute_per_head_matches_a_loop():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3, 2, 4, 7))  # like q [D, K, G, 2, P]
    order = np.stack([rng.permutation(7) for _ in range(3)])  # one order per kv head (axis 1)
    got = lowrank.permute(a, order, axis=4, head_axes=(1,))
    for k in range(3):
        assert np.array_equal(got[:, k], a[:, k][..., order[k]])
    order2 = np.stack([[rng.permutation(4) for _ in range(2)] for _ in range(3)])  # heads at axes (1, 2)
    got2 = lowrank.permute(a, order2, axis=3, head_axes=(1, 2))
    for k in range(3):
        for g in range(2):
            assert np.array_equal(got2[:, k, g], a[:, k, g][:, order2[k, g]])
