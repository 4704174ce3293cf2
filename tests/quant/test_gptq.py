"""GPTQ core: beats RTN on correlated inputs, equals a float64 sequential OBS reference,
equals RTN when H is a multiple of I, block-size invariant, robust Hessian handling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniql_jax.quant.formats import qarray
from uniql_jax.quant.gptq import accumulate_hessian, gptq_quantize, hessian_error, init_hessian
from uniql_jax.quant.rtn import rtn_quantize


def correlated_layer(d_in, d_out, n_tokens=512, seed=0):
    """Calibration inputs X [N, Din] with correlated channels of varied scale, and W [Din, Dout]."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_tokens, d_in))
    mixing = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    channel_scale = np.exp(0.75 * rng.standard_normal(d_in))
    x = (z @ mixing + 0.5 * z) * channel_scale
    w = rng.standard_normal((d_in, d_out))
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def hessian_of(x):
    h, count = accumulate_hessian(*init_hessian(x.shape[1]), x)
    return h


dequantize = jax.jit(qarray.dequantize)  # one compile per shape instead of one per op


def output_error(x, w, q):
    return float(jnp.linalg.norm(x @ w - x @ dequantize(q)))


# Pairwise cover of bits x group_size x act_order (every pair of values appears once or more)
# over three shapes; the [128, 48] cases use two lazy-batch blocks and share their compiled
# loops with the property tests below.
PAIRWISE_CASES = [
    ((128, 48), 4, 32, False, 64),
    ((128, 48), 3, 32, True, 64),
    ((256, 96), 4, 128, False, 128),
    ((256, 96), 3, 64, False, 128),
    ((256, 40), 4, 64, True, 128),
    ((256, 40), 3, 128, True, 128),
]


def _gptq_over_rtn_ratio(shape, bits, group_size, act_order, block_size=128):
    x, w = correlated_layer(*shape, seed=sum(shape) + bits)
    q = gptq_quantize(w, hessian_of(x), bits=bits, group_size=group_size, act_order=act_order, block_size=block_size)
    return output_error(x, w, q) / output_error(x, w, rtn_quantize(w, bits=bits, group_size=group_size))


@pytest.mark.parametrize("shape,bits,group_size,act_order,block_size", PAIRWISE_CASES)
def test_gptq_output_error_below_rtn(shape, bits, group_size, act_order, block_size):
    # Measured ratios ||XW - XŴ_gptq|| / ||XW - XŴ_rtn|| here: 0.68-0.74 without act-order, 0.43-0.49 with it.
    ratio = _gptq_over_rtn_ratio(shape, bits, group_size, act_order, block_size)
    assert ratio < 0.9, f"GPTQ/RTN output error ratio {ratio:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,bits,group_size,act_order",
    list(itertools.product([(256, 96), (384, 128)], [3, 4], [32, 64, 128], [False, True])),
)
def test_gptq_output_error_below_rtn_full_grid(shape, bits, group_size, act_order):
    ratio = _gptq_over_rtn_ratio(shape, bits, group_size, act_order)
    assert ratio < 0.9, f"GPTQ/RTN output error ratio {ratio:.3f}"


# The property tests below use [128, 48], group 32, two blocks of 64: (bits 4, natural order)
# and (bits 3, act-order), the compiled loops of the first two pairwise cases.
PROPERTY_CASES = [(4, False), (3, True)]


@pytest.mark.parametrize("bits,act_order", PROPERTY_CASES)
def test_gptq_result_is_valid_qarray(bits, act_order):
    x, w = correlated_layer(128, 48)
    q = gptq_quantize(w, hessian_of(x), bits=bits, group_size=32, block_size=64, act_order=act_order)
    assert (q.axis, q.bits, q.group_size, q.shape) == (0, bits, 32, (128, 48))
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (128 * bits // 8, 48)
    assert q.scales.dtype == jnp.float16 and q.scales.shape == (128 // 32, 48)
    codes = np.asarray(qarray.codes_of(q))
    assert codes.min() >= 0 and codes.max() < 2**bits
    assert np.all(np.asarray(q.scales, np.float32) > 0)
    manual = (codes - 2 ** (bits - 1)) * np.repeat(np.asarray(q.scales, np.float32), 32, axis=0)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), manual)
    # Repacking the unpacked codes reproduces the stored bytes (the pack is canonical).
    np.testing.assert_array_equal(np.asarray(qarray.pack_codes(jnp.asarray(codes), bits, 0)), np.asarray(q.codes))


