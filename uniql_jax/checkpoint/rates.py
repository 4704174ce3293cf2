"""The rate table of a checkpoint: its JSON form, its check against a config, and rate lookup.

Rates: ``load(path, rate)`` accepts ``None`` (full rank), 0 (full rank even if the
table has no 0 entry) and the table's rates (to ``RATE_TOLERANCE``). Anything else is a
``RateError``: outside [0, max stored rate], or inside but not stored, in which case
the message names the nearest stored rate; rates are never silently rounded.
"""

from __future__ import annotations

import math

from uniql_jax.compress.prune import RATE_TOLERANCE, rate_config
from uniql_jax.config import ModelConfig, block_from_dict, block_to_dict


class RateError(ValueError):
    """A pruning rate outside the stored range or not stored in the checkpoint's table."""


def table_to_json(table: dict) -> list:
    return [{"rate": float(r), "blocks": [block_to_dict(b) for b in blocks]} for r, blocks in sorted(table.items())]


def table_from_json(entries) -> dict:
    if not isinstance(entries, list):
        raise ValueError("the rate table must be a list")
    return {float(e["rate"]): tuple(block_from_dict(b) for b in e["blocks"]) for e in entries}


def check_table(cfg: ModelConfig, table: dict) -> dict:
    """Normalized {float rate: tuple of blocks}; raises ValueError on a table that does not fit `cfg`."""
    out = {}
    for rate, blocks in table.items():
        r = float(rate)
        if not 0.0 <= r < 1.0:
            raise ValueError(f"table rate {rate!r} is outside [0, 1)")
        blocks = tuple(blocks)
        if len(blocks) != len(cfg.blocks) or any(
            b.kind != c.kind or b.layer != c.layer for b, c in zip(blocks, cfg.blocks)
        ):
            raise ValueError(f"table rate {r:g}: its blocks do not match the config's block kinds and layers")
        out[r] = blocks
    return out


def resolve_rate(cfg: ModelConfig, table: dict, rate) -> tuple[ModelConfig, float | None]:
    """(config at `rate`, the stored rate it matched); ``None`` is the full-rank model.

    Rates are never rounded: a rate inside [0, max stored] that is not in the table is
    an error naming the nearest stored rate. Rate 0 is the full-rank model even when
    the table has no entry for it.
    """
    if rate is None:
        return cfg, None
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise RateError(f"rate must be a number, got {rate!r}") from None
    top = max(table, default=0.0)
    if not math.isfinite(r) or r < -RATE_TOLERANCE or r > top + RATE_TOLERANCE:
        raise RateError(f"rate {r:g} is outside [0, {top:g}], the range of rates stored in this checkpoint")
    try:
        return rate_config(cfg, table, r), float(min(table, key=lambda s: abs(s - r)))
    except KeyError:
        if abs(r) <= RATE_TOLERANCE:
            return cfg, 0.0
        nearest = min(table, key=lambda s: abs(s - r))
        stored = ", ".join(f"{s:g}" for s in sorted(table))
        raise RateError(f"rate {r:g} is not stored in this checkpoint (stored: {stored}); rates are not rounded "
                        f"to the nearest stored one ({nearest:g}): pass a stored rate") from None
