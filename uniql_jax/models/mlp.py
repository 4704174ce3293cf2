"""MLP blocks: gated SiLU (Llama, Qwen, Bamba) and ungated ReLU² (Nemotron-H).

  gate [D, F], up [D, F], down [F, D]; F is the prunable width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uniql_jax.config import MLPBlock, ModelConfig
from uniql_jax.models.attention import keep_mask
from uniql_jax.models.layers import dense_init, rms_norm, wdot


def activation(cfg: ModelConfig, h, gate_w, up_w, impl):
    """The input of down_proj, [B, T, F] (what MLP sorting collects)."""
    up = wdot("btd,df->btf", h, up_w, impl)
    if cfg.mlp_activation == "silu_gated":
        return jax.nn.silu(wdot("btd,df->btf", h, gate_w, impl)) * up
    return jnp.square(jax.nn.relu(up))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, blk: MLPBlock, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.blk = cfg, blk
        D, F = cfg.hidden_size, blk.width
        self.norm = nnx.Param(jnp.ones((D,), dtype))
        if cfg.mlp_activation == "silu_gated":
            self.gate = nnx.Param(dense_init(rngs, (D, F), D, dtype))
        self.up = nnx.Param(dense_init(rngs, (D, F), D, dtype))
        self.down = nnx.Param(dense_init(rngs, (F, D), F, dtype))

    def __call__(self, x, positions=None, cache=None, mask=None, impl="xla"):
        h = rms_norm(x, self.norm.get_value(), self.cfg.rms_norm_eps)
        gate = self.gate.get_value() if self.cfg.mlp_activation == "silu_gated" else None
        a = activation(self.cfg, h, gate, self.up.get_value(), impl)
        if mask is not None:
            a = a * keep_mask(self.blk.width, mask["width"], a.dtype)
        return wdot("btf,fd->btd", a, self.down.get_value(), impl), cache