@pytest.mark.parametrize("bits,act_order", PROPERTY_CASES)
def test_identity_hessian_gives_exactly_rtn(bits, act_order):
    """H = c·I: Uᵀ U is diagonal, no error is propagated, every row is rounded on its own."""
    _, w = correlated_layer(128, 48)
    q = gptq_quantize(w, 2.7 * jnp.eye(128), bits=bits, group_size=32, block_size=64, act_order=act_order)
    r = rtn_quantize(w, bits=bits, group_size=32)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(r.codes))
    np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(r.scales))


@pytest.mark.parametrize("bits,act_order", PROPERTY_CASES)
def test_zero_point_gptq_below_zero_point_rtn_and_identity_gives_rtn(bits, act_order):
    """zero_point=True: the row loop rounds on the asymmetric min/max grid. With H = c·I it is
    exactly RTN on that grid (codes, scales, offsets), so the grid inside the loop is the
    asymmetric one; with a real H its Hessian-weighted error is below RTN's on the same grid."""
    x, w = correlated_layer(128, 48, seed=9)
    w = w + 0.5  # off-centre columns: the zero point matters
    kwargs = dict(bits=bits, group_size=32, block_size=64, act_order=act_order, zero_point=True)
    r = rtn_quantize(w, bits=bits, group_size=32, zero_point=True)
    q_id = gptq_quantize(w, 2.7 * jnp.eye(128), **kwargs)
    assert type(q_id) is qarray.ZeroPointQArray
    for field in ("codes", "scales", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(q_id, field)), np.asarray(getattr(r, field)))
    h = hessian_of(x)
    q = gptq_quantize(w, h, **kwargs)
    err_gptq = float(hessian_error(w, dequantize(q), h))
    err_rtn = float(hessian_error(w, dequantize(r), h))
    assert err_gptq <= err_rtn, (err_gptq, err_rtn)
    sym = gptq_quantize(w, h, **{**kwargs, "zero_point": False})
    assert err_gptq < float(hessian_error(w, dequantize(sym), h))  # the zero point pays off here


@pytest.mark.parametrize("bits,act_order", PROPERTY_CASES)
def test_hessian_scale_does_not_matter(bits, act_order):
    """GPTQ depends on H only up to a positive factor, so a driver may pass a raw Σ xxᵀ.
    (A power-of-two factor keeps every float operation exact, hence bit-equal results.)"""
    x, w = correlated_layer(128, 48, seed=5)
    h = hessian_of(x)
    kwargs = dict(bits=bits, group_size=32, block_size=64, act_order=act_order)
    np.testing.assert_array_equal(
        np.asarray(gptq_quantize(w, 256.0 * h, **kwargs).codes), np.asarray(gptq_quantize(w, h, **kwargs).codes)
    )


def test_dead_inputs_are_zeroed_and_finite():
    """An input that is always 0 (H_ii = 0) gets weight 0 and never makes NaNs."""
    x, w = correlated_layer(128, 48)
    dead = np.zeros(128, bool)
    dead[[3, 40, 41, 127]] = True
    x = jnp.where(jnp.asarray(dead)[None, :], 0.0, x)
    q = gptq_quantize(w, hessian_of(x), bits=4, group_size=32, block_size=64)
    codes = np.asarray(qarray.codes_of(q))
    assert np.all(codes[dead] == 8)
    assert np.all(np.isfinite(np.asarray(q.scales, np.float32)))
    # With H diagonal and dead rows, the result is RTN of W with the dead rows zeroed.
    diag_h = jnp.diag(jnp.where(jnp.asarray(dead), 0.0, 1.0))
    q_diag = gptq_quantize(w, diag_h, bits=4, group_size=32, block_size=64)
    r = rtn_quantize(jnp.where(jnp.asarray(dead)[:, None], 0.0, w), bits=4, group_size=32)
    np.testing.assert_array_equal(np.asarray(q_diag.codes), np.asarray(r.codes))


