"""Decode caches: one entry per block (KV for attention, conv + SSM state for Mamba2).

``{"index": int32 [], "blocks": [per-block dict, ...]}``; ``index`` is the number of
tokens already written. Sizes follow the (possibly pruned) config, so a pruned model
has a proportionally smaller cache.
"""

from __future__ import annotations

import jax.numpy as jnp

from uniql_jax.config import ModelConfig
from uniql_jax.models.attention import init_attention_cache
from uniql_jax.models.mamba2 import init_mamba2_cache

CACHE_INITS = {
    "attention": init_attention_cache,
    "mlp": lambda cfg, blk, batch, max_len, dtype: {},
    "mamba2": init_mamba2_cache,
}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    blocks = [CACHE_INITS[b.kind](cfg, b, batch, max_len, dtype) for b in cfg.blocks]
    return {"index": jnp.zeros((), jnp.int32), "blocks": blocks}
