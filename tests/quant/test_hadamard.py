"""Hadamard rotations: orthonormality, structured transform == dense, folding equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniql_jax.models.layers import rms_norm
from uniql_jax.quant import hadamard
from uniql_jax.quant.formats import qarray
from uniql_jax.quant.rtn import rtn_quantize

dequantize = jax.jit(qarray.dequantize)  # one compile per shape instead of one per op

SIZES = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 60, 64, 96, 108, 112, 148, 256, 448]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    q = np.asarray(hadamard.hadamard_matrix(n), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(np.abs(q), 1 / np.sqrt(n), rtol=1e-6)


@pytest.mark.parametrize("n", [0, 3, 6, 10, 52, 92, 172])
def test_unsupported_sizes_raise(n):
    assert not hadamard.is_supported(n)
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard.hadamard_matrix(n)


def test_random_hadamard_is_orthonormal_and_seeded():
    a = np.asarray(hadamard.random_hadamard_matrix(96, 0), np.float64)
    np.testing.assert_allclose(a @ a.T, np.eye(96), atol=1e-6)
    np.testing.assert_array_equal(a, np.asarray(hadamard.random_hadamard_matrix(96, 0)))
    assert not np.allclose(a, np.asarray(hadamard.random_hadamard_matrix(96, 1)))


@pytest.mark.parametrize("n", [8, 12, 40, 448])
def test_structured_transform_equals_dense(n):
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.standard_normal((3, n, 5)), jnp.float32)
    signs = hadamard.random_signs(n, 4)
    dense = hadamard.random_hadamard_matrix(n, 4)
    expected = np.einsum("anb,nm->amb", np.asarray(x), np.asarray(dense))
    np.testing.assert_allclose(np.asarray(hadamard.hadamard_transform(x, axis=1, signs=signs)), expected, atol=1e-5)


def test_input_side_fold_is_exact():
    """(x Q)(Qᵀ W) == x W, also for a multi-axis weight contracted along axis 0."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((7, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 4, 6)), jnp.float32)  # e.g. q [D, heads, head_dim]
    q = hadamard.random_hadamard_matrix(96, 1)
    folded = hadamard.rotate_input_side(w, q, axis=0)
    np.testing.assert_allclose(
        np.einsum("td,dhp->thp", x @ q, folded), np.einsum("td,dhp->thp", x, w), rtol=1e-5, atol=1e-5
    )


def test_output_side_fold_is_exact():
    """x (W Q) == (x W) Q along the last axis, for an o_proj-like [heads, rank, D] weight and a bias."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((7, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 8, 96)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(96), jnp.float32)
    q = hadamard.random_hadamard_matrix(96, 2)
    y = np.einsum("thr,hrd->td", x, w) + bias
    y_rot = np.einsum("thr,hrd->td", x, hadamard.rotate_output_side(w, q)) + hadamard.rotate_output_side(bias, q)
    np.testing.assert_allclose(y_rot, y @ np.asarray(q), rtol=1e-5, atol=1e-5)


def test_rms_norm_weight_folds_into_next_linear():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((7, 64)) * 3, jnp.float32)
    gain = jnp.asarray(1 + rng.standard_normal(64) * 0.3, jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)
    folded = hadamard.fold_norm_into_linear(gain, w)
    np.testing.assert_allclose(
        rms_norm(x, jnp.ones(64), 1e-6) @ folded, rms_norm(x, gain, 1e-6) @ w, rtol=1e-5, atol=1e-5
    )


def test_rotation_passes_through_unit_rms_norm():
    """Residual stream rotated (h Q), norm weight folded, reader rotated: same output (QuaRot §4)."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((7, 64)) * 2, jnp.float32)
    gain = jnp.asarray(1 + rng.standard_normal(64) * 0.3, jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)
    q = hadamard.random_hadamard_matrix(64, 3)
    reader = hadamard.rotate_input_side(hadamard.fold_norm_into_linear(gain, w), q)
    np.testing.assert_allclose(
        rms_norm(h @ q, jnp.ones(64), 1e-6) @ reader, rms_norm(h, gain, 1e-6) @ w, rtol=1e-4, atol=1e-4
    )


def test_rotation_reduces_rtn_error_with_outlier_inputs():
    """The rationale: a few outlier input rows dominate their groups' scales; rotating spreads them."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((128, 64))
    w[[5, 77]] *= 30.0
    w = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    q = hadamard.random_hadamard_matrix(128, 5)
    plain = dequantize(rtn_quantize(w, bits=4, group_size=32))
    rotated = dequantize(rtn_quantize(hadamard.rotate_input_side(w, q), bits=4, group_size=32))
    err_plain = float(jnp.linalg.norm(x @ w - x @ plain))
    err_rotated = float(jnp.linalg.norm(x @ w - (x @ q) @ rotated))
    assert err_rotated < 0.7 * err_plain, (err_rotated, err_plain)
