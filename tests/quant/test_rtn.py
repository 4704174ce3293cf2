"""RTN entry points: nearest-grid rounding, per-row embedding layout, row lookup."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniql_jax.quant.formats import qarray
from uniql_jax.quant.formats.qarray import lookup_rows
from uniql_jax.quant.rtn import rtn_quantize, rtn_quantize_embedding

dequantize = jax.jit(qarray.dequantize)  # one compile per shape instead of one per op


def _random(shape, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * np.exp(rng.standard_normal(shape[-1])), jnp.float32)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_rtn_rounds_to_the_nearest_grid_point(bits):
    w = _random((128, 40))
    q = rtn_quantize(w, bits=bits, group_size=32)
    assert (q.axis, q.shape, q.scales.shape) == (0, (128, 40), (4, 40))
    scale = np.repeat(np.asarray(q.scales, np.float32), 32, axis=0)
    err = np.abs(np.asarray(w) - np.asarray(dequantize(q)))
    # Symmetric absmax never clips (up to the float16 rounding of the scale): |w - ŵ| <= s/2.
    assert np.all(err <= 0.5 * scale * (1 + 1e-3))
    # The largest weight of each group lands on the outermost level ±(2^(b-1) - 1).
    centered = np.asarray(qarray.codes_of(q)) - 2 ** (bits - 1)
    assert np.all(np.abs(centered).reshape(4, 32, 40).max(axis=1) == 2 ** (bits - 1) - 1)


def test_embedding_is_quantized_per_row_along_d():
    table = _random((50, 64), seed=1)
    q = rtn_quantize_embedding(table, bits=4)
    assert (q.axis, q.group_size, q.scales.shape, q.codes.shape) == (1, 64, (50, 1), (50, 32))
    expected_scale = np.abs(np.asarray(table)).max(axis=1, keepdims=True) / 7
    np.testing.assert_allclose(np.asarray(q.scales, np.float32), expected_scale, rtol=1e-3)
    grouped = rtn_quantize_embedding(table, bits=4, group_size=32)
    assert grouped.scales.shape == (50, 2)
    # Quantizing one row alone gives the same bytes: rows are independent.
    row = rtn_quantize_embedding(table[7:8], bits=4, group_size=32)
    np.testing.assert_array_equal(np.asarray(row.codes), np.asarray(grouped.codes[7:8]))


def test_lookup_rows_equals_dequantize_then_gather():
    q = rtn_quantize_embedding(_random((50, 64), seed=2), bits=4, group_size=32)
    ids = jnp.asarray([[0, 49, 7], [7, 3, 3]])
    out = lookup_rows(q, ids, jnp.float32)
    assert out.shape == (2, 3, 64)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(q))[np.asarray(ids)])


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(jnp.ones((4, 32, 8)))
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize_embedding(jnp.ones((32,)))
