"""Packed group-wise uniform quantized weights (W{2,3,4,8}A16), symmetric or with a zero point.

``QArray`` stores a weight of logical shape ``shape`` quantized along one axis
(``axis``, the contraction / input axis of the matmul it feeds):

* ``codes``  uint8, ``shape`` with ``shape[axis]`` replaced by ``shape[axis] * bits // 8``.
  Every run of 8 consecutive codes along ``axis`` is the ``8*bits``-bit
  little-endian integer ``sum_j code[j] << (bits * j)`` stored as ``bits`` bytes.
  For 4 bits that is "two codes per byte, the even index in the low nibble".
  Codes are unsigned, in ``[0, 2**bits)``, in both variants.
* ``scales`` float16, ``shape`` with ``shape[axis]`` replaced by ``shape[axis] // group_size``.
* symmetric (``QArray``, ``offset is None``): ``w = scale * (code - 2**(bits-1))``.
* asymmetric (``ZeroPointQArray``, a ``QArray`` with one more array field): ``offset``
  float16, the shape of ``scales``, one per group, and ``w = scale * code + offset``.
  The zero point is stored as the value of code 0 (``offset = -scale * zero``), not as an
  integer: the min/max grid of a group is then exactly ``(scale, offset) = ((max - min) /
  (2**bits - 1), min)``, which is GGUF Q4_1's ``(d, m)``, so a Q4_1 weight is reproduced
  bit for bit (an integer zero would round ``-m / d``).

The arithmetic of both is float32, cast to the requested dtype at the end (``dequantize``).
The asymmetric variant is a subclass with its own exact type rather than an optional
field, so that every packed type has a fixed set of arrays (a checkpoint stores each
array field of a packed type; ``None`` is not an array).

Invariant: ``group_size % 8 == 0`` and ``shape[axis] % group_size == 0``, so a
leading slice of whole groups along ``axis`` is again a valid ``QArray`` made of
exactly the same bytes (``slice_leading``): pruning never re-quantizes. Every per-group
array (``scales``, and ``offset`` when present) is sliced, gathered and reshaped alike
(``rebuild``): an operation that forgets the offset would silently change every weight.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from uniql_jax.quant.formats.base import PackedWeight

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = jnp.float16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray(PackedWeight):
    """Symmetric group-wise uniform weight: ``w = scale * (code - 2**(bits-1))`` (module docstring)."""

    offset = None  # not a field: symmetric. `ZeroPointQArray` stores one per group.

    codes: jax.Array  # uint8, packed along `axis` (see module docstring)
    scales: jax.Array  # float16, one per group of `group_size` along `axis`
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))  # non-negative
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # logical shape

    @property
    def dtype(self):
        return self.scales.dtype

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ZeroPointQArray(QArray):
    """Asymmetric group-wise uniform weight: ``w = scale * code + offset`` (module docstring)."""

    offset: jax.Array = None  # float16, the shape of `scales`: the value of code 0 in each group (required)


def rebuild(q: QArray, codes: jax.Array, per_group, *, axis: int, shape: tuple[int, ...]) -> QArray:
    """A QArray of ``q``'s kind (symmetric or zero point) from new packed ``codes`` and every
    per-group array of ``q`` (scales, offset) mapped by ``per_group``: the one place that
    knows which arrays are per group, so slicing, gathering and reshaping never drop one."""
    if q.offset is None:
        return QArray(codes, per_group(q.scales), q.bits, q.group_size, axis, tuple(shape))
    return ZeroPointQArray(codes, per_group(q.scales), q.bits, q.group_size, axis, tuple(shape),
                           per_group(q.offset))


def check_layout(bits: int, group_size: int, n: int):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size % 8 or n % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of 8 dividing the quantized axis ({n})")


def pack_codes(codes: jax.Array, bits: int, axis: int) -> jax.Array:
    """Integer codes in [0, 2**bits) -> packed uint8 bytes along `axis`."""
    codes = jnp.moveaxis(codes.astype(jnp.uint32), axis, -1)
    if bits == 8:
        return jnp.moveaxis(codes.astype(jnp.uint8), -1, axis)
    runs = codes.reshape(*codes.shape[:-1], -1, 8)  # [..., n/8, 8]
    word = jnp.sum(runs << (bits * jnp.arange(8, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)
    packed = (word[..., None] >> (8 * jnp.arange(bits, dtype=jnp.uint32))) & 0xFF  # [..., n/8, bits]
    packed = packed.reshape(*codes.shape[:-1], -1).astype(jnp.uint8)
    return jnp.moveaxis(packed, -1, axis)


def unpack_codes(packed: jax.Array, bits: int, axis: int) -> jax.Array:
    """Inverse of `pack_codes`: uint8 bytes -> int32 codes."""
    packed = jnp.moveaxis(packed, axis, -1).astype(jnp.uint32)
    if bits == 8:
        return jnp.moveaxis(packed.astype(jnp.int32), -1, axis)
    runs = packed.reshape(*packed.shape[:-1], -1, bits)  # [..., n/8, bits]
    word = jnp.sum(runs << (8 * jnp.arange(bits, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)
    codes = (word[..., None] >> (bits * jnp.arange(8, dtype=jnp.uint32))) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], -1).astype(jnp.int32)
    return jnp.moveaxis(codes, -1, axis)


def from_codes(codes: jax.Array, scales: jax.Array, *, bits: int, group_size: int, axis: int,
               offset: jax.Array | None = None) -> QArray:
    """Build a QArray from unpacked integer codes (logical shape) and group scales; with
    group ``offset`` (the shape of ``scales``) the asymmetric ``ZeroPointQArray``."""
    axis = axis % codes.ndim
    check_layout(bits, group_size, codes.shape[axis])
    return from_packed(pack_codes(codes, bits, axis), scales, bits=bits, group_size=group_size, axis=axis,
                       shape=tuple(codes.shape), offset=offset)


def from_packed(packed: jax.Array, scales: jax.Array, *, bits: int, group_size: int, axis: int,
                shape: tuple[int, ...], offset: jax.Array | None = None) -> QArray:
    """``from_codes`` for codes already packed along `axis` (``pack_codes``) of logical `shape`."""
    check_layout(bits, group_size, shape[axis])
    scales = scales.astype(SCALE_DTYPE)
    if offset is None:
        return QArray(packed, scales, bits, group_size, axis, shape)
    if offset.shape != scales.shape:
        raise ValueError(f"offset shape {offset.shape} != scales shape {scales.shape}")
    return ZeroPointQArray(packed, scales, bits, group_size, axis, shape, offset.astype(SCALE_DTYPE))


def codes_of(q: QArray) -> jax.Array:
    """The unpacked integer codes, logical shape."""
    return unpack_codes(q.codes, q.bits, q.axis)


def expand_groups(values: jax.Array, group_size: int, axis: int) -> jax.Array:
    """Repeat per-group values `group_size` times along `axis` (scales -> per-weight)."""
    return jnp.repeat(values, group_size, axis=axis)


def grid_values(codes: jax.Array, scale: jax.Array, offset: jax.Array | None, bits: int) -> jax.Array:
    """The weights of integer ``codes`` under per-weight float32 ``scale`` (and ``offset``), float32:
    ``scale * (code - 2**(bits-1))`` symmetric, ``scale * code + offset`` asymmetric. The one
    formula of the format: ``dequantize`` and the quantizers' error feedback (GPTQ) use it."""
    if offset is None:
        return (codes.astype(jnp.float32) - (1 << (bits - 1))) * scale
    return codes.astype(jnp.float32) * scale + offset


