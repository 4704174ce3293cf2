"""Round-to-nearest (RTN) quantization: the baseline of stage 4 and the embedding quantizer.

RTN quantizes every weight on its own: per group of ``group_size`` weights along
the input axis, ``s = max|w| / (2**(b-1) - 1)`` (stored float16) and
``code = clip(round(w / s) + 2**(b-1), 0, 2**b - 1)``; with ``zero_point=True`` the
asymmetric min/max grid ``s = (max - min) / (2**b - 1)``, ``offset = min`` (both float16)
and ``code = clip(round((w - offset) / s), 0, 2**b - 1)`` (``ZeroPointQArray``; GGUF
Q4_1's grid at 4 bits, groups of 32). The grid arithmetic
(``group_absmax_scale``, ``codes_for_scales``, ``quantize_rtn`` along any axis) is here, one
source of truth shared with GPTQ's per-row rounding; the format it fills is
``formats.qarray.QArray``. The two uses the pipeline has:

* ``rtn_quantize``            a linear ``W [Din, Dout]`` (``y = x @ W``), grouped along Din (axis 0);
* ``rtn_quantize_embedding``  an embedding table ``E [V, D]``, grouped along D (axis 1),
  so that a token's row is dequantized from its own bytes and scales (UniQL quantizes
  embeddings "per row" with RTN; a gather never touches another row; the gather itself,
  ``formats.qarray.lookup_rows``, is part of the format).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from uniql_jax.quant.formats import qarray
from uniql_jax.quant.formats.qarray import QArray


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "zero_point"))
def rtn_quantize(w_DinxDout: jax.Array, *, bits: int = 4, group_size: int = 128, zero_point: bool = False) -> QArray:
    """RTN baseline for a linear ``W [Din, Dout]``: groups along Din -> ``QArray(axis=0)``."""
    if w_DinxDout.ndim != 2:
        raise ValueError(f"rtn_quantize expects a 2-D [Din, Dout] weight, got shape {w_DinxDout.shape}")
    return quantize_rtn(w_DinxDout, bits=bits, group_size=group_size, axis=0, zero_point=zero_point)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "zero_point"))
def rtn_quantize_embedding(table_VxD: jax.Array, *, bits: int = 4, group_size: int | None = None,
                           zero_point: bool = False) -> QArray:
    """Per-row RTN of an embedding table ``E [V, D]`` along D -> ``QArray(axis=1)``.

    ``group_size=None`` gives one scale per row (group = the whole row, D), the
    reference's "per-row" embedding quantizer; pass e.g. 128 for finer groups
    (``D % group_size == 0``). A tied ``lm_head [D, V]`` quantized along D has the
    same groups, transposed.
    """
    if table_VxD.ndim != 2:
        raise ValueError(f"rtn_quantize_embedding expects a 2-D [V, D] table, got shape {table_VxD.shape}")
    d_model = table_VxD.shape[1]
    return quantize_rtn(table_VxD, bits=bits, group_size=group_size or d_model, axis=1, zero_point=zero_point)


def quantize_rtn(w: jax.Array, *, bits: int = 4, group_size: int = 128, axis: int = 0,
                 zero_point: bool = False) -> QArray:
    """Round-to-nearest group quantization (the baseline quantizer).

    Symmetric: scale = max|w| / (2**(bits-1) - 1) per group; codes = clip(round(w/scale) + 2**(bits-1)).
    ``zero_point``: scale = (max - min) / (2**bits - 1), offset = min per group;
    codes = clip(round((w - offset) / scale)) -> ``ZeroPointQArray``.
    """
    axis = axis % w.ndim
    qarray.check_layout(bits, group_size, w.shape[axis])
    scales, offset = group_grid(w, bits, group_size, axis, zero_point)
    codes = codes_for_scales(w, scales, bits, group_size, axis, offset)
    return qarray.from_codes(codes, scales, bits=bits, group_size=group_size, axis=axis, offset=offset)


def group_grid(w: jax.Array, bits: int, group_size: int, axis: int, zero_point: bool):
    """(scales, offset) of each group in storage dtype: the symmetric absmax grid (offset None)
    or, with ``zero_point``, the asymmetric min/max grid."""
    if zero_point:
        return group_minmax_grid(w, bits, group_size, axis)
    return group_absmax_scale(w, bits, group_size, axis), None


def group_minmax_grid(w: jax.Array, bits: int, group_size: int, axis: int):
    """Asymmetric per-group grid: (scale = (max - min) / (2**bits - 1), offset = min), float16.

    A constant group gets scale 1 (every code 0, the weight is its offset); a scale below
    float16's smallest step is raised to it so that no code divides by zero.
    """
    wf = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    grouped = wf.reshape(*wf.shape[:-1], -1, group_size)
    lo, hi = jnp.min(grouped, axis=-1), jnp.max(grouped, axis=-1)
    scale = jnp.where(hi > lo, (hi - lo) / ((1 << bits) - 1), 1.0)
    scale = jnp.maximum(scale.astype(qarray.SCALE_DTYPE), jnp.finfo(qarray.SCALE_DTYPE).smallest_subnormal)
    return jnp.moveaxis(scale, -1, axis), jnp.moveaxis(lo, -1, axis).astype(qarray.SCALE_DTYPE)


def group_absmax_scale(w: jax.Array, bits: int, group_size: int, axis: int) -> jax.Array:
    """Symmetric per-group scale, rounded to the storage dtype (float16)."""
    wf = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    grouped = wf.reshape(*wf.shape[:-1], -1, group_size)
    amax = jnp.max(jnp.abs(grouped), axis=-1)
    scale = jnp.where(amax > 0, amax / ((1 << (bits - 1)) - 1), 1.0)
    return jnp.moveaxis(scale, -1, axis).astype(qarray.SCALE_DTYPE)


def codes_for_scales(w: jax.Array, scales: jax.Array, bits: int, group_size: int, axis: int,
                     offset: jax.Array | None = None) -> jax.Array:
    """Nearest code for each weight under the given (storage-dtype) group scales (and offsets:
    the asymmetric grid ``scale * code + offset``)."""
    s = qarray.expand_groups(scales.astype(jnp.float32), group_size, axis)
    if offset is None:
        q = jnp.round(w.astype(jnp.float32) / s) + (1 << (bits - 1))
    else:
        o = qarray.expand_groups(offset.astype(jnp.float32), group_size, axis)
        q = jnp.round((w.astype(jnp.float32) - o) / s)
    return jnp.clip(q, 0, (1 << bits) - 1).astype(jnp.int32)