def sequential_obs_reference(w, h, bits, group_size, damp, act_order):
    """GPTQ Eq. 2-3 in float64 without blocks or Cholesky: quantize one row, update the rest
    with the current inverse Hessian, then eliminate that row from the inverse (OBS)."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    zero, qmax = 2 ** (bits - 1), 2 ** (bits - 1) - 1

    def group_scale(rows):  # same float32 division and float16 storage as the library
        amax = np.abs(rows).max(axis=0).astype(np.float32)
        return np.where(amax > 0, amax / np.float32(qmax), 1.0).astype(np.float16).astype(np.float64)

    n_groups = len(w) // group_size
    scales = np.stack([group_scale(w[g * group_size : (g + 1) * group_size]) for g in range(n_groups)])
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(w))
    h_inv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(len(h)))
    codes = np.zeros(w.shape, np.int64)
    remaining = np.ones(len(w), bool)
    for i in order:
        if not act_order and i % group_size == 0:  # scale from the updated rows at group start
            scales[i // group_size] = group_scale(w[i : i + group_size])
        s = scales[i // group_size]
        codes[i] = np.clip(np.round(w[i] / s) + zero, 0, 2 * zero - 1)
        err = (w[i] - (codes[i] - zero) * s) / h_inv[i, i]
        remaining[i] = False
        w[remaining] -= np.outer(h_inv[remaining, i], err)
        h_inv -= np.outer(h_inv[:, i], h_inv[i, :]) / h_inv[i, i]
    return codes, scales


@pytest.mark.parametrize("bits,act_order", PROPERTY_CASES)
def test_matches_sequential_float64_reference(bits, act_order):
    """Blocked + lazy-batch + Cholesky GPTQ == the plain sequential OBS algorithm."""
    x, w = correlated_layer(128, 48, seed=bits)
    h = hessian_of(x)
    q = gptq_quantize(w, h, bits=bits, group_size=32, block_size=64, act_order=act_order)
    ref_codes, ref_scales = sequential_obs_reference(w, h, bits, 32, 0.01, act_order)
    agree = np.mean(np.asarray(qarray.codes_of(q)) == ref_codes)
    assert agree >= 0.999, f"only {agree:.4%} of codes equal the float64 reference"  # measured: 100 %
    np.testing.assert_allclose(np.asarray(q.scales, np.float64), ref_scales, rtol=2e-3)


def test_block_size_does_not_change_the_result():
    x, w = correlated_layer(256, 96, seed=256 + 96 + 4)
    h = hessian_of(x)
    small = gptq_quantize(w, h, bits=4, group_size=128, block_size=32)  # rounded up to one group: 2 blocks
    large = gptq_quantize(w, h, bits=4, group_size=128, block_size=256)  # 1 block
    agree = np.mean(np.asarray(qarray.codes_of(small)) == np.asarray(qarray.codes_of(large)))
    assert agree >= 0.999, agree


@pytest.mark.parametrize("zero_point,act_order", [(False, False), (True, True)])
def test_output_chunks_give_the_same_qarray(zero_point, act_order):
    """Output columns never interact in GPTQ, so quantizing them in chunks (two of 40 and a
    remainder of 16 here) gives the whole call's codes, scales and offsets."""
    x, w = correlated_layer(128, 96, seed=7)
    h = hessian_of(x)
    whole = gptq_quantize(w, h, bits=4, group_size=32, act_order=act_order, zero_point=zero_point)
    chunked = gptq_quantize(w, h, bits=4, group_size=32, act_order=act_order, zero_point=zero_point, out_chunk=40)
    assert type(chunked) is type(whole) and chunked.shape == whole.shape == (128, 96)
    agree = np.mean(np.asarray(qarray.codes_of(chunked)) == np.asarray(qarray.codes_of(whole)))
    assert agree >= 0.999, agree  # measured: identical
    np.testing.assert_allclose(np.asarray(chunked.scales, np.float32), np.asarray(whole.scales, np.float32), rtol=1e-3)
    if zero_point:
        np.testing.assert_allclose(np.asarray(chunked.offset, np.float32), np.asarray(whole.offset, np.float32),
                                   rtol=1e-3, atol=1e-6)


def test_non_pd_hessian_raises_damping_instead_of_nan():
    """λ_min(H) < -1% of mean diag: the first Cholesky fails, the ×10 retry (damp 0.1) succeeds."""
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    eigenvalues = np.linspace(1.0, 2.0, 128)
    eigenvalues[0] = -0.05 * eigenvalues.mean()
    h = jnp.asarray((basis * eigenvalues) @ basis.T, jnp.float32)
    w = jnp.asarray(rng.standard_normal((128, 48)), jnp.float32)
    q = gptq_quantize(w, h, bits=4, group_size=32, block_size=64, damp=0.01)
    assert np.all(np.isfinite(np.asarray(dequantize(q))))
    q_direct = gptq_quantize(w, h, bits=4, group_size=32, block_size=64, damp=0.1)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(q_direct.codes))


