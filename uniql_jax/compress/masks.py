"""Masks for the masked forward: the full sorted model behaving as a pruned one.

`masks_for(cfg_full, blocks_small)` gives one dict of kept counts per block (the `masks`
argument of `uq.forward` / `eval.window_nll`); the modules zero every channel beyond
the kept prefix, pair-consistently for q/k (the same leading pairs of both halves,
defect 1 of the reference code) and with the Mamba2 gated norm taken over the kept
channels only (defect 2), so the masked forward equals the sliced forward of
`prune.prune` exactly. Counts are int32 arrays, so one compiled forward serves every
rate; `mask_table` stacks them over a rate grid for fine-tuning, where a traced rate
index picks a row (`select`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uniql_jax.compress.prune import lookup_rate
from uniql_jax.config import ModelConfig

MASK_FIELDS = {"attention": ("qk_pairs", "qk_pass", "vo_rank"), "mlp": ("width",), "mamba2": ("d_state", "head_dim")}


def block_mask(blk) -> dict:
    """Kept counts of one (smaller) block config, as int32 scalars."""
    return {name: jnp.asarray(getattr(blk, name), jnp.int32) for name in MASK_FIELDS[blk.kind]}


def masks_for(cfg_full: ModelConfig, blocks_small) -> list[dict]:
    """Per-block mask dicts making the full model `cfg_full` compute the model with `blocks_small`."""
    blocks_small = tuple(blocks_small)
    if len(blocks_small) != len(cfg_full.blocks):
        raise ValueError(f"{len(blocks_small)} block sizes for a model of {len(cfg_full.blocks)} blocks")
    masks = []
    for full, small in zip(cfg_full.blocks, blocks_small):
        if full.kind != small.kind:
            raise ValueError(f"block kinds differ: {full.kind} vs {small.kind}")
        for name in MASK_FIELDS[full.kind]:
            if not 0 <= getattr(small, name) <= getattr(full, name):
                raise ValueError(f"{full.kind} block of layer {full.layer}: {name}={getattr(small, name)} "
                                 f"outside [0, {getattr(full, name)}]")
        masks.append(block_mask(small))
    return masks


def masks_for_rate(cfg_full: ModelConfig, rate: float, table: dict) -> list[dict]:
    """Masks of one rate of an allocation table."""
    return masks_for(cfg_full, lookup_rate(table, rate))


def mask_table(cfg_full: ModelConfig, table: dict) -> tuple[jax.Array, list[dict]]:
    """(rates [n] ascending, masks whose counts are int32 [n] arrays): row i is rate i."""
    rates = sorted(table, key=float)
    per_rate = [masks_for_rate(cfg_full, r, table) for r in rates]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_rate)
    return jnp.asarray([float(r) for r in rates], jnp.float32), stacked


def select(stacked_masks: list[dict], index) -> list[dict]:
    """Row `index` (may be traced) of `mask_table`'s masks."""
    return jax.tree.map(lambda a: a[index], stacked_masks)
