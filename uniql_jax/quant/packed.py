"""What the models and the kernels need of a packed weight, whichever its format.

The two formats are `qarray.QArray` (uniform codes + scales) and `bcq.BCQArray` (binary-coded
planes + alpha + offset). This module is their shared interface at the bottom of the layers
(formats <- models <- algorithms): the models (`layers.wdot`) and the kernel dispatcher
(`pallas_kernels.dispatch`) both read packed weights through it, so neither imports the other.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from uniql_jax.quant import bcq, qarray


def is_packed(w) -> bool:
    """True for a packed quantized weight of either format."""
    return qarray.is_qarray(w) or bcq.is_bcq(w)


def dense(w, dtype: Any):
    """A dense view of a weight: dequantized if packed, cast to the compute dtype."""
    if qarray.is_qarray(w):
        return qarray.dequantize(w, dtype)
    if hasattr(w, "dequantize"):  # other packed formats (BCQ) expose the same method
        return w.dequantize(dtype)
    return w.astype(dtype)


def dense_einsum(spec: str, x: jax.Array, w) -> jax.Array:
    """einsum(spec, x, w) over the dense view of `w`: float32 accumulation, result in x.dtype
    (XLA fuses the dequantization into the product)."""
    return jnp.einsum(spec, x, dense(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def flatten_contraction(w, n_contract: int):
    """A packed weight with `n_contract` leading contraction axes (the last one quantized) as
    the 2-D packed weight [prod(contraction), prod(rest)], quantized along axis 0. Views only:
    every group lies inside one run of the quantized axis, so groups stay contiguous."""
    kin = math.prod(w.shape[:n_contract])
    n = math.prod(w.shape[n_contract:])
    lead = lambda a: math.prod(a.shape[:n_contract])  # noqa: E731
    if qarray.is_qarray(w):
        return qarray.QArray(w.codes.reshape(lead(w.codes), n), w.scales.reshape(lead(w.scales), n),
                             w.bits, w.group_size, 0, (kin, n))
    if bcq.is_bcq(w):  # planes pre+(n/8, k)+post, alpha pre+(G, k)+post, offset pre+(G,)+post
        return bcq.BCQArray(w.planes.reshape(lead(w.planes), w.bits, n), w.alpha.reshape(lead(w.alpha), w.bits, n),
                            w.offset.reshape(lead(w.offset), n), w.bits, w.group_size, 0, (kin, n))
    raise TypeError(f"not a packed weight: {type(w).__name__}")
