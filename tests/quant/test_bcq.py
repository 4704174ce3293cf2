"""BCQ packed format: UQ <-> BCQ identity, alternating fit, slicing, nested planes, storage."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniql_jax.quant import bcq_fit, rtn
from uniql_jax.quant.formats import bcq, packed, qarray


def _weights(shape, seed=0, scale=0.02):
    """Heavy-tailed, LLM-like weights (numpy: no compilation for test data)."""
    return jnp.asarray(np.random.default_rng(seed).standard_t(4.0, shape) * scale, jnp.float32)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "axis"))
def _rtn(w, *, bits, group_size, axis):
    return rtn.quantize_rtn(w, bits=bits, group_size=group_size, axis=axis)


_uq_dequantize = jax.jit(qarray.dequantize, static_argnames=("dtype",))


@pytest.mark.parametrize("shape, axis, bit_widths", [((256, 48), 0, (2, 3, 4, 8)), ((3, 64, 5), 1, (3,))])
def test_uniform_is_bcq_with_power_of_two_scales_bit_exact(shape, axis, bit_widths):
    w = _weights(shape)
    for bits in bit_widths:
        q = _rtn(w, bits=bits, group_size=32, axis=axis)
        b = bcq.from_uniform(q)
        np.testing.assert_array_equal(np.asarray(bcq.dequantize(b)), np.asarray(_uq_dequantize(q)))
        np.testing.assert_array_equal(np.asarray(b.dequantize(jnp.float16)), np.asarray(_uq_dequantize(q, jnp.float16)))
        # the sign patterns are the uniform codes, the scales powers of two of the step
        np.testing.assert_array_equal(np.asarray(bcq.patterns_of(b)), np.asarray(qarray.codes_of(q)))
        alpha = np.moveaxis(np.asarray(b.alpha, np.float32), axis + 1, -1)  # [..., k]
        np.testing.assert_array_equal(alpha, alpha[..., -1:] * 2.0 ** np.arange(bits - 1, -1, -1))
        np.testing.assert_array_equal(np.asarray(b.offset, np.float32), -alpha[..., -1])  # o = -s/2, alpha_k = s/2


def test_from_uniform_refuses_scales_outside_float16():
    w = _weights((64, 8), scale=1e-7)  # steps ~1e-8: s/2 is subnormal in float16
    with pytest.raises(ValueError, match="float16"):
        bcq.from_uniform(_rtn(w, bits=4, group_size=32, axis=0))


def test_alternating_fit_error_non_increasing_and_below_greedy():
    x = bcq_fit.to_rows(_weights((512, 32), seed=1), 64, 0)  # [256, 64]
    fit = jax.jit(functools.partial(bcq_fit.alternating_fit_rows, bits=3, rounds=15))
    alpha, offset, patterns, errors = fit(x)
    errors = np.asarray(errors, np.float64)  # [16, R]
    greedy_alpha, greedy_offset, greedy_patterns = bcq_fit.greedy_fit_rows(x, 3)
    greedy_err = np.asarray(jnp.sum((x - bcq_fit.level_values(greedy_patterns, greedy_alpha) - greedy_offset[:, None]) ** 2, -1))
    np.testing.assert_allclose(errors[0], greedy_err, rtol=1e-5)
    # every round solves one block of variables exactly: the per-row error never rises
    assert np.all(np.diff(errors, axis=0) <= 1e-6 * errors[:-1] + 1e-12)
    final = np.asarray(jnp.sum((x - bcq_fit.level_values(patterns, alpha) - offset[:, None]) ** 2, -1))
    np.testing.assert_allclose(final, errors.min(0), rtol=1e-5)
    assert final.sum() < 0.75 * greedy_err.sum()  # alternation clearly beats the greedy start
    assert np.all(np.asarray(alpha) >= 0) and np.all(np.diff(np.asarray(alpha), axis=-1) <= 0)  # canonical
    # codes are the nearest levels of the final scales (full search == brute force argmin)
    levels = np.asarray(alpha) @ np.asarray(bcq_fit.sign_table(3)).T + np.asarray(offset)[:, None]  # [R, 8]
    brute = np.argmin(np.abs(np.asarray(x)[:, :, None] - levels[:, None, :]), axis=-1)
    np.testing.assert_array_equal(levels[np.arange(len(levels))[:, None], brute],
                                  levels[np.arange(len(levels))[:, None], np.asarray(patterns)])


@pytest.fixture(scope="module")
def fitted():
    """A 3-bit BCQ fit of a 3-D weight quantized along axis 1 (groups of 16)."""
    w = _weights((3, 64, 40), seed=2)
    return w, bcq_fit.bcq_fit(w, bits=3, group_size=16, rounds=15, axis=1)


def test_bcq_fit_layout_and_error_below_uniform(fitted):
    w, b = fitted
    assert b.planes.shape == (3, 8, 3, 40) and b.planes.dtype == jnp.uint8
    assert b.alpha.shape == (3, 4, 3, 40) and b.alpha.dtype == jnp.float16
    assert b.offset.shape == (3, 4, 40) and b.offset.dtype == jnp.float16
    err_bcq = float(jnp.sum((b.dequantize() - w) ** 2))
    err_rtn = float(jnp.sum((qarray.dequantize(_rtn(w, bits=3, group_size=16, axis=1)) - w) ** 2))
    assert err_bcq < 0.6 * err_rtn
    # the method and the module function agree, and jit sees BCQArray as a pytree
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda b: b.dequantize())(b)), np.asarray(bcq.dequantize(b)))


def test_slice_leading_keeps_bytes(fitted):
    _, b = fitted
    dense = np.asarray(b.dequantize())
    # quantized axis: whole groups -> a byte prefix of every array, same values
    s = bcq.slice_leading(b, 1, 32)
    assert s.shape == (3, 32, 40)
    np.testing.assert_array_equal(np.asarray(s.planes), np.asarray(b.planes)[:, :4])
    np.testing.assert_array_equal(np.asarray(s.alpha), np.asarray(b.alpha)[:, :2])
    np.testing.assert_array_equal(np.asarray(s.offset), np.asarray(b.offset)[:, :2])
    np.testing.assert_array_equal(np.asarray(s.dequantize()), dense[:, :32])
    # other axes: any prefix
    np.testing.assert_array_equal(np.asarray(bcq.slice_leading(b, 2, 7).dequantize()), dense[:, :, :7])
    np.testing.assert_array_equal(np.asarray(bcq.slice_leading(b, 0, 2).dequantize()), dense[:2])
    s2 = bcq.slice_leading(bcq.slice_leading(b, 2, 7), 1, 16)
    np.testing.assert_array_equal(np.asarray(s2.dequantize()), dense[:, :16, :7])
    with pytest.raises(ValueError, match="group size"):
        bcq.slice_leading(b, 1, 40)


def test_nested_planes_least_squares_refit(fitted):
    w, b = fitted  # [3, 64, 40], 3 bits along axis 1
    n = w.shape[1]
    x = jnp.asarray(np.random.default_rng(4).normal(size=(256, n)) * (1 + np.arange(n) % 5), jnp.float32)  # anisotropic
    H = x.T @ x / x.shape[0]

    def out_err(bk):
        return float(jnp.mean(jnp.einsum("tn,anb->tab", x, bk.dequantize() - w) ** 2))

    refit_errs = []
    for k in range(1, b.bits + 1):
        truncated = bcq.drop_planes(b, k)
        np.testing.assert_array_equal(np.asarray(truncated.planes), np.asarray(b.planes)[:, :, :k])
        exact = bcq.drop_planes(b, k, *bcq_fit.refit_alpha(b, w, k, H=H, damp=0.0))
        # the least-squares optimum over (alpha, o) is never worse than any other choice
        assert out_err(exact) <= out_err(truncated) * (1 + 1e-4)
        refit_errs.append(out_err(exact))
    # more planes, never worse (the extra scale may be 0): precision is elastic
    assert all(a >= bb * (1 - 1e-4) for a, bb in zip(refit_errs, refit_errs[1:]))
    assert refit_errs[0] > 4 * refit_errs[-1]
    # with fewer planes than stored, refitting beats plain truncation clearly, and fitting the
    # calibration output beats fitting the weights (which in turn beats truncation on weights)
    weight_ls = bcq.drop_planes(b, 2, *bcq_fit.refit_alpha(b, w, 2))
    exact2 = bcq.drop_planes(b, 2, *bcq_fit.refit_alpha(b, w, 2, H=H, damp=0.0))
    assert out_err(exact2) < 0.9 * out_err(bcq.drop_planes(b, 2))
    assert out_err(exact2) <= out_err(weight_ls) * (1 + 1e-4)
    w_err = lambda bk: float(jnp.sum((bk.dequantize() - w) ** 2))
    assert w_err(weight_ls) <= w_err(bcq.drop_planes(b, 2)) * (1 + 1e-4)


def test_bits_per_weight_measured_from_arrays():
    w = _weights((512, 64), seed=5)
    for bits, g in ((4, 128), (3, 64), (2, 32)):
        q = _rtn(w, bits=bits, group_size=g, axis=0)
        assert packed.bits_per_weight(q) == pytest.approx(bits + 16 / g)
        assert packed.bits_per_weight(bcq.from_uniform(q)) == pytest.approx(bits + 16 * (bits + 1) / g)
    b4 = bcq_fit.bcq_fit(w, bits=4, group_size=128, rounds=1)
    assert packed.bits_per_weight(b4) == 4.625  # K + 16(K+1)/E bpw (docs/method.md, "UniQuan: formats")
    norm = jnp.ones((64,), jnp.float16)
    mixed = {"w": b4, "norm": norm}
    expected = 8 * (b4.nbytes + norm.nbytes) / (w.size + norm.size)
    assert packed.bits_per_weight(mixed) == pytest.approx(expected)
    assert packed.bits_per_weight(bcq.drop_planes(b4, 2)) == pytest.approx(2 + 16 * 3 / 128)  # 2 scales + offset
