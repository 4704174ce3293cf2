"""Asymmetric (zero-point) uniform quantization, issue 18: `ZeroPointQArray` end to end.

Properties: the min/max grid beats the absmax grid on skewed weights; a weight already on a
GGUF Q4_1 grid (4 bits, groups of 32) is reproduced bit for bit; slicing, row lookup, the
kernels' flattened view, the transposed head table and the BCQ bridge of the packed form
equal the same operation on the dequantized array (a dropped offset fails each); storage
counts the offsets; a tiny model quantized with `zero_point=True` runs on the Pallas path
(interpret) with the kernel taking the offsets (no fallback), equal to the dense forward of
its dequantized weights; a checkpoint round trip (full and at a pruned rate) is bit-exact.
GPTQ on the asymmetric grid is tested in test_gptq.py, pruning in test_quantized_pruning.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from pallas_kernels.common import dispatch_log
from uniql_jax.compress.prune import abstract_params
from uniql_jax.config import AttentionBlock, MLPBlock, ModelConfig
from uniql_jax.quant import rtn
from uniql_jax.quant.formats import bcq, packed, qarray
from uniql_jax.quant.quantize import quantize_weight, transposed_table


def dense(q):
    return np.asarray(packed.dense(q, jnp.float32))


def skewed(shape, seed=0):
    """Weights whose groups are far from symmetric about 0: exponential plus a per-column shift."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.exponential(0.05, shape) + rng.uniform(-0.02, 0.1, shape[1:]), jnp.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_min_max_grid_beats_absmax_grid_on_skewed_weights(bits):
    w = skewed((128, 24), seed=bits)
    sym = rtn.quantize_rtn(w, bits=bits, group_size=32, axis=0)
    asym = rtn.quantize_rtn(w, bits=bits, group_size=32, axis=0, zero_point=True)
    assert type(sym) is qarray.QArray and sym.offset is None
    assert type(asym) is qarray.ZeroPointQArray and asym.offset.shape == asym.scales.shape
    codes = np.asarray(qarray.codes_of(asym))
    assert codes.min() == 0 and codes.max() == (1 << bits) - 1  # unsigned codes spanning the grid
    err_sym, err_asym = (float(np.mean((dense(q) - np.asarray(w)) ** 2)) for q in (sym, asym))
    # all-positive groups use half of the absmax grid: about 4x the squared error (measured 3.5-4.5x)
    assert err_asym < 0.5 * err_sym, (err_asym, err_sym)


