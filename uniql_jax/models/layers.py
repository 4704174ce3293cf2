"""Small shared pieces: weight products that accept packed weights, RMSNorm, RoPE tables."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

from uniql_jax.quant import qarray

IMPLS = ("xla", "pallas")

# While a recorder list is installed (`record_weight_inputs`), every weight product
# appends (spec, x, w): how calibration sees the input of each linear without each
# block type exposing its internals.
_RECORDERS: list[list] = []


@contextlib.contextmanager
def record_weight_inputs():
    """Collect (spec, x, w) of every `wdot` call made inside the block (trace time)."""
    calls: list = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.pop()


def weight(w, dtype):
    """A dense view of a weight: dequantized if packed, cast to the compute dtype."""
    if qarray.is_qarray(w):
        return qarray.dequantize(w, dtype)
    if hasattr(w, "dequantize"):  # other packed formats (BCQ) expose the same method
        return w.dequantize(dtype)
    return w.astype(dtype)


def wdot(spec: str, x: jax.Array, w, impl: str = "xla") -> jax.Array:
    """einsum(spec, x, w) where `w` may be a dense array or a packed quantized weight.

    impl="xla" dequantizes and lets XLA fuse; impl="pallas" hands packed weights to
    the kernels of `pallas_kernels` (interpret mode off-GPU).
    """
    if _RECORDERS:
        _RECORDERS[-1].append((spec, x, w))
    if impl == "pallas" and (qarray.is_qarray(w) or hasattr(w, "dequantize")):
        from pallas_kernels import dispatch  # deferred: kernels are optional at import time

        return dispatch.packed_einsum(spec, x, w)
    return jnp.einsum(spec, x, weight(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (as transformers does), scaled by `w`, cast back."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * xf).astype(x.dtype)


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> jax.Array:
    """Inverse frequencies [rotary_dim // 2] (float32), with the llama3 rule when configured.

    Llama-3.1 scaling (transformers `_compute_llama3_parameters`): long wavelengths are
    divided by `factor`, short ones kept, the band between interpolated smoothly.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    if not scaling:
        return inv
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wl, high_wl = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return jnp.where(medium, smoothed, scaled)


def rope_angles(positions: jax.Array, inv_freq: jax.Array, pair_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin for each token and kept pair, gathered through the stored pair indices.

    positions [B, T] int; inv_freq [P0] (full rank); pair_index [K, P] -> cos, sin [B, T, K, P].
    After sorting, pair p of kv head k carries the original frequency inv_freq[pair_index[k, p]].
    """
    freq = inv_freq[pair_index]  # [K, P]
    ang = positions.astype(jnp.float32)[:, :, None, None] * freq[None, None]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, K, ..., 2, P] with cos/sin [B, T, K, P] (float32 math)."""
    extra = x.ndim - 5  # query heads per kv head sit between K and the pair axes
    c = cos.reshape(cos.shape[:3] + (1,) * extra + cos.shape[3:])
    s = sin.reshape(c.shape)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., 0, :], xf[..., 1, :]
    out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2)
    return out.astype(x.dtype)


def dense_init(rngs, shape, fan_in: int, dtype):
    """Normal init with std 0.02 (HF's `initializer_range` default); fan_in kept for clarity."""
    del fan_in
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
