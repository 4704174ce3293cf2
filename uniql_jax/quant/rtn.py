"""Round-to-nearest (RTN) quantization: the baseline of stage 4 and the embedding quantizer.

RTN quantizes every weight on its own: per group of ``group_size`` weights along
the input axis, ``s = max|w| / (2**(b-1) - 1)`` (stored float16) and
``code = clip(round(w / s) + 2**(b-1), 0, 2**b - 1)``. The arithmetic lives in
``qarray.quantize_rtn`` (one source of truth, shared with GPTQ's per-row rounding);
this module only names the two uses the pipeline has:

* ``rtn_quantize``            a linear ``W [Din, Dout]`` (``y = x @ W``), grouped along Din (axis 0);
* ``rtn_quantize_embedding``  an embedding table ``E [V, D]``, grouped along D (axis 1),
  so that a token's row is dequantized from its own bytes and scales (UniQL quantizes
  embeddings "per row" with RTN; a gather never touches another row; the gather itself,
  ``qarray.lookup_rows``, is part of the format).
"""

from __future__ import annotations

import functools

import jax

from uniql_jax.quant import qarray
from uniql_jax.quant.qarray import QArray
from uniql_jax.quant.qarray import lookup_rows  # noqa: F401  (re-exported: a format operation, used by the models)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def rtn_quantize(w_DinxDout: jax.Array, *, bits: int = 4, group_size: int = 128) -> QArray:
    """RTN baseline for a linear ``W [Din, Dout]``: groups along Din -> ``QArray(axis=0)``."""
    if w_DinxDout.ndim != 2:
        raise ValueError(f"rtn_quantize expects a 2-D [Din, Dout] weight, got shape {w_DinxDout.shape}")
    return qarray.quantize_rtn(w_DinxDout, bits=bits, group_size=group_size, axis=0)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def rtn_quantize_embedding(table_VxD: jax.Array, *, bits: int = 4, group_size: int | None = None) -> QArray:
    """Per-row RTN of an embedding table ``E [V, D]`` along D -> ``QArray(axis=1)``.

    ``group_size=None`` gives one scale per row (group = the whole row, D), the
    reference's "per-row" embedding quantizer; pass e.g. 128 for finer groups
    (``D % group_size == 0``). A tied ``lm_head [D, V]`` quantized along D has the
    same groups, transposed.
    """
    if table_VxD.ndim != 2:
        raise ValueError(f"rtn_quantize_embedding expects a 2-D [V, D] table, got shape {table_VxD.shape}")
    d_model = table_VxD.shape[1]
    return qarray.quantize_rtn(table_VxD, bits=bits, group_size=group_size or d_model, axis=1)
