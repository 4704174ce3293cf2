"""Elastic pruning: slice every sorted dimension to the leading part a rate keeps.

Every prunable axis is its own array axis and sorting puts the most important
channels first, so the model a rate keeps is, weight by weight, a leading box of
the full arrays. The target shapes come from the smaller config itself (an
abstract model built from it), so there is one source of truth for layouts.
Packed quantized weights are sliced in their packed form (codes and scales only,
never re-quantized); the slicing itself is the formats' (``packed.slice_to_shapes``).
"""

from __future__ import annotations

import functools

import jax

from uniql_jax.config import ModelConfig
from uniql_jax.models.stacks import init_params
from uniql_jax.quant.formats.packed import slice_to_shapes

RATE_TOLERANCE = 1e-6  # two pruning rates closer than this are the same stored rate (float noise, JSON)


@functools.lru_cache(maxsize=256)
def abstract_params(cfg: ModelConfig):
    """Shapes of the params of `cfg` without allocating them (cached per config)."""
    return jax.eval_shape(lambda: init_params(cfg, 0))


def slice_to_config(small: ModelConfig, params: dict) -> dict:
    """Params of a sorted model sliced to the (smaller) per-block sizes of `small`."""
    return slice_to_shapes(abstract_params(small), params)


def lookup_rate(table: dict, rate: float) -> tuple:
    """The per-block sizes stored for `rate` (exact match up to `RATE_TOLERANCE`)."""
    for r, blocks in table.items():
        if abs(float(r) - float(rate)) < RATE_TOLERANCE:
            return blocks
    stored = ", ".join(f"{float(r):g}" for r in sorted(table))
    raise KeyError(f"rate {rate:g} is not in the table (stored rates: {stored})")


def rate_config(cfg: ModelConfig, table: dict, rate: float) -> ModelConfig:
    """The (smaller) config of the sorted model at a stored `rate`."""
    return cfg.with_blocks(lookup_rate(table, rate))


def prune(cfg: ModelConfig, params: dict, rate: float, table: dict) -> tuple[ModelConfig, dict]:
    """(cfg, params) of the sorted model at `rate`: a smaller config and its leading-box params."""
    small = rate_config(cfg, table, rate)
    return small, slice_to_config(small, params)
