"""Perplexity over non-overlapping windows, jitted and data-parallel over all local devices."""

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
    """Non-overlapping windows [N, seq_len] of a 1-D stream; the tail shorter than seq_len is dropped."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    n = len(tokens) // seq_len
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of seq_len={seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl",))
def window_nll(cfg: ModelConfig, params, batch, *, impl="xla", masks=None):
    """Summed next-token NLL (float32) of each window [B, T]: predictions of tokens 2..T."""
    logits = forward(cfg, params, batch, impl=impl, masks=masks)[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll, axis=-1)


def perplexity(cfg: ModelConfig, params, tokens, *, seq_len: int, batch_size: int = 8, impl: str = "xla",
               masks=None, mesh: Mesh | None = None, progress: bool | None = None) -> float:
    """exp(mean NLL of tokens 2..T over non-overlapping windows of `seq_len`) (API.md).

    Windows are split across the "data" axis of `mesh` (default: all local devices);
    per-window sums come back to the host and are added in float64 in window
    order, so the figure does not depend on the number of devices.
    """
    wins = windows(tokens, seq_len)
    mesh = mesh or data_mesh()
    ndev = mesh.devices.size
    per_step = max(batch_size, ndev) // ndev * ndev
    n = len(wins)
    pad = (-n) % per_step
    padded = np.concatenate([wins, np.zeros((pad, seq_len), np.int32)]) if pad else wins
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    steps = range(0, len(padded), per_step)
    if progress is None:
        progress = len(steps) > 20
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="perplexity", unit="batch", leave=False)
    sums = []
    for s in steps:
        batch = jax.device_put(padded[s:s + per_step], sharding)
        sums.append(np.asarray(window_nll(cfg, params, batch, impl=impl, masks=masks)))
    total = np.concatenate(sums)[:n].astype(np.float64).sum()
    return float(math.exp(total / (n * (seq_len - 1))))