def test_accumulate_hessian_is_running_mean_of_2xtx():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((n, 24)).astype(np.float32) * 3 for n in (5, 17, 64)]
    masks = [np.ones(5), (rng.random(17) > 0.4).astype(np.float32), np.ones(64)]
    h, count = init_hessian(24)
    for xb, mb in zip(batches, masks):
        h, count = accumulate_hessian(h, count, jnp.asarray(xb).reshape(-1, 1, 24), jnp.asarray(mb).reshape(-1, 1))
    kept = np.concatenate([xb[mb > 0] for xb, mb in zip(batches, masks)]).astype(np.float64)
    assert int(count) == len(kept)
    np.testing.assert_allclose(np.asarray(h), 2 * kept.T @ kept / len(kept), rtol=1e-5, atol=1e-5)


def test_hessian_error_is_the_layer_output_error():
    x, w = correlated_layer(128, 48)
    w_hat = dequantize(rtn_quantize(w, bits=4, group_size=32))
    expected = 2.0 / x.shape[0] * float(jnp.sum((x @ w - x @ w_hat) ** 2))
    np.testing.assert_allclose(float(hessian_error(w, w_hat, hessian_of(x))), expected, rtol=1e-4)


def test_gptq_under_outer_jit_matches_eager():
    x, w = correlated_layer(64, 16)
    h = hessian_of(x)
    eager = gptq_quantize(w, h, bits=4, group_size=32, damp=0.02)
    jitted = jax.jit(lambda w, h, damp: gptq_quantize(w, h, bits=4, group_size=32, damp=damp))(w, h, 0.02)
    np.testing.assert_array_equal(np.asarray(eager.codes), np.asarray(jitted.codes))
    np.testing.assert_array_equal(np.asarray(eager.scales), np.asarray(jitted.scales))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(jnp.ones((100, 8)), jnp.eye(100), group_size=32)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(jnp.ones((64, 8)), jnp.eye(32), group_size=32)


def test_tied_table_quantized_as_the_head_it_is():
    """`tied_head_gptq`: a tied embedding quantized with GPTQ on the final hidden states (the head's inputs)
    has a lower head output error on those states than per-row RTN, keeps the row-table layout that
    embedding lookups read (same packing along D), and its rows are the transposed head exactly."""
    import uniql_jax as uq
    from uniql_jax.config import AttentionBlock, MLPBlock, ModelConfig
    from uniql_jax.models.stacks import bind
    from uniql_jax.quant import rtn
    from uniql_jax.quant.quantize import transposed_table

    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, tie_word_embeddings=True, num_heads=4,
                      num_kv_heads=2, head_dim=16, rotary_dim=16, intermediate_size=128,
                      blocks=(AttentionBlock(0, 8, 0, 16), MLPBlock(0, 128)))
    params = uq.init_params(cfg, seed=1)
    params["embed"] = params["embed"] * 20  # a table of realistic scale (init is 0.02)
    calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 32)).astype(np.int32)
    kw = dict(method="gptq", bits=4, group_size=32, progress=False)
    as_head = uq.quantize(cfg, params, calib, tied_head_gptq=True, **kw)
    per_row = uq.quantize(cfg, params, calib, **kw)
    assert as_head["embed"].shape == per_row["embed"].shape == (96, 64) and as_head["embed"].axis == 1

    # the head's inputs as the driver saw them: float embedding lookup, then the quantized blocks
    model = bind(cfg, {**as_head, "embed": params["embed"]})
    positions = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), calib.shape)
    h = np.asarray(model.hidden(jnp.asarray(calib), positions)[0]).reshape(-1, 64)
    table = np.asarray(params["embed"])

    def head_error(q):
        return float(np.linalg.norm(h @ table.T - h @ np.asarray(qarray.dequantize(q)).T))

    assert head_error(as_head["embed"]) < 0.9 * head_error(per_row["embed"])
    ids = jnp.arange(cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(qarray.lookup_rows(as_head["embed"], ids)),
                                  np.asarray(qarray.dequantize(as_head["embed"])))
    head = rtn.quantize_rtn(jnp.asarray(table.T), bits=4, group_size=32, axis=0)
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(transposed_table(head))),
                                  np.asarray(qarray.dequantize(head)).T)
