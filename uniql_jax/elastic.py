"""ElasticModel: one full-rank copy of a model in memory, its pruning rate switched in-process.

A rate is cut from the in-memory arrays exactly as `checkpoint.load` cuts it from the
files (the pruner's leading boxes), with one compiled slicer and one compiled forward
kept per rate, so switching back to a rate costs no I/O, tracing or compilation.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax

from uniql_jax.checkpoint.io import load, read_info
from uniql_jax.checkpoint.layout import leading_box, map_raw, rate_target, raw_arrays, raw_shapes
from uniql_jax.checkpoint.rates import check_table, resolve_rate
from uniql_jax.config import ModelConfig
from uniql_jax.inference import forward


@dataclasses.dataclass(frozen=True)
class _RateEntry:
    cfg: ModelConfig  # the config at this rate
    target: Any  # abstract params at this rate (the pruner's target)
    changed: dict  # {raw key: kept shape} of the raw arrays this rate shrinks
    slicer: Any  # jitted {key: full array} -> {key: leading box}, over `changed` only
    forward: Any  # jitted (params, tokens) -> logits


class ElasticModel:
    """A model held at full rank in memory whose pruning rate is switched in-process.

    A rate is applied like `load` applies it to the files: the pruner's abstract
    target (``slice_to_config`` traced with ``jax.eval_shape``) gives each raw array's
    kept shape and the leading boxes are cut, here from the in-memory full-rank arrays
    (no checkpoint I/O). Per rate, one compiled function cuts the arrays that rate
    shrinks (the others are the full-rank arrays themselves, not copies) and one
    compiled forward runs the model; both are kept, so switching back to a rate costs
    no tracing or compilation. ``traces`` counts traces per rate.
    """

    def __init__(self, cfg: ModelConfig, params, table: dict, *, rate=None, impl: str = "xla"):
        self.full_cfg, self.full_params = cfg, params
        self.table = check_table(cfg, table)
        self.impl = impl
        self.traces: collections.Counter = collections.Counter()
        self._full_raw = raw_arrays(params)
        self._abstract_full = jax.eval_shape(lambda p: p, params)
        self._entries: dict = {}  # stored rate (None: full rank) -> _RateEntry
        self.set_rate(rate)

    @classmethod
    def from_checkpoint(cls, path, *, rate=None, impl: str = "xla", device=None, mesh=None) -> "ElasticModel":
        """Read the full-rank model once; every later rate comes from memory. `device` / `mesh`: as `load`'s
        (with a mesh over several processes each reads only its own shards)."""
        info = read_info(path)
        cfg, params = load(path, None, device=device, mesh=mesh)
        return cls(cfg, params, info.table, rate=rate, impl=impl)

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(sorted(self.table))

    def _entry(self, rate) -> _RateEntry:
        small, key = resolve_rate(self.full_cfg, self.table, rate)
        entry = self._entries.get(key)
        if entry is None:
            target = rate_target(small, self._abstract_full)
            changed = {k: s for k, s in raw_shapes(target).items() if s != tuple(self._full_raw[k].shape)}

            def cut(arrays):
                self.traces[key] += 1  # runs only while tracing
                return {k: leading_box(arrays[k], s) for k, s in changed.items()}

            def run(params, tokens):
                self.traces[key] += 1
                return forward(small, params, tokens, impl=self.impl)

            entry = self._entries[key] = _RateEntry(small, target, changed, jax.jit(cut), jax.jit(run))
        return entry, key

    def set_rate(self, rate):
        """Switch to a stored rate (None: full rank); returns (cfg, params) at that rate."""
        entry, key = self._entry(rate)
        self.params = None  # drop the previous rate's arrays before cutting the next
        cut = entry.slicer({k: self._full_raw[k] for k in entry.changed}) if entry.changed else {}
        self.rate, self.cfg = key, entry.cfg
        self.params = map_raw(lambda k, _: cut.get(k, self._full_raw[k]), entry.target)
        return self.cfg, self.params

    def forward(self, tokens) -> jax.Array:
        """Logits float32 [B, T, V] of int32 tokens [B, T] at the current rate."""
        return self._entries[self.rate].forward(self.params, tokens)
