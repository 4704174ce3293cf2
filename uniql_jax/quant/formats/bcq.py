"""Packed binary-coding quantized weights (BCQ): the format (fitting lives in ``quant/bcq_fit.py``).

(docs/method.md, "UniQuan: formats"): a k-bit BCQ weight is ``w = sum_i alpha_i * b_i + o``
with ``b_i in {-1, +1}``, ``k`` scales ``alpha_i`` and one offset ``o`` per group
(``group_size`` contiguous weights along the matmul input axis ``axis``).

``BCQArray`` layout for a weight of logical shape ``shape = pre + (n,) + post``
(``n = shape[axis]``, ``G = n // group_size``):

* ``planes``  uint8   ``pre + (n // 8, k) + post``. Plane ``i`` (``i = 0`` the most
  significant) holds bit ``bit_i`` of every weight, 8 consecutive weights along
  ``axis`` per byte, weight ``8 * byte + j`` in bit ``j`` (LSB first, the 1-bit case
  of ``qarray.pack_codes``). ``b_i = 2 * bit_i - 1``.
* ``alpha``   float16 ``pre + (G, k) + post``: the ``k`` scales of each group.
* ``offset``  float16 ``pre + (G,) + post``: the offset of each group.
* ``w = sum_i alpha[g, i] * b_i + offset[g]``, accumulated in float32.

The integer ``p = sum_i bit_i << (k - 1 - i)`` is a weight's *sign pattern*; its
level is ``sum_i alpha_i (2 bit_i - 1)``. With power-of-two scales
``alpha_i = s * 2**(k - 2 - i)`` the pattern is exactly the uniform code ``q`` and the
level is ``s * (q - (2**k - 1) / 2)``: the UQ <-> BCQ bridge (``from_uniform``).

Invariant: ``group_size % 8 == 0`` and ``n % group_size == 0``, so a leading slice of
whole groups along ``axis`` is again a valid ``BCQArray`` made of exactly the same
bytes (``slice_leading``): pruning never re-quantizes; any leading slice of another
axis is free. The first ``k' < k`` planes with their scales (or scales refit by
``bcq_fit.refit_alpha``) are a valid ``k'``-bit ``BCQArray`` (``drop_planes``): nested
precision from one set of planes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from uniql_jax.quant.formats import qarray
from uniql_jax.quant.formats.base import PackedWeight

SCALE_DTYPE = qarray.SCALE_DTYPE
MAX_BITS = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BCQArray(PackedWeight):
    planes: jax.Array  # uint8 pre + (n//8, k) + post, see module docstring
    alpha: jax.Array  # float16 pre + (G, k) + post
    offset: jax.Array  # float16 pre + (G,) + post
    bits: int = dataclasses.field(metadata=dict(static=True))  # k, number of bit-planes
    group_size: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))  # non-negative, the matmul input axis
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # logical shape

    @property
    def dtype(self):
        return self.alpha.dtype

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def is_bcq(x) -> bool:
    return isinstance(x, BCQArray)


def check_layout(bits: int, group_size: int, n: int):
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    if group_size % 8 or n % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of 8 dividing the quantized axis ({n})")


# ---------------------------------------------------------------------------
# Sign patterns
# ---------------------------------------------------------------------------


def signs_to_patterns(signs: jax.Array) -> jax.Array:
    """float signs [..., k] (+-1) -> int32 sign patterns [...]."""
    bits = signs.shape[-1]
    weights = (1 << (bits - 1 - jnp.arange(bits, dtype=jnp.int32)))
    return jnp.sum((signs > 0).astype(jnp.int32) * weights, axis=-1)


# ---------------------------------------------------------------------------
# Pack / unpack
# ---------------------------------------------------------------------------


def pack_planes(patterns: jax.Array, bits: int, axis: int) -> jax.Array:
    """Sign patterns (logical shape) -> uint8 planes ``pre + (n/8, k) + post``, MSB plane first."""
    bits_kx = (patterns[..., None] >> (bits - 1 - jnp.arange(bits, dtype=jnp.int32))) & 1  # shape + (k,)
    return qarray.pack_codes(jnp.moveaxis(bits_kx, -1, axis + 1), 1, axis)  # 8 weights per byte along axis


def signs_of(b: BCQArray) -> jax.Array:
    """float32 signs b_i = +-1, shape pre + (n, k) + post."""
    bits01 = qarray.unpack_codes(b.planes, 1, b.axis)
    return 2.0 * bits01.astype(jnp.float32) - 1.0


@jax.jit
def patterns_of(b: BCQArray) -> jax.Array:
    """int32 sign patterns, logical shape."""
    return signs_to_patterns(jnp.moveaxis(signs_of(b), b.axis + 1, -1))


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(b: BCQArray, dtype: Any = jnp.float32) -> jax.Array:
    """w = sum_i alpha_i b_i + o (docs/method.md, "UniQuan: formats"), float32 arithmetic, cast to `dtype`."""
    signs = signs_of(b)  # pre + (n, k) + post
    alpha = qarray.expand_groups(b.alpha.astype(jnp.float32), b.group_size, b.axis)  # pre + (n, k) + post
    offset = qarray.expand_groups(b.offset.astype(jnp.float32), b.group_size, b.axis)  # logical shape
    return (jnp.sum(alpha * signs, axis=b.axis + 1) + offset).astype(dtype)


# ---------------------------------------------------------------------------
# Slicing: rates (leading boxes) and precisions (leading planes)
# ---------------------------------------------------------------------------


def slice_leading(b: BCQArray, axis: int, n: int) -> BCQArray:
    """Keep the first `n` entries of logical `axis` by slicing bytes only (never re-quantizes).

    Along the quantized axis `n` must be a multiple of ``group_size`` (whole groups,
    whole bytes); any other axis can be cut anywhere.
    """
    axis = axis % b.ndim
    if n == b.shape[axis]:
        return b
    shape = b.shape[:axis] + (n,) + b.shape[axis + 1 :]
    if axis != b.axis:
        array_axis = axis if axis < b.axis else axis + 1  # planes / alpha carry the k axis after b.axis
        return BCQArray(
            jax.lax.slice_in_dim(b.planes, 0, n, axis=array_axis),
            jax.lax.slice_in_dim(b.alpha, 0, n, axis=array_axis),
            jax.lax.slice_in_dim(b.offset, 0, n, axis=axis),
            b.bits, b.group_size, b.axis, shape,
        )
    if n % b.group_size:
        raise ValueError(
            f"cannot keep {n} of {b.shape[axis]} entries of the quantized axis: not a multiple of group size {b.group_size}"
        )
    groups = n // b.group_size
    return BCQArray(
        jax.lax.slice_in_dim(b.planes, 0, n // 8, axis=axis),
        jax.lax.slice_in_dim(b.alpha, 0, groups, axis=axis),
        jax.lax.slice_in_dim(b.offset, 0, groups, axis=axis),
        b.bits, b.group_size, b.axis, shape,
    )


def drop_planes(b: BCQArray, k_new: int, alpha_new=None, offset_new=None) -> BCQArray:
    """The nested ``k_new``-bit model: the first ``k_new`` planes (bytes untouched).

    Without ``alpha_new`` the first ``k_new`` stored scales are kept (AnyBCQ-style
    truncation); pass the per-precision scales (and offset) of ``refit_alpha`` for
    the least-squares refit (``bcq_fit.refit_alpha``).
    """
    if not 1 <= k_new <= b.bits:
        raise ValueError(f"k_new must be in [1, {b.bits}], got {k_new}")
    kept_alpha = jax.lax.slice_in_dim(b.alpha, 0, k_new, axis=b.axis + 1)
    alpha = kept_alpha if alpha_new is None else alpha_new
    offset = b.offset if offset_new is None else offset_new
    if alpha.shape != kept_alpha.shape or offset.shape != b.offset.shape:
        raise ValueError(f"alpha_new {alpha.shape} / offset_new {offset.shape} do not match the {k_new}-plane layout")
    return BCQArray(
        jax.lax.slice_in_dim(b.planes, 0, k_new, axis=b.axis + 1),
        alpha.astype(SCALE_DTYPE),
        offset.astype(SCALE_DTYPE),
        k_new, b.group_size, b.axis, b.shape,
    )


# ---------------------------------------------------------------------------
# UQ <-> BCQ identity
# ---------------------------------------------------------------------------


def uniform_as_bcq(scale, zero, bits: int):
    """UQ(s, z) == BCQ with alpha_i = s 2^(k-2-i), o = s((2^k-1)/2 - z) (the bridge of docs/method.md,
    "UniQuan: formats").

    ``scale``, ``zero`` [...] -> (alpha [..., k], offset [...]) in float32; the sign
    pattern of a weight is its UQ code.
    """
    scale = jnp.asarray(scale, jnp.float32)
    powers = 2.0 ** (bits - 2 - jnp.arange(bits, dtype=jnp.float32))  # [k]
    alpha = scale[..., None] * powers
    offset = scale * ((2**bits - 1) / 2 - jnp.asarray(zero, jnp.float32))
    return alpha, offset


def from_uniform(q: qarray.QArray) -> BCQArray:
    """A uniform ``QArray`` as the ``BCQArray`` with the same dequantized values.

    The planes of weight ``w`` are the binary digits of its code, MSB first, and
    ``alpha_i = s 2^(k-2-i)``, so ``sum_i alpha_i b_i = s (code - (2^k - 1) / 2)``; the BCQ
    offset restores the grid's origin:

    * symmetric (zero point ``2**(k-1)``): ``o = -s/2``: bit for bit;
    * with a zero point (``w = s * code + offset``): ``o = offset + s (2^k - 1) / 2``, rounded
      to float16 storage (half a float16 step of ``|o|`` at most; the scales stay exact).

    Every scale ``s * 2**j`` (and the symmetric offset) is exact in float16 unless it
    leaves float16's normal range; in that case (checked when the scales are concrete)
    this raises instead of rounding.
    """
    b, exact = _from_uniform(q)
    if not isinstance(exact, jax.core.Tracer) and not bool(exact):
        raise ValueError("some scale * 2**j is not representable in float16 (subnormal or overflow)")
    return b


@jax.jit
def _from_uniform(q: qarray.QArray):
    bits, axis = q.bits, q.axis
    codes = qarray.codes_of(q)  # logical shape, pattern == code
    alpha32, offset32 = uniform_as_bcq(q.scales, 2 ** (bits - 1), bits)  # scales pre+(G,)+post -> +(k,)
    alpha32 = jnp.moveaxis(alpha32, -1, axis + 1)  # pre + (G, k) + post
    alpha16 = alpha32.astype(SCALE_DTYPE)
    exact = jnp.all(alpha16.astype(jnp.float32) == alpha32)
    if q.offset is None:
        offset16 = offset32.astype(SCALE_DTYPE)
        exact &= jnp.all(offset16.astype(jnp.float32) == offset32)
    else:  # zero point 2^(k-1) gave s (2^(k-1) - 1/2) - s 2^(k-1); the stored grid starts at `offset` instead
        offset16 = (offset32 + q.scales.astype(jnp.float32) * (1 << (bits - 1))
                    + q.offset.astype(jnp.float32)).astype(SCALE_DTYPE)
    planes = pack_planes(codes, bits, axis)
    return BCQArray(planes, alpha16, offset16, bits, q.group_size, axis, q.shape), exact
