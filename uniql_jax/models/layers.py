"""Small shared pieces: weight products that accept packed weights, RMSNorm, RoPE tables.

Packed weights are read through the formats' interface (`uniql_jax.quant.formats.packed`); the RoPE
rotation is the kernels' pure reference (`pallas_kernels.rope.reference`), so the XLA path and
the kernel's reference are one function. Both are re-exported here (`weight`, `rope_angles`,
`apply_rope`).
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

from uniql_jax.quant.formats.packed import dense_einsum, is_packed

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


def wdot(spec: str, x: jax.Array, w, impl: str = "xla") -> jax.Array:
    """einsum(spec, x, w) where `w` may be a dense array or a packed quantized weight.

    impl="xla" dequantizes and lets XLA fuse; impl="pallas" hands packed weights to
    the kernels of `pallas_kernels` (interpret mode off-GPU).
    """
    if _RECORDERS:
        _RECORDERS[-1].append((spec, x, w))
    if impl == "pallas" and is_packed(w):
        from pallas_kernels import dispatch  # deferred: kernels are optional at import time

        return dispatch.packed_einsum(spec, x, w)
    return dense_einsum(spec, x, w)


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


def dense_init(rngs, shape, fan_in: int, dtype):
    """Normal init with std 0.02 (HF's `initializer_range` default); fan_in kept for clarity."""
    del fan_in
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
