"""Perplexity over non-overlapping windows, jitted and data-parallel over all local devices.

ppl = exp(sum of next-token NLLs / number of predictions), where each window of
T tokens contributes the T - 1 predictions of its tokens 2..T (API.md).

Device independence: every device runs the same program on the same per-device
batch shape [b, T] (b = `batch_size`, windows per device per step), each window's
NLL is summed on device in float32, and the per-window sums are added on the host
in float64 in window order. A window's sum therefore never depends on how many
devices there are, and neither does the perplexity (bit-identical on 1 and 4
devices; tests/test_eval.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uniql_jax.config import ModelConfig
from uniql_jax.inference import forward


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over all local devices (or the given ones)."""
    return Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("data",))


def windows(tokens, seq_len: int) -> np.ndarray:
    """Non-overlapping windows int32 [N, seq_len] of a 1-D stream; the tail shorter than seq_len is dropped."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one prediction per window), got {seq_len}")
    n = len(tokens) // seq_len
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of seq_len={seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl",))
def window_nll(cfg: ModelConfig, params, batch, *, impl="xla", masks=None):
    """Summed next-token NLL (float32) of each window int32 [B, T] -> [B]: predictions of tokens 2..T."""
    logits = forward(cfg, params, batch, impl=impl, masks=masks)[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    target = jnp.take_along_axis(logits, batch[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    return jnp.sum(nll, axis=-1)


def window_nll_sums(cfg: ModelConfig, params, tokens, *, seq_len: int, batch_size: int = 4, impl: str = "xla",
                    masks=None, mesh: Mesh | None = None, progress: bool | None = None) -> np.ndarray:
    """float32 [N]: summed NLL of each non-overlapping window of `seq_len` (see module docstring).

    `batch_size` is the number of windows each device evaluates per step; the
    last step is filled with copies of window 0 whose results are discarded.
    """
    wins = windows(tokens, seq_len)
    mesh = mesh or data_mesh()
    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis, has {mesh.axis_names}")
    per_step = int(batch_size) * mesh.shape["data"]
    n = len(wins)
    fill = (-n) % per_step
    padded = np.concatenate([wins, np.repeat(wins[:1], fill, axis=0)]) if fill else wins
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))  # replicated
    steps = range(0, len(padded), per_step)
    if progress is None:
        progress = len(steps) > 20
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"perplexity ({n} windows of {seq_len})", unit="step", leave=False)
    sums = []
    for s in steps:
        batch = jax.device_put(padded[s:s + per_step], batch_sharding)
        sums.append(window_nll(cfg, params, batch, impl=impl, masks=masks))  # async: host waits only at the end
    return np.concatenate([np.asarray(x) for x in sums])[:n]


def perplexity(cfg: ModelConfig, params, tokens, *, seq_len: int, batch_size: int = 4, impl: str = "xla",
               masks=None, mesh: Mesh | None = None, progress: bool | None = None) -> float:
    """exp(mean NLL of tokens 2..T over non-overlapping windows of `seq_len`) (API.md).

    tokens: a 1-D int stream; the tail shorter than `seq_len` is dropped. Windows
    are split over the "data" axis of `mesh` (default: all local devices),
    `batch_size` windows per device per step; a progress bar shows on long runs.
    """
    sums = window_nll_sums(cfg, params, tokens, seq_len=seq_len, batch_size=batch_size, impl=impl, masks=masks,
                           mesh=mesh, progress=progress)
    return float(math.exp(sums.astype(np.float64).sum() / (len(sums) * (seq_len - 1))))


def unigram_perplexity(tokens, *, seq_len: int) -> float:
    """Perplexity of the best context-free model of the same predictions perplexity() scores.

    The unigram distribution is fitted on the very tokens being scored (tokens
    2..T of each window), so this is exp(entropy) of their empirical
    distribution: a lower bound for any unigram model, the baseline a model
    that learned anything beyond token frequencies must beat.
    """
    targets = windows(tokens, seq_len)[:, 1:].ravel()
    counts = np.bincount(targets).astype(np.float64)
    p = counts[counts > 0] / len(targets)
    return float(math.exp(-(p * np.log(p)).sum()))
