"""The causal language model: embedding, a flat list of residual blocks, final norm, head.

Every architecture (Llama, Qwen-2.5, Mamba2, Nemotron-H, Bamba) is this one stack;
they differ only in which block kinds the config lists. Blocks have different
sizes per layer after pruning, so they are a plain list, not a scanned stack.

Parameters as a pytree (``params``): ``{"embed": [V, D], "blocks": [ {..}, ..],
"final_norm": [D], "lm_head": [D, V]}`` (no lm_head when embeddings are tied).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from uniql_jax.config import BlockConfig, ModelConfig
from uniql_jax.models.attention import Attention
from uniql_jax.models.mamba2 import Mamba2
from uniql_jax.models.layers import dense_init, rms_norm, wdot
from uniql_jax.quant.formats.packed import dense as weight
from uniql_jax.models.mlp import MLP
from uniql_jax.quant.formats import qarray

BLOCK_MODULES = {"attention": Attention, "mlp": MLP, "mamba2": Mamba2}


def embed_lookup(table, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding table [V, D] for tokens [B, T] -> [B, T, D].

    A per-row quantized table (QArray along D) is gathered in packed form first,
    so only the looked-up rows are dequantized.
    """
    if qarray.is_qarray(table):
        return qarray.lookup_rows(table, tokens, dtype)
    return table[tokens].astype(dtype)


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = nnx.Param(dense_init(rngs, (V, D), D, dtype))
        self.blocks = nnx.List([BLOCK_MODULES[b.kind](cfg, b, rngs=rngs, dtype=dtype) for b in cfg.blocks])
        self.final_norm = nnx.Param(jnp.ones((D,), dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(dense_init(rngs, (D, V), D, dtype))

    def hidden(self, tokens, positions, cache=None, masks=None, impl="xla"):
        """Final normalized hidden states [B, T, D] and the updated per-block caches."""
        dtype = self.final_norm.get_value().dtype  # the compute dtype: norms are never quantized
        x = embed_lookup(self.embed.get_value(), tokens, dtype)
        new_cache = []
        for i, block in enumerate(self.blocks):
            c = None if cache is None else cache[i]
            m = None if masks is None else masks[i]
            update, c = block(x, positions, c, m, impl)
            x = x + update
            new_cache.append(c)
        x = rms_norm(x, self.final_norm.get_value(), self.cfg.rms_norm_eps)
        return x, (None if cache is None else new_cache)

    def logits(self, h, impl="xla"):
        """Float32 logits [B, T, V] of final hidden states h [B, T, D]."""
        head = None if self.cfg.tie_word_embeddings else self.lm_head.get_value()
        return head_logits(self.cfg, self.embed.get_value(), head, h, impl)

    def __call__(self, tokens, positions, cache=None, masks=None, impl="xla"):
        h, cache = self.hidden(tokens, positions, cache, masks, impl)
        return self.logits(h, impl), cache


def head_logits(cfg: ModelConfig, embed, lm_head, h_BxTxD, impl="xla"):
    """Float32 logits [B, T, V] of final hidden states: the tied embedding [V, D] or lm_head [D, V]."""
    head = weight(embed, h_BxTxD.dtype).T if cfg.tie_word_embeddings else lm_head
    return wdot("btd,dv->btv", h_BxTxD, head, impl).astype(jnp.float32)


@functools.lru_cache(maxsize=512)
def _abstract_block(geometry: ModelConfig, blk: BlockConfig):
    """(graphdef, params as ShapeDtypeStructs) of a block module, nothing materialized."""
    module = nnx.eval_shape(lambda: BLOCK_MODULES[blk.kind](geometry, blk, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(module)
    return graph, nnx.to_pure_dict(state)


def _block_graphdef(geometry: ModelConfig, blk: BlockConfig):
    return _abstract_block(geometry, blk)[0]


def block_shapes(cfg: ModelConfig, blk: BlockConfig) -> dict:
    """The shapes (``ShapeDtypeStruct`` leaves) of one entry of params["blocks"] for a block of
    sizes `blk`: what a larger (unpruned) block's params are sliced to."""
    return _abstract_block(*block_key(cfg, blk))[1]


def block_key(cfg: ModelConfig, blk: BlockConfig) -> tuple[ModelConfig, BlockConfig]:
    """What a block module depends on: the model's geometry (no per-layer sizes) and its own sizes
    (not its layer index). Blocks with equal keys, in any layer, rate or model, share one program."""
    return cfg.with_blocks(()), dataclasses.replace(blk, layer=0)


def bind_block(cfg: ModelConfig, blk: BlockConfig, block_params: dict):
    """A block module whose weights are `block_params` (one entry of params["blocks"])."""
    return nnx.merge(_block_graphdef(*block_key(cfg, blk)), block_params)


@functools.lru_cache(maxsize=64)
def graphdef(cfg: ModelConfig):
    """The NNX graph of a config (abstract: no parameters are materialized)."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)[0]


def to_nnx_state(params: dict) -> dict:
    """Our params (blocks as a list) -> the pure-dict state NNX merges (blocks keyed by int)."""
    return {**params, "blocks": dict(enumerate(params["blocks"]))}


def from_nnx_state(state: dict) -> dict:
    state = dict(state)
    blocks = state["blocks"]
    state["blocks"] = [blocks[i] for i in sorted(blocks)]
    return state


def bind(cfg: ModelConfig, params: dict) -> CausalLM:
    """A CausalLM whose weights are `params` (works under jit, for any param dtype or packing)."""
    return nnx.merge(graphdef(cfg), to_nnx_state(params))


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random parameters (std 0.02, unit norms) for a config."""
    model = CausalLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    return from_nnx_state(nnx.to_pure_dict(nnx.state(model)))
