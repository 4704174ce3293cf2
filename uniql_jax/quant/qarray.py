"""Packed group-wise uniform quantized weights (W{2,3,4,8}A16).

``QArray`` stores a weight of logical shape ``shape`` quantized along one axis
(``axis``, the contraction / input axis of the matmul it feeds):

* ``codes``  uint8, ``shape`` with ``shape[axis]`` replaced by ``shape[axis] * bits // 8``.
  Every run of 8 consecutive codes along ``axis`` is the ``8*bits``-bit
  little-endian integer ``sum_j code[j] << (bits * j)`` stored as ``bits`` bytes.
  For 4 bits that is "two codes per byte, the even index in the low nibble".
* ``scales`` float16, ``shape`` with ``shape[axis]`` replaced by ``shape[axis] // group_size``.
* symmetric: ``w = scale * (code - 2**(bits-1))``, codes in ``[0, 2**bits)``.

Invariant: ``group_size % 8 == 0`` and ``shape[axis] % group_size == 0``, so a
leading slice of whole groups along ``axis`` is again a valid ``QArray`` made of
exactly the same bytes (``slice_leading``): pruning never re-quantizes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = jnp.float16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    codes: jax.Array  # uint8, packed along `axis` (see module docstring)
    scales: jax.Array  # float16, one per group of `group_size` along `axis`
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))  # non-negative
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # logical shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.codes.size * self.codes.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)

    @property
    def dtype(self):
        return self.scales.dtype

    def __repr__(self):
        return f"QArray(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, axis={self.axis})"


def _check(bits: int, group_size: int, n: int):
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


def from_codes(codes: jax.Array, scales: jax.Array, *, bits: int, group_size: int, axis: int) -> QArray:
    """Build a QArray from unpacked integer codes (logical shape) and group scales."""
    axis = axis % codes.ndim
    _check(bits, group_size, codes.shape[axis])
    return QArray(pack_codes(codes, bits, axis), scales.astype(SCALE_DTYPE), bits, group_size, axis, tuple(codes.shape))


def codes_of(q: QArray) -> jax.Array:
    """The unpacked integer codes, logical shape."""
    return unpack_codes(q.codes, q.bits, q.axis)


def expand_groups(values: jax.Array, group_size: int, axis: int) -> jax.Array:
    """Repeat per-group values `group_size` times along `axis` (scales -> per-weight)."""
    return jnp.repeat(values, group_size, axis=axis)


def dequantize(q: QArray, dtype: Any = jnp.float32) -> jax.Array:
    """w = scale * (code - 2**(bits-1)), in `dtype` (float32 arithmetic)."""
    centered = codes_of(q).astype(jnp.float32) - (1 << (q.bits - 1))
    scale = expand_groups(q.scales.astype(jnp.float32), q.group_size, q.axis)
    return (centered * scale).astype(dtype)


def quantize_rtn(w: jax.Array, *, bits: int = 4, group_size: int = 128, axis: int = 0) -> QArray:
    """Round-to-nearest symmetric group quantization (the baseline quantizer).

    scale = max|w| / (2**(bits-1) - 1) per group; codes = clip(round(w/scale) + 2**(bits-1)).
    """
    axis = axis % w.ndim
    _check(bits, group_size, w.shape[axis])
    scales = group_absmax_scale(w, bits, group_size, axis)
    codes = codes_for_scales(w, scales, bits, group_size, axis)
    return from_codes(codes, scales, bits=bits, group_size=group_size, axis=axis)


def group_absmax_scale(w: jax.Array, bits: int, group_size: int, axis: int) -> jax.Array:
    """Symmetric per-group scale, rounded to the storage dtype (float16)."""
    wf = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    grouped = wf.reshape(*wf.shape[:-1], -1, group_size)
    amax = jnp.max(jnp.abs(grouped), axis=-1)
    scale = jnp.where(amax > 0, amax / ((1 << (bits - 1)) - 1), 1.0)
    return jnp.moveaxis(scale, -1, axis).astype(SCALE_DTYPE)


def codes_for_scales(w: jax.Array, scales: jax.Array, bits: int, group_size: int, axis: int) -> jax.Array:
    """Nearest code for each weight under the given (storage-dtype) group scales."""
    s = expand_groups(scales.astype(jnp.float32), group_size, axis)
    q = jnp.round(w.astype(jnp.float32) / s) + (1 << (bits - 1))
    return jnp.clip(q, 0, (1 << bits) - 1).astype(jnp.int32)


def slice_leading(q: QArray, axis: int, n: int) -> QArray:
    """Keep the first `n` entries of `axis` by slicing bytes only (never re-quantizes)."""
    axis = axis % q.ndim
    if n == q.shape[axis]:
        return q
    shape = q.shape[:axis] + (n,) + q.shape[axis + 1 :]
    if axis != q.axis:
        return QArray(
            jax.lax.slice_in_dim(q.codes, 0, n, axis=axis),
            jax.lax.slice_in_dim(q.scales, 0, n, axis=axis),
            q.bits, q.group_size, q.axis, shape,
        )
    if n % q.group_size:
        raise ValueError(
            f"cannot keep {n} of {q.shape[axis]} entries of the quantized axis: not a multiple of group size {q.group_size}"
        )
    return QArray(
        jax.lax.slice_in_dim(q.codes, 0, n * q.bits // 8, axis=axis),
        jax.lax.slice_in_dim(q.scales, 0, n // q.group_size, axis=axis),
        q.bits, q.group_size, q.axis, shape,
    )


@functools.partial(jax.jit, static_argnames=("dtype",))
def lookup_rows(table: QArray, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Dequantized rows ``E[ids]`` of a row-quantized table ``QArray [V, D] (axis=1)``.

    Gathers the packed bytes and scales of the requested rows only (``ids`` any
    integer shape ``[...]`` -> ``[..., D]``), equal to ``dequantize(table)[ids]``.
    """
    if table.ndim != 2 or table.axis != 1:
        raise ValueError(f"lookup_rows needs a [V, D] table quantized along axis 1, got {table!r}")
    rows = QArray(
        jnp.take(table.codes, ids.reshape(-1), axis=0),
        jnp.take(table.scales, ids.reshape(-1), axis=0),
        table.bits, table.group_size, 1, (ids.size, table.shape[1]),
    )
    return dequantize(rows, dtype).reshape(*ids.shape, table.shape[1])


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def logical_shape(w) -> tuple[int, ...]:
    return tuple(w.shape)


def nbytes(tree) -> int:
    """Bytes of all arrays in a params tree, packed quantized weights counted as stored."""
    leaves = jax.tree.leaves(tree, is_leaf=is_qarray)
    total = 0
    for leaf in leaves:
        if is_qarray(leaf):
            total += leaf.nbytes
        else:
            total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def deployed_bytes(tree, float_bytes: int = 2) -> int:
    """Bytes of a params tree as deployed: packed weights as stored, float arrays at
    `float_bytes` per element (16-bit by default, whatever the in-memory dtype), integer
    arrays (RoPE pair indices) as they are."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: is_qarray(x) or hasattr(x, "dequantize")):
        if is_qarray(leaf) or hasattr(leaf, "dequantize"):
            total += sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(leaf))
        elif jnp.issubdtype(leaf.dtype, jnp.floating):
            total += int(np.prod(leaf.shape)) * float_bytes
        else:
            total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total
