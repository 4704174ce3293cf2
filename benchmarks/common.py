"""Helpers shared by the benchmark scripts: timing and cached token streams.

Rate tables come from the library (``uniql_jax.pipeline.uniform_table``), the named models
(stories260K, the embedded defaults) from ``uniql_jax.pipeline.load_named_model``, model configs from
``uniql_jax.config.layout_config``, W4 round-to-nearest from ``uniql_jax.quant.quantize.rtn_quantize_model``.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from uniql_jax.paths import TINYSTORIES

TOKEN_CACHE = Path(os.environ.get("UNIQL_TOKEN_CACHE", "/tmp/uniql-token-cache"))


def timed_call(fn, *args, **kwargs):
    """(fn(*args, **kwargs), wall seconds), waiting for every array of the output (block_until_ready)."""
    import jax

    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def timed(fn, *args, repeats: int = 3, warmup: bool = True) -> float:
    """Median wall time of fn(*args) over `repeats` calls, after one untimed warm-up call (compilation excluded)."""
    if warmup:
        timed_call(fn, *args)
    times = sorted(timed_call(fn, *args)[1] for _ in range(repeats))
    return times[len(times) // 2]


def cached_tokens(source: str, tokenizer, part: str):
    """The TinyStories token stream (`part`: train / heldout / all) of the model at `source`, cached
    under TOKEN_CACHE ($UNIQL_TOKEN_CACHE): the llama2.c tokenizer is slow Python."""
    import numpy as np

    from uniql_jax import data

    key = hashlib.sha1(f"{Path(source).resolve()}|{TINYSTORIES}|{part}".encode()).hexdigest()[:16]
    path = TOKEN_CACHE / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    tokens = data.token_source(None, tokenizer, part)
    TOKEN_CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), tokens)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return tokens
