"""Stage 1 sorting on all five architectures: same function, importance order, dead channels last,
baselines, and pruned models (KV / SSM caches included) running through the ordinary decode path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compress_models import ARCH_NAMES, max_rel_err, random_params, sorted_model, tiny_config, tokens

import uniql_jax as uq
from uniql_jax.compress import attention, calibration, lowrank, mlp, ssm
from uniql_jax.compress.allocate import allocate
from uniql_jax.compress.sort import SORTERS, baseline_order, sort


@pytest.mark.parametrize("arch", ARCH_NAMES + (pytest.param("llama_mha", marks=pytest.mark.slow),))
def test_sorted_model_computes_the_same_function(arch):
    cfg, params, params_sorted, _ = sorted_model(arch)
    toks = jnp.asarray(tokens(2, 20, seed=7))  # not the calibration windows
    assert max_rel_err(uq.forward(cfg, params_sorted, toks), uq.forward(cfg, params, toks)) <= 1e-4
    assert any(not np.array_equal(np.asarray(params["blocks"][i][name]), np.asarray(params_sorted["blocks"][i][name]))
               for i, b in enumerate(cfg.blocks) for name in {"mlp": ["down"], "attention": ["v"],
                                                              "mamba2": ["out", "B"]}[b.kind])


def scores_of_sorted_model(cfg, params_sorted, calib):
    """UniQL scores recomputed on the sorted model, in its stored order (one list per dimension)."""
    found = []

    def on_block(i, blk, stats):
        p = params_sorted["blocks"][i]
        if blk.kind == "mlp":
            found.append(("width", mlp.leverage_scores(stats["C_act"], stats["tokens"])))
        elif blk.kind == "attention":
            pair, pas = attention.qk_uniql_scores(stats)
            if pair is not None:
                found.append(("pairs", pair.sum(axis=1)))
            if pas is not None:
                found.append(("pass", pas))
            C_sqrt, _ = lowrank.psd_sqrt_pair(np.asarray(stats["C_x"], np.float64) / stats["tokens"])
            sigma = np.linalg.norm(np.einsum("de,ekr->dkr", C_sqrt, np.asarray(p["v"], np.float64)), axis=0)
            found.append(("vo_sigma", sigma))  # [K, R]: σ of the whitened v, as W_o is orthonormal
        else:
            found.append(("d_state", ssm.state_scores_uniql(cfg, stats)))
            found.append(("head_dim", ssm.head_dim_scores_uniql(stats)))

    collectors = {kind: s.collect for kind, s in SORTERS.items()}
    calibration.run_blocks(cfg, params_sorted, calib, collectors, on_block, batch_size=4, progress=False)
    return found


@pytest.mark.parametrize("arch", ["bamba", "nemotron_h", "qwen2"])  # every block kind, every q/k variant
def test_sorted_dimensions_are_in_decreasing_importance(arch):
    """Sorting is a fixed point: scores measured on the sorted model decrease along every prunable axis."""
    cfg, _, params_sorted, calib = sorted_model(arch)
    found = scores_of_sorted_model(cfg, params_sorted, calib)
    assert {name for name, _ in found} >= {"width", "vo_sigma"}
    for name, scores in found:
        scores = np.atleast_2d(scores)
        assert np.all(np.diff(scores, axis=-1) <= 1e-5 * np.abs(scores).max()), name


def test_dead_channels_sort_last():
    """A channel that never carries signal gets score 0 and lands at the end of its axis, and
    RoPE pairs move with their frequency index."""
    cfg = tiny_config("bamba")  # Mamba2, partial-rotary attention, gated MLPs
    params = random_params(cfg, seed=3)
    blocks = [dict(b) for b in params["blocks"]]
    m, mlp0, att = blocks[0], blocks[1], blocks[2]
    dead_width, dead_pair, dead_state, dead_chan = 7, 0, 2, 1
    mlp0["up"] = mlp0["up"].at[:, dead_width].set(0.0)  # the activation of channel 7 is 0
    att["q"] = att["q"].at[:, 1, :, :, dead_pair].set(0.0)  # kv head 1: pair 0 dead in every query head
    att["k"] = att["k"].at[:, 1, :, dead_pair].set(0.0)
    m["B"] = m["B"].at[:, 1, dead_state].set(0.0)  # group 1: B state channel 2 is silu(0) = 0
    m["conv_B_bias"] = m["conv_B_bias"].at[1, dead_state].set(0.0)
    m["x"] = m["x"].at[:, 3, dead_chan].set(0.0)  # head 3: channel 1 never enters the state
    m["conv_x_bias"] = m["conv_x_bias"].at[3, dead_chan].set(0.0)
    params = {**params, "blocks": blocks}
    _, out = sort(cfg, params, tokens(6, 24, seed=1), progress=False, batch_size=4)
    sm, smlp, satt = out["blocks"][0], out["blocks"][1], out["blocks"][2]
    assert np.all(np.asarray(smlp["up"][:, -1]) == 0) and np.all(np.asarray(smlp["down"][-1]) == np.asarray(mlp0["down"][dead_width]))
    assert int(satt["pair_index"][1, -1]) == dead_pair and np.all(np.asarray(satt["k"][:, 1, :, -1]) == 0)
    assert np.array_equal(np.asarray(sm["conv_B"][:, 1, -1]), np.asarray(m["conv_B"][:, 1, dead_state]))
    assert np.array_equal(np.asarray(sm["out"][3, -1]), np.asarray(m["out"][3, dead_chan]))


@pytest.mark.parametrize("kind", ["random", "magnitude"])
@pytest.mark.parametrize("arch", ["qwen2", "bamba", "nemotron_h"])
def test_baseline_orders_compute_the_same_function(arch, kind):
    cfg, params, _, _ = sorted_model(arch)
    _, reordered = baseline_order(cfg, params, kind, seed=1)
    toks = jnp.asarray(tokens(2, 20, seed=7))
    assert max_rel_err(uq.forward(cfg, reordered, toks), uq.forward(cfg, params, toks)) <= 1e-4
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(params["blocks"][-1].values(), reordered["blocks"][-1].values()))


def test_magnitude_order_ranks_by_weight_norms():
    cfg = tiny_config("llama")
    p = dict(random_params(cfg)["blocks"][1])
    p["down"] = p["down"].at[4].multiply(100.0)
    assert mlp.magnitude_order(p)[0] == 4


@pytest.mark.parametrize("arch", ["llama", "bamba"])
def test_pruned_model_decodes_with_its_smaller_caches(arch):
    """uq.prune gives a model the ordinary forward and cached decoding run (KV cache and SSM
    state at the pruned sizes), and prefill + token-by-token decoding equals the full forward."""
    cfg, params, params_sorted, calib = sorted_model(arch)
    table = allocate(cfg, params_sorted, calib, [0.35], method="uniform")
    cfg_p, params_p = uq.prune(cfg, params_sorted, 0.35, table)
    assert cfg_p.blocks != cfg.blocks
    toks = jnp.asarray(tokens(2, 12, seed=9))
    full = uq.forward(cfg_p, params_p, toks)
    cache = uq.init_cache(cfg_p, 2, 12)
    for blk, c in zip(cfg_p.blocks, cache["blocks"]):
        if blk.kind == "attention":
            assert c["v"].shape[-1] == blk.vo_rank
        if blk.kind == "mamba2":
            assert c["ssm"].shape[-2:] == (blk.head_dim, blk.d_state)
    logits, cache = uq.decode_step(cfg_p, params_p, toks[:, :8], cache)
    steps = [logits]
    for t in range(8, 12):
        logits, cache = uq.decode_step(cfg_p, params_p, toks[:, t:t + 1], cache)
        steps.append(logits)
    assert max_rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-4


def test_sort_refuses_a_pruned_config():
    cfg, params, params_sorted, calib = sorted_model("llama")
    table = allocate(cfg, params_sorted, calib, [0.25], method="uniform")
    cfg_p, params_p = uq.prune(cfg, params_sorted, 0.25, table)
    with pytest.raises(ValueError, match="full-rank"):
        sort(cfg_p, params_p, calib, progress=False)


def test_consuming_sort_frees_each_block_and_gives_the_same_model():
    """sort(consume=True) (what compress does) drops every original block from the input once it is
    sorted, and returns the model sort without it returns, array for array."""
    cfg = tiny_config("nemotron_h")
    params = random_params(cfg, 0)
    calib = tokens(8, 16, seed=1)
    _, want = sort(cfg, params, calib, progress=False)
    handed = {**params, "blocks": list(params["blocks"])}
    _, got = sort(cfg, handed, calib, progress=False, consume=True)
    assert handed["blocks"] == [None] * len(cfg.blocks)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
