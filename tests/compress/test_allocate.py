"""Stage 2 allocation: the block-influence rule, rounding steps, tables usable by prune."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compress_models import sorted_model, tiny_config, tokens

from uniql_jax.compress import allocate as A
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig
from uniql_jax.models.stacks import bind


def test_prune_fractions_follow_the_softmax_rule():
    s = np.array([0.05, 0.30, 0.10, 0.02, 0.20])
    phi = A.prune_fractions(s, 0.2)
    assert np.isclose(phi.mean(), 0.2)  # no clipping here: the global rate is met exactly
    assert np.all(np.diff(phi[np.argsort(s)]) < 0)  # more influence, less pruning
    expected = 5 * 0.2 * np.exp(-s / 0.1) / np.exp(-s / 0.1).sum()
    assert np.allclose(phi, expected)
    sharp = A.prune_fractions(np.array([0.0, 1.0, 1.0]), 0.5)
    assert sharp[0] == A.MAX_PRUNE and np.all(sharp >= 0)
    weighted = A.prune_fractions(s, 0.2, weights_L=np.array([1, 2, 1, 1, 1.0]))
    assert weighted[1] < phi[1]  # a weight of 2 on a layer's score protects it further


def test_round_kept_and_default_steps():
    assert A.round_kept(14336, 0.75, 128) == 10752 and A.round_kept(14336, 0.7, 128) % 128 == 0
    assert A.round_kept(64, 0.01, 8) == 8  # never below one step
    assert A.round_kept(5, 0.5, 8) == 5  # a dimension smaller than its step stays whole
    assert A.round_kept(172, 1.0, 4) == 172 and A.round_kept(0, 0.5, 4) == 0
    llama8b = ModelConfig(arch="llama", vocab_size=8, hidden_size=4096, blocks=(AttentionBlock(0, 64, 0, 128),
                          MLPBlock(0, 14336)), num_heads=32, num_kv_heads=8, head_dim=128, rotary_dim=128,
                          intermediate_size=14336)
    steps = A.default_steps(llama8b)
    assert (steps["width"], steps["qk_pairs"], steps["vo_rank"]) == (128, 8, 16)  # method.md's steps
    mamba = ModelConfig(arch="mamba2", vocab_size=8, hidden_size=4096, blocks=(Mamba2Block(0, 128, 64),),
                        ssm_heads=128, ssm_head_dim=64, ssm_groups=8, ssm_state=128)
    assert (A.default_steps(mamba)["d_state"], A.default_steps(mamba)["head_dim"]) == (16, 2)
    stories = dict(intermediate_size=172, rotary_dim=8, head_dim=8)
    small = A.default_steps(dataclasses.replace(llama8b, **stories))
    assert small["width"] == 4 and small["qk_pairs"] == 1


@functools.partial(jax.jit, static_argnums=0)
def residual_stream(cfg, params, toks):
    """x before every block and after the last, through the bound model, [n_blocks + 1, B, T, D]."""
    model = bind(cfg, params)
    x = params["embed"][toks]
    pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
    xs = [x]
    for block in model.blocks:
        x = x + block(x, pos, None, None, "xla")[0]
        xs.append(x)
    return jnp.stack(xs)


def test_block_influence_matches_the_residual_stream():
    cfg, params, _, calib = sorted_model("llama")  # decoder layers of two blocks
    scores = A.block_influence(cfg, params, calib, batch_size=4)
    xs = np.asarray(residual_stream(cfg, params, jnp.asarray(calib)))[:, :, -1]  # last token
    groups = A.layer_groups(cfg)
    assert len(scores) == len(groups) == cfg.num_layers == 2 and groups == [[0, 1], [2, 3]]
    for s, g in zip(scores, groups):
        a, b = xs[g[0]], xs[g[-1] + 1]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert np.isclose(s, 1 - cos.mean(), atol=1e-5)


def test_nemotron_h_weighs_its_mlp_layers_twice():
    cfg = tiny_config("nemotron_h")  # one block per decoder layer
    assert A.layer_groups(cfg) == [[0], [1], [2], [3]]
    assert list(A.layer_weights(cfg)) == [1.0, 1.0, 2.0, 1.0]
    assert list(A.layer_weights(tiny_config("bamba"))) == [1.0, 1.0]


@pytest.mark.parametrize("method", ["block_influence", "uniform"])
def test_tables_shrink_with_the_rate(method):
    cfg, _, params, calib = sorted_model("llama")
    rates = [0.0, 0.1, 0.2, 0.3]
    table = A.allocate(cfg, params, calib, rates, method=method, steps={"width": 4})
    assert sorted(table) == rates and table[0.0] == cfg.blocks
    counts = [A.param_count(cfg.with_blocks(table[r])) for r in rates]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    for lo, hi in zip(rates, rates[1:]):
        for a, b in zip(table[lo], table[hi]):
            assert all(getattr(b, f) <= getattr(a, f) for f in A.PRUNABLE[a.kind])
    for blocks in table.values():
        assert all(b.width % 4 == 0 or b.width == 40 for b in blocks if b.kind == "mlp")
    if method == "uniform":
        widths = {b.width for b in table[0.3] if b.kind == "mlp"}
        assert widths == {A.round_kept(40, 0.7, 4)}


def test_allocate_rejects_bad_arguments():
    cfg, params, _, calib = sorted_model("llama")
    with pytest.raises(ValueError, match="rates"):
        A.allocate(cfg, params, calib, [0.9], method="uniform")
    with pytest.raises(ValueError, match="method"):
        A.allocate(cfg, params, calib, [0.1], method="entropy")


def test_evaluate_rates_reports_each_sliced_model():
    cfg, _, params, calib = sorted_model("llama")
    table = A.allocate(cfg, params, calib, [0.0, 0.35], method="uniform")
    stream = tokens(1, 160, seed=5)[0]
    rows = A.evaluate_rates(cfg, params, table, stream, seq_len=32)
    assert [r["rate"] for r in rows] == [0.0, 0.35]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["param_bytes"] < rows[0]["param_bytes"]
    assert all(np.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
