"""What the models, the pruner and the kernels need of a packed weight, whichever its format.

The formats are `qarray.QArray` (uniform codes + group scales; `qarray.ZeroPointQArray` adds
group offsets) and `bcq.BCQArray` (binary-coded
planes + alpha + offset). This module is their one interface at the bottom of the layers
(formats <- models <- algorithms): the models (`layers.wdot`), the pruner (`compress.prune`)
and the kernel dispatcher (`pallas_kernels.dispatch`) read packed weights only through it,
so none of them branches on a format, and this package imports nothing above it.

* `is_packed`            the one test for "a packed quantized weight" (`PACKED_TYPES`);
* `dense`, `dense_einsum` the dequantized view (every format has ``.dequantize(dtype)``);
* `slice_leading`        the leading box of one axis, bytes sliced, never re-quantized;
* `slice_box`, `slice_to_shapes`  the leading box of every axis, of one weight or of a tree
                         (dense or packed alike: what pruning to a rate does to the params);
* `flatten_contraction`  the 2-D [contraction, rest] packed view the kernels take;
* `nbytes`, `deployed_bytes`, `bits_per_weight`  storage accounting of a params tree.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.quant.formats import bcq, qarray

# Every packed weight type (exact types: checkpoints name them). Each has the static fields
# `bits`, `group_size`, `axis`, `shape` and the methods / properties `dequantize`, `nbytes`.
PACKED_TYPES = (qarray.QArray, qarray.ZeroPointQArray, bcq.BCQArray)
_SLICERS = {qarray.QArray: qarray.slice_leading, qarray.ZeroPointQArray: qarray.slice_leading,
            bcq.BCQArray: bcq.slice_leading}


def is_packed(w) -> bool:
    """True for a packed quantized weight of any format."""
    return type(w) in _SLICERS


def dense(w, dtype: Any):
    """A dense view of a weight: dequantized if packed, cast to the compute dtype."""
    return w.dequantize(dtype) if is_packed(w) else w.astype(dtype)


def dense_einsum(spec: str, x: jax.Array, w) -> jax.Array:
    """einsum(spec, x, w) over the dense view of `w`: float32 accumulation, result in x.dtype
    (XLA fuses the dequantization into the product)."""
    return jnp.einsum(spec, x, dense(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def slice_leading(w, axis: int, n: int):
    """The first `n` entries of logical `axis` of a packed weight, in its own format (bytes
    sliced, never re-quantized; along the quantized axis `n` must be whole groups)."""
    try:
        slicer = _SLICERS[type(w)]
    except KeyError:
        raise TypeError(f"not a packed weight: {type(w).__name__}") from None
    return slicer(w, axis, n)


def slice_box(leaf, shape: tuple[int, ...]):
    """The leading box of `leaf` (dense or packed) with the given (smaller or equal) shape."""
    if tuple(leaf.shape) == tuple(shape):
        return leaf
    if len(leaf.shape) != len(shape) or any(n > m for n, m in zip(shape, leaf.shape)):
        raise ValueError(f"cannot slice an array of shape {tuple(leaf.shape)} to {tuple(shape)}")
    if not is_packed(leaf):
        return leaf[tuple(slice(0, n) for n in shape)]
    for axis, n in enumerate(shape):
        try:
            leaf = slice_leading(leaf, axis, n)
        except ValueError as e:
            if axis != leaf.axis:
                raise
            raise ValueError(
                f"{e}; this weight was quantized in groups the pruned size does not divide: pass the same "
                f"allocation table to quantize (uq.quantize(..., table=table)) so that every stored rate "
                f"keeps whole groups") from e
    return leaf


def slice_to_shapes(target, params):
    """`params` sliced to the leading boxes of `target` (a tree of objects with ``.shape``). The walk
    follows the target, so arrays a smaller config drops entirely (e.g. q/k when no rotary pair
    is kept) are simply not visited."""
    if isinstance(target, dict):
        return {k: slice_to_shapes(t, params[k]) for k, t in target.items()}
    if isinstance(target, (list, tuple)):
        return type(target)(slice_to_shapes(t, p) for t, p in zip(target, params))
    return slice_box(params, target.shape)


def flatten_contraction(w, n_contract: int):
    """A packed weight with `n_contract` leading contraction axes (the last one quantized) as
    the 2-D packed weight [prod(contraction), prod(rest)], quantized along axis 0. Views only:
    every group lies inside one run of the quantized axis, so groups stay contiguous."""
    kin = math.prod(w.shape[:n_contract])
    n = math.prod(w.shape[n_contract:])
    lead = lambda a: math.prod(a.shape[:n_contract])  # noqa: E731
    if qarray.is_qarray(w):  # scales (and offsets) pre+(G,)+post
        return qarray.rebuild(w, w.codes.reshape(lead(w.codes), n), lambda g: g.reshape(lead(g), n), axis=0,
                              shape=(kin, n))
    if bcq.is_bcq(w):  # planes pre+(n/8, k)+post, alpha pre+(G, k)+post, offset pre+(G,)+post
        return bcq.BCQArray(w.planes.reshape(lead(w.planes), w.bits, n), w.alpha.reshape(lead(w.alpha), w.bits, n),
                            w.offset.reshape(lead(w.offset), n), w.bits, w.group_size, 0, (kin, n))
    raise TypeError(f"not a packed weight: {type(w).__name__}")


# ---------------------------------------------------------------------------
# Storage accounting
# ---------------------------------------------------------------------------


def _stored_bytes(w) -> int:
    """Bytes of every array of a packed weight, as stored."""
    return int(sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(w)))


def nbytes(tree) -> int:
    """Bytes of all arrays in a params tree, packed quantized weights counted as stored."""
    return sum(_stored_bytes(leaf) if is_packed(leaf) else int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree, is_leaf=is_packed))


def deployed_bytes(tree, float_bytes: int = 2) -> int:
    """Bytes of a params tree as deployed: packed weights as stored, float arrays at
    `float_bytes` per element (16-bit by default, whatever the in-memory dtype), integer
    arrays (RoPE pair indices) as they are."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_packed):
        if is_packed(leaf):
            total += _stored_bytes(leaf)
        elif jnp.issubdtype(leaf.dtype, jnp.floating):
            total += int(np.prod(leaf.shape)) * float_bytes
        else:
            total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def bits_per_weight(tree) -> float:
    """Stored bits per logical weight of a params tree, measured from its arrays.

    Packed weights count their stored bytes (codes / planes plus scales / offsets) over
    their logical element count; plain arrays their itemsize.
    BCQ: k + 16(k+1)/g; symmetric uniform QArray: k + 16/g; with a zero point: k + 32/g.
    """
    total_bytes, total_weights = 0, 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_packed):
        total_bytes += _stored_bytes(leaf) if is_packed(leaf) else int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        total_weights += math.prod(leaf.shape)
    return 8.0 * total_bytes / max(total_weights, 1)
