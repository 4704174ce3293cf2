"""Whole SSM / hybrid models (Mamba2, Nemotron-H, Bamba): cached decoding equals the full
forward, greedy generation equals argmax of the full forward, masked equals pruned."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from uniql_jax.compress.masks import masks_for
from uniql_jax.compress.prune import abstract_params, slice_to_config
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig

from test_mamba2_mixer import max_rel_err, random_value  # same folder: on sys.path under pytest

SSM = dict(ssm_heads=4, ssm_head_dim=8, ssm_state=8)
CONFIGS = {
    "mamba2": ModelConfig(arch="mamba2", vocab_size=64, hidden_size=16, ssm_groups=2, ssm_chunk_size=5, **SSM,
                          blocks=(Mamba2Block(0, 8, 8), Mamba2Block(1, 8, 8))),
    "nemotron_h": ModelConfig(  # every block kind first and last somewhere: M * - M
        arch="nemotron_h", vocab_size=64, hidden_size=16, ssm_groups=1, ssm_chunk_size=4, **SSM,
        time_step_limit=(0.001, math.inf), num_heads=4, num_kv_heads=2, head_dim=4, rotary_dim=0,
        intermediate_size=24, mlp_activation="relu2",
        blocks=(Mamba2Block(0, 8, 8), AttentionBlock(1, 0, 4, 4), MLPBlock(2, 24), Mamba2Block(3, 8, 8))),
    "bamba": ModelConfig(  # attention (partial rotary) + MLP, then Mamba2 + MLP
        arch="bamba", vocab_size=64, hidden_size=16, ssm_groups=4, ssm_chunk_size=3, **SSM,
        time_step_limit=(0.0, 0.5), num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4, intermediate_size=24,
        blocks=(AttentionBlock(0, 2, 4, 8), MLPBlock(0, 24), Mamba2Block(1, 8, 8), MLPBlock(1, 24))),
}


def random_params(cfg, seed=0):
    """Random params of the model's own shapes, drawn in numpy (no RNG kernels to compile);
    integer leaves (RoPE pair indices) the identity."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.asarray(np.broadcast_to(np.arange(s.shape[-1]), s.shape), s.dtype)
        return jnp.asarray(random_value(path[-1].key, s.shape, rng), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_cached_decoding_equals_full_forward(arch):
    cfg = CONFIGS[arch]
    params = random_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    full = uq.forward(cfg, params, tokens)
    cache = uq.init_cache(cfg, 2, 16)
    # a prefill of 5 (chunked scan), a second chunk of 3 continuing from the cached state, then single tokens
    out, cache = uq.decode_step(cfg, params, tokens[:, :5], cache)
    outs = [out]
    out, cache = uq.decode_step(cfg, params, tokens[:, 5:8], cache)
    outs.append(out)
    for t in range(8, 12):
        out, cache = uq.decode_step(cfg, params, tokens[:, t:t + 1], cache)
        outs.append(out)
    assert int(cache["index"]) == 12
    assert max_rel_err(jnp.concatenate(outs, axis=1), full) <= 1e-5


def test_greedy_generation_equals_argmax_of_full_forward():
    cfg = CONFIGS["nemotron_h"]
    params = random_params(cfg, seed=3)
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    out = uq.generate(cfg, params, prompt, 4)
    assert out.shape == (2, 9) and np.array_equal(np.asarray(out[:, :5]), np.asarray(prompt))
    # causal: the full forward of the generated sequence sees at each position what generation saw
    greedy = jnp.argmax(uq.forward(cfg, params, out)[:, 4:8], axis=-1)
    np.testing.assert_array_equal(np.asarray(out[:, 5:]), np.asarray(greedy))


def smaller_blocks(cfg):
    """Prune every block: d_state 8->3, Mamba head_dim 8->5, attention and MLP sizes too."""
    out = []
    for b in cfg.blocks:
        if b.kind == "mamba2":
            out.append(Mamba2Block(b.layer, 3, 5))
        elif b.kind == "attention":
            out.append(AttentionBlock(b.layer, max(b.qk_pairs - 1, 0), b.qk_pass - 1, b.vo_rank - 2))
        else:
            out.append(MLPBlock(b.layer, b.width - 7))
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_masked_forward_equals_pruned_forward(arch):
    cfg = CONFIGS[arch]
    params = random_params(cfg, seed=2)
    small = cfg.with_blocks(smaller_blocks(cfg))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 10)), jnp.int32)
    pruned = uq.forward(small, slice_to_config(small, params), tokens)
    masked = uq.forward(cfg, params, tokens, masks=masks_for(cfg, small.blocks))
    np.testing.assert_allclose(np.asarray(masked), np.asarray(pruned), rtol=1e-5,
                               atol=1e-6 * float(jnp.max(jnp.abs(pruned))))
    unpruned = uq.forward(cfg, params, tokens, masks=masks_for(cfg, cfg.blocks))  # same trace as `masked`
    assert max_rel_err(unpruned, pruned) > 1e-3  # pruning did change the model