def dequantize(q: QArray, dtype: Any = jnp.float32) -> jax.Array:
    """``grid_values`` of every code (float32 arithmetic), cast to `dtype`."""
    scale = expand_groups(q.scales.astype(jnp.float32), q.group_size, q.axis)
    offset = None if q.offset is None else expand_groups(q.offset.astype(jnp.float32), q.group_size, q.axis)
    return grid_values(codes_of(q), scale, offset, q.bits).astype(dtype)


def slice_leading(q: QArray, axis: int, n: int) -> QArray:
    """Keep the first `n` entries of `axis` by slicing bytes only (never re-quantizes)."""
    axis = axis % q.ndim
    if n == q.shape[axis]:
        return q
    shape = q.shape[:axis] + (n,) + q.shape[axis + 1 :]
    if axis != q.axis:
        return rebuild(q, jax.lax.slice_in_dim(q.codes, 0, n, axis=axis),
                       lambda g: jax.lax.slice_in_dim(g, 0, n, axis=axis), axis=q.axis, shape=shape)
    if n % q.group_size:
        raise ValueError(
            f"cannot keep {n} of {q.shape[axis]} entries of the quantized axis: not a multiple of group size {q.group_size}"
        )
    return rebuild(q, jax.lax.slice_in_dim(q.codes, 0, n * q.bits // 8, axis=axis),
                   lambda g: jax.lax.slice_in_dim(g, 0, n // q.group_size, axis=axis), axis=q.axis, shape=shape)


@functools.partial(jax.jit, static_argnames=("dtype",))
def lookup_rows(table: QArray, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Dequantized rows ``E[ids]`` of a row-quantized table ``QArray [V, D] (axis=1)``.

    Gathers the packed bytes and the per-group arrays (scales, offsets) of the requested rows
    only (``ids`` any integer shape ``[...]`` -> ``[..., D]``), equal to ``dequantize(table)[ids]``.
    """
    if table.ndim != 2 or table.axis != 1:
        raise ValueError(f"lookup_rows needs a [V, D] table quantized along axis 1, got {table!r}")
    take = lambda a: jnp.take(a, ids.reshape(-1), axis=0)  # noqa: E731
    rows = rebuild(table, take(table.codes), take, axis=1, shape=(ids.size, table.shape[1]))
    return dequantize(rows, dtype).reshape(*ids.shape, table.shape[1])


def is_qarray(x) -> bool:
    return isinstance(x, QArray)