def q4_1_weights(d_in, d_out, seed=0):
    """A weight as llama.cpp's Q4_1 stores it (quantize_row_q4_1_ref, blocks of 32 along Din):
    d = (max - min) / 15 and m = min in float16, q = min(15, int((x - min) / d + 0.5)),
    dequantized w = d * q + m in float32. Returns (w, q, d16, m16)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((d_in // 32, 32, d_out)) * 0.05 + rng.uniform(-0.05, 0.05, (d_in // 32, 1, d_out)))
    x = x.astype(np.float32)
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / np.float32(15)
    q = np.minimum(15, ((x - lo[:, None]) * (np.float32(1) / d)[:, None] + np.float32(0.5)).astype(np.int32))
    d16, m16 = d.astype(np.float16), lo.astype(np.float16)
    w = d16.astype(np.float32)[:, None] * q.astype(np.float32) + m16.astype(np.float32)[:, None]
    return w.reshape(d_in, d_out), q.reshape(d_in, d_out), d16, m16


def test_q4_1_grid_is_reproduced_exactly_by_zero_point_rtn_g32():
    w, q, d16, m16 = q4_1_weights(256, 40)
    r = rtn.rtn_quantize(jnp.asarray(w), bits=4, group_size=32, zero_point=True)
    np.testing.assert_array_equal(np.asarray(qarray.codes_of(r)), q)
    np.testing.assert_array_equal(np.asarray(r.scales).view(np.uint16), d16.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(r.offset).view(np.uint16), m16.view(np.uint16))
    np.testing.assert_array_equal(dense(r).view(np.uint32), w.view(np.uint32))  # bit for bit
    sym = rtn.rtn_quantize(jnp.asarray(w), bits=4, group_size=32)
    assert np.max(np.abs(dense(sym) - w)) > 1e-3  # what the symmetric grid costs on the same weight


def test_slices_and_views_equal_the_dense_operation():
    """slice_leading (every axis), lookup_rows, flatten_contraction, transposed_table, the nd
    reshape of the driver and dequantize of a ZeroPointQArray == the same op on dense(q)."""
    w = skewed((4, 64, 24), seed=1)
    q = rtn.quantize_rtn(w, bits=3, group_size=16, axis=1, zero_point=True)
    full = dense(q)
    for axis, n in [(0, 3), (1, 32), (1, 16), (2, 17), (2, 1)]:
        s = packed.slice_leading(q, axis, n)
        assert type(s) is qarray.ZeroPointQArray
        np.testing.assert_array_equal(dense(s), full[tuple(slice(0, n) if a == axis else slice(None) for a in range(3))])
    with pytest.raises(ValueError, match="group size"):
        qarray.slice_leading(q, 1, 24)

    table = rtn.rtn_quantize_embedding(skewed((50, 64), seed=2), bits=4, group_size=16, zero_point=True)
    ids = jnp.asarray([[3, 0, 49], [7, 7, 12]])
    np.testing.assert_array_equal(np.asarray(qarray.lookup_rows(table, ids)), dense(table)[np.asarray(ids)])

    w_o = skewed((2, 3, 64, 24), seed=3)  # o-proj [K, G, R, D] quantized along R
    q_o = quantize_weight(w_o, None, method="rtn", bits=4, group_size=32, n_contract=3, damp=0.0, act_order=False,
                          zero_point=True)
    assert type(q_o) is qarray.ZeroPointQArray and q_o.axis == 2 and q_o.shape == w_o.shape
    flat = packed.flatten_contraction(q_o, 3)
    np.testing.assert_array_equal(dense(flat), dense(q_o).reshape(2 * 3 * 64, 24))

    head = rtn.rtn_quantize(skewed((64, 50), seed=4), bits=4, group_size=32, zero_point=True)  # [D, V]
    np.testing.assert_array_equal(dense(transposed_table(head)), dense(head).T)


def test_bcq_bridge_and_storage_count_the_offsets():
    q = rtn.quantize_rtn(skewed((128, 24), seed=5), bits=4, group_size=32, axis=0, zero_point=True)
    b = bcq.from_uniform(q)
    # the BCQ offset o + s (2^k - 1) / 2 is rounded to float16: half a step of |o_bcq| at most
    bound = np.repeat(np.abs(np.asarray(b.offset, np.float32)), 32, axis=0) * 2.0 ** -11
    assert np.all(np.abs(dense(b) - dense(q)) <= bound + 1e-12)
    sym = rtn.quantize_rtn(skewed((128, 24), seed=5), bits=4, group_size=32, axis=0)
    np.testing.assert_array_equal(np.asarray(bcq.from_uniform(sym).dequantize()), dense(sym))  # still exact
    assert packed.bits_per_weight(q) == pytest.approx(4 + 32 / 32)
    assert packed.bits_per_weight(sym) == pytest.approx(4 + 16 / 32)
    assert q.nbytes == sym.nbytes + q.offset.size * 2 == packed.nbytes(q) == packed.deployed_bytes(q)


def tiny_llama():
    blocks = (AttentionBlock(0, 8, 0, 32), MLPBlock(0, 128))
    return ModelConfig(arch="llama", vocab_size=96, hidden_size=64, blocks=blocks, rotary_dim=32,
                       intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=False)


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "pair_index":
            return jnp.broadcast_to(jnp.arange(leaf.shape[-1], dtype=leaf.dtype), leaf.shape)
        mean, scale = (1.0, 0.1) if "norm" in name else (0.02, 0.1)  # off-centre weights
        return jnp.asarray(mean + scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


@pytest.fixture(scope="module")
def zero_point_model():
    """(cfg, params, quantized params, table): RTN with zero point in groups that the table's
    kept sizes divide (o keeps 16 of its 32 rank rows at 50 %: groups of 16 there)."""
    cfg = tiny_llama()
    params = random_params(cfg)
    table = {0.0: cfg.blocks, 0.5: (AttentionBlock(0, 4, 0, 16), MLPBlock(0, 64))}
    qparams = uq.quantize(cfg, params, None, method="rtn", bits=4, group_size=32, table=table, zero_point=True)
    return cfg, params, qparams, table


def test_quantize_zero_point_packs_every_weight_with_offsets(zero_point_model):
    cfg, params, qparams, _ = zero_point_model
    leaves = jax.tree.leaves(qparams, is_leaf=packed.is_packed)
    zp = [x for x in leaves if packed.is_packed(x)]
    assert zp and all(type(x) is qarray.ZeroPointQArray for x in zp)
    assert type(qparams["embed"]) is qarray.ZeroPointQArray and type(qparams["lm_head"]) is qarray.ZeroPointQArray
    default = uq.quantize(cfg, params, None, method="rtn", bits=4, group_size=32)
    assert all(type(x) is qarray.QArray for x in jax.tree.leaves(default, is_leaf=packed.is_packed)
               if packed.is_packed(x))  # the default is unchanged: symmetric
    with pytest.raises(ValueError, match="zero_point"):
        uq.quantize(cfg, params, None, method="uniquan", zero_point=True)


@pytest.mark.slow  # interpret-mode kernels on a whole model; the kernel's own offsets: test_w4a16_kernel.py
def test_forward_pallas_with_zero_point_equals_dense_forward(zero_point_model):
    """The model forward on the kernels (interpret mode) takes the offsets in the W4A16 kernel
    (logged as w4a16/pallas, never a fallback) and equals the xla forward of the dequantized
    weights; the embedding lookup reads the offsets of the gathered rows."""
    cfg, _, qparams, _ = zero_point_model
    dq = jax.tree.map(lambda x: qarray.dequantize(x, jnp.float32) if packed.is_packed(x) else x, qparams,
                      is_leaf=packed.is_packed)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    want = np.asarray(uq.forward(cfg, dq, tokens, impl="xla"), np.float64)
    with dispatch_log() as log:
        got = np.asarray(uq.forward(cfg, qparams, tokens, impl="pallas"), np.float64)
    assert log.ran("w4a16", "pallas") > 0 and log.ran("w4a16", "fallback") == 0, log.as_dict()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.max(np.abs(want)), rtol=0)
    symmetric_view = jax.tree.map(lambda x: qarray.QArray(x.codes, x.scales, x.bits, x.group_size, x.axis, x.shape)
                                  if packed.is_packed(x) else x, qparams, is_leaf=packed.is_packed)
    dropped = np.asarray(uq.forward(cfg, symmetric_view, tokens, impl="xla"), np.float64)
    assert np.max(np.abs(dropped - want)) > 1e2 * np.max(np.abs(got - want))  # the offsets matter


def test_checkpoint_round_trip_is_bit_exact(zero_point_model, tmp_path):
    cfg, _, qparams, table = zero_point_model
    uq.save(tmp_path / "zp", cfg, qparams, table=table)
    for rate in (None, 0.5):
        cfg_l, loaded = uq.load(tmp_path / "zp", rate=rate)
        cfg_w, want = (cfg, qparams) if rate is None else uq.prune(cfg, qparams, rate, table)
        assert cfg_l == cfg_w
        got_leaves, got_def = jax.tree.flatten(loaded, is_leaf=packed.is_packed)
        want_leaves, want_def = jax.tree.flatten(want, is_leaf=packed.is_packed)
        assert got_def == want_def
        for g, w in zip(got_leaves, want_leaves):
            assert type(g) is type(w)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
