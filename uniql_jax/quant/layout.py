"""The layout of a quantized model without its values: memory figures of models too large to materialize.

`quantized_layout` is what ``uq.quantize`` returns for a config and rate table (the driver's
choice of weights, quantized axes and group sizes; RTN and GPTQ share it) over abstract arrays
(``jax.ShapeDtypeStruct``), `to_bcq_planes` reads a uniform model as BCQ bit-planes (the layout
UniQuan gives), and `array_layout` is what two layouts are compared by.
tests/quant/test_quantized_pruning.py and tests/quant/test_uniquan_driver.py check each against
real driver outputs.
"""

from __future__ import annotations

import functools

import jax

from uniql_jax.compress.prune import abstract_params
from uniql_jax.config import ModelConfig
from uniql_jax.quant.formats import bcq, qarray
from uniql_jax.quant.quantize import rtn_quantize_model


def rtn_quantized(cfg: ModelConfig, params: dict, table: dict | None, *, bits: int = 4, group_size: int = 128,
                  quantize_embeddings: bool = True) -> dict:
    """What ``uq.quantize(method="rtn")`` returns (no calibration pass; `params` may be abstract)."""
    return rtn_quantize_model(cfg, params, table, bits=bits, group_size=group_size,
                              quantize_embeddings=quantize_embeddings)[0]


def quantized_layout(cfg: ModelConfig, table: dict | None, **kw) -> dict:
    """The abstract params (ShapeDtypeStructs, QArrays of them) that ``uq.quantize`` returns for
    `cfg` and `table` (RTN and GPTQ share the layout): ``rtn_quantized`` over abstract arrays."""
    return jax.eval_shape(functools.partial(rtn_quantized, cfg, table=table, **kw), abstract_params(cfg))


def to_bcq_planes(params):
    """Every uniform linear weight (QArray, not the embedding) as the BCQArray with the same values."""
    conv = lambda b: {k: bcq.from_uniform(v) if qarray.is_qarray(v) else v for k, v in b.items()}  # noqa: E731
    out = {**params, "blocks": [conv(b) for b in params["blocks"]]}
    if qarray.is_qarray(params.get("lm_head")):
        out["lm_head"] = bcq.from_uniform(params["lm_head"])
    return out


def array_layout(tree):
    """The shapes and dtypes of a params tree (packed formats and their static fields included)."""
    return jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(lambda: tree))
