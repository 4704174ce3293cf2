"""Masked forward == sliced forward (pair-consistent q/k masks, Mamba2 gated norm over kept channels),
all five architectures, several rates; one compiled masked forward serves every rate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compress_models import ARCH_NAMES, sorted_model, tokens

import uniql_jax as uq
from uniql_jax.compress import masks as M
from uniql_jax.compress.allocate import allocate
from uniql_jax.eval import window_nll
from uniql_jax.models.stacks import bind

RATES = [0.15, 0.35]


def odd_blocks(cfg):
    """Uneven kept sizes (1 pair, odd widths, 1 state channel...) that no rounding step produces."""
    out = []
    for i, b in enumerate(cfg.blocks):
        if b.kind == "attention":
            out.append(dataclasses.replace(b, qk_pairs=min(b.qk_pairs, 1), qk_pass=max(0, b.qk_pass - 3), vo_rank=3))
        elif b.kind == "mlp":
            out.append(dataclasses.replace(b, width=b.width - 7 - i))
        else:
            out.append(dataclasses.replace(b, d_state=1 + i, head_dim=5 - i % 2))
    return tuple(out)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_masked_forward_equals_sliced_forward(arch):
    cfg, _, params, calib = sorted_model(arch)
    table = allocate(cfg, params, calib, RATES, method="uniform")
    table[0.5] = odd_blocks(cfg)  # uneven sizes, stored under an unused rate
    toks = jnp.asarray(tokens(2, 20, seed=11))
    full = uq.forward(cfg, params, toks)
    for rate, blocks in table.items():
        sliced = uq.forward(cfg.with_blocks(blocks), uq.prune(cfg, params, rate, table)[1], toks)
        masked = uq.forward(cfg, params, toks, masks=M.masks_for(cfg, blocks))
        assert rel(masked, sliced) <= 1e-5, rate
        assert rel(sliced, full) > 1e-3, rate  # the rate really prunes something


def test_q_k_masks_keep_the_same_pairs_of_both_halves():
    """Masking pairs beyond the kept count zeroes channel p of *both* halves (rotate-half partner),
    which is what slicing the leading pairs does; masking the tail of the head (the reference
    code's rule) would differ."""
    cfg, _, params, _ = sorted_model("llama")
    blk = cfg.blocks[0]
    kept = dataclasses.replace(blk, qk_pairs=2)
    module = bind(cfg, params).blocks[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(5), (1, 5))
    cur = module.project(x, pos, M.block_mask(kept), "xla")
    q = np.asarray(cur["q"])  # [B, T, K, G, 2, P]
    assert np.all(q[..., :, 2:] == 0) and np.all(np.abs(q[..., :, :2]).sum(axis=(0, 1, 2, 3)) > 0)


def test_mask_table_selects_rates_under_jit():
    cfg, _, params, calib = sorted_model("llama")
    table = allocate(cfg, params, calib, RATES, method="uniform")
    rates, stacked = M.mask_table(cfg, table)
    assert np.allclose(np.asarray(rates), RATES)
    toks = jnp.asarray(tokens(2, 16, seed=3))

    @jax.jit
    def nll_at(index):
        return window_nll(cfg, params, toks, masks=M.select(stacked, index))

    for i, r in enumerate(RATES):
        direct = window_nll(cfg, params, toks, masks=M.masks_for_rate(cfg, r, table))
        assert np.allclose(nll_at(jnp.int32(i)), direct, rtol=1e-6)


def test_masks_for_rejects_mismatched_sizes():
    cfg, _, _, _ = sorted_model("llama")
    with pytest.raises(ValueError, match="block sizes"):
        M.masks_for(cfg, cfg.blocks[:-1])
    too_big = list(cfg.blocks)
    too_big[1] = dataclasses.replace(too_big[1], width=too_big[1].width + 1)
    with pytest.raises(ValueError, match="width"):
        M.masks_for(cfg, too_big)
