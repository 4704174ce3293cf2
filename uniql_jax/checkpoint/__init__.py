"""One Orbax checkpoint per compressed model, restorable at any stored pruning rate.

A checkpoint stores the full-rank (sorted, optionally fine-tuned and quantized) arrays
once, and ``load(path, rate)`` reads only the leading boxes a rate keeps. The modules,
lowest first:

    manifest.py   the folder and its integrity: manifest, checksums, fsync, atomic commit
    layout.py     param tree <-> raw arrays; how each raw array is split and chunked on disk
    rates.py      the rate table: JSON form, check against a config, rate lookup (RateError)
    io.py         save, read_info, load (rate-selective), ReadCounter

Switching rates in a running process, without I/O, is `uniql_jax.elastic.ElasticModel`.
This ``__init__`` re-exports the public names only; code inside the package imports the
module that defines a name.
"""

from uniql_jax.checkpoint.io import CheckpointInfo, ReadCounter, load, read_info, save
from uniql_jax.checkpoint.manifest import MANIFEST, CheckpointError
from uniql_jax.checkpoint.rates import RateError, resolve_rate

__all__ = [
    "save", "load", "read_info", "CheckpointInfo", "ReadCounter",
    "CheckpointError", "RateError", "resolve_rate", "MANIFEST",
]
