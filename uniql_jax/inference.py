"""Pure inference entry points: full forward, cached decoding, generation.

All take ``(cfg, params, ...)``: the config is static (hashable), the params a
pytree of dense or packed arrays. Every function is jitted once per config, shape
and `impl`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from uniql_jax.config import ModelConfig
from uniql_jax.models.cache import init_cache
from uniql_jax.models.stacks import bind


def _check_tokens(tokens):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32 [batch, time], got shape {tokens.shape}")


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl",))
def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, *, impl: str = "xla", masks=None) -> jax.Array:
    """Logits float32 [B, T, V] of int32 tokens [B, T] (positions 0..T-1).

    `masks` (one dict per block of kept sizes, or None) zeroes channels beyond the
    kept sizes: the masked forward used by fine-tuning, equal to the sliced model.
    """
    _check_tokens(tokens)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, _ = bind(cfg, params)(tokens, positions, None, masks, impl)
    return logits


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl",))
def decode_step(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: dict, *, impl: str = "xla"):
    """Append tokens [B, t] to the cache; returns (logits float32 [B, t, V], cache)."""
    _check_tokens(tokens)
    B, t = tokens.shape
    positions = cache["index"] + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    logits, blocks = bind(cfg, params)(tokens, positions, cache["blocks"], None, impl)
    return logits, {"index": cache["index"] + t, "blocks": blocks}


def _pick(logits, key, temperature):
    """Greedy when temperature == 0, else a sample from softmax(logits / temperature)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 6))
def _generate(cfg, params, prompt, max_new_tokens, temperature, seed, impl):
    B, T0 = prompt.shape
    dtype = params["final_norm"].dtype
    cache = init_cache(cfg, B, T0 + max_new_tokens, dtype)
    logits, cache = decode_step(cfg, params, prompt, cache, impl=impl)
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)
    first = _pick(logits[:, -1], sub, temperature)

    def step(carry, _):
        token, cache, key = carry
        logits, cache = decode_step(cfg, params, token[:, None], cache, impl=impl)
        key, sub = jax.random.split(key)
        nxt = _pick(logits[:, -1], sub, temperature)
        return (nxt, cache, key), token

    (last, _, _), tokens = jax.lax.scan(step, (first, cache, key), None, length=max_new_tokens - 1)
    new = jnp.concatenate([tokens.T, last[:, None]], axis=1) if max_new_tokens > 1 else first[:, None]
    return jnp.concatenate([prompt, new], axis=1)


def generate(cfg: ModelConfig, params: dict, prompt, max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, impl: str = "xla") -> jax.Array:
    """prompt int32 [B, T0] -> [B, T0 + max_new_tokens]: the prompt and its continuation.

    The whole loop is one compiled program (prefill, then a `lax.scan` of cached
    single-token steps); greedy at temperature 0, sampled under `seed` otherwise.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    _check_tokens(prompt)
    if max_new_tokens < 1:
        return prompt
    return _generate(cfg, params, prompt, int(max_new_tokens), float(temperature), seed, impl)
