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

from uniql_jax import distributed
from uniql_jax.config import ModelConfig
from uniql_jax.inference import forward
from uniql_jax.models.layers import rms_norm
from uniql_jax.models.stacks import bind_block, block_key, embed_lookup, head_logits


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over the given devices; default: the mesh `distributed.use_mesh` set,
    else every device of every process (for one process: all local devices)."""
    if devices is None:
        return distributed.default_mesh()
    return Mesh(np.asarray(devices), ("data",))


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


def _next_token_nll_sums(logits_BxTxV, batch_BxT):
    """Summed NLL (float32) of each window's tokens 2..T under logits of positions 1..T-1 -> [B]."""
    logits = logits_BxTxV[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    target = jnp.take_along_axis(logits, batch_BxT[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - target, axis=-1)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl",))
def window_nll(cfg: ModelConfig, params, batch, *, impl="xla", masks=None):
    """Summed next-token NLL (float32) of each window int32 [B, T] -> [B]: predictions of tokens 2..T.

    One program for the whole model (differentiable; fine-tuning's loss). Perplexity runs
    block by block instead (`BlockwiseNLL`)."""
    return _next_token_nll_sums(forward(cfg, params, batch, impl=impl, masks=masks), batch)


HEAD_CHUNK = 128  # positions per head matmul in BlockwiseNLL (bounds the float32 logits held at once)


class BlockwiseNLL:
    """`window_nll` as a chain of small programs: embedding, each block, then norm + head + NLL.

    A whole-model program is compiled per model shape, and every pruning rate is a
    new shape: a 30-layer model over a grid of 8 rates compiled 8 deep programs.
    Here a block's program depends only on its own sizes (``stacks.block_key``), so
    it serves every layer, rate and model with those sizes; a rate grid compiles
    one program per distinct block shape, plus the embedding and the head. The
    residual stream stays on the device between programs; the head runs over
    `HEAD_CHUNK` positions at a time, so the logits of a large vocabulary never exist
    for a whole batch of windows. ``programs`` counts the
    compiled programs (``compiles()``).
    """

    def __init__(self):
        self._blocks: dict = {}
        self._ends: dict = {}

    def _block(self, cfg, blk, impl):
        key = block_key(cfg, blk) + (impl,)
        if key not in self._blocks:
            geometry, small = key[:2]

            def run(block_params, x_BxTxD, mask):
                B, T = x_BxTxD.shape[:2]
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
                update, _ = bind_block(geometry, small, block_params)(x_BxTxD, positions, None, mask, impl)
                return x_BxTxD + update

            self._blocks[key] = jax.jit(run)
        return self._blocks[key]

    def _end(self, cfg, impl):
        key = (cfg.with_blocks(()), impl)
        if key not in self._ends:
            geometry = key[0]

            def embed(table, final_norm, batch_BxT):
                return embed_lookup(table, batch_BxT, final_norm.dtype)  # the compute dtype (norms stay float)

            def head_nll(table, lm_head, final_norm, x_BxTxD, batch_BxT):
                # predictions of tokens 2..T, HEAD_CHUNK positions at a time: the float32 logits of a
                # 49 k vocabulary are never materialized for the whole window at once
                h = rms_norm(x_BxTxD[:, :-1], final_norm, geometry.rms_norm_eps)  # [B, T-1, D]
                target = batch_BxT[:, 1:]  # [B, T-1]
                B, n, D = h.shape
                chunk = min(n, HEAD_CHUNK)
                pad = (-n) % chunk
                h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, chunk, D).swapaxes(0, 1)
                target = jnp.pad(target, ((0, 0), (0, pad))).reshape(B, -1, chunk).swapaxes(0, 1)

                def chunk_nll(args):
                    h_BxCxD, t_BxC = args
                    logits = head_logits(geometry, table, lm_head, h_BxCxD, impl).astype(jnp.float32)
                    picked = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
                    return jax.nn.logsumexp(logits, axis=-1) - picked  # [B, C]

                nll = jax.lax.map(chunk_nll, (h, target)).swapaxes(0, 1).reshape(B, -1)[:, :n]  # [B, T-1]
                return jnp.sum(nll, axis=-1)

            self._ends[key] = (jax.jit(embed), jax.jit(head_nll))
        return self._ends[key]

    def __call__(self, cfg: ModelConfig, params, batch_BxT, *, impl="xla", masks=None):
        embed, head_nll = self._end(cfg, impl)
        x = embed(params["embed"], params["final_norm"], batch_BxT)
        for i, blk in enumerate(cfg.blocks):
            x = self._block(cfg, blk, impl)(params["blocks"][i], x, None if masks is None else masks[i])
        return head_nll(params["embed"], params.get("lm_head"), params["final_norm"], x, batch_BxT)

    def compiles(self) -> int:
        """Programs compiled so far (each jitted function's cache entries)."""
        fns = list(self._blocks.values()) + [f for pair in self._ends.values() for f in pair]
        return sum(f._cache_size() for f in fns)


blockwise_nll = BlockwiseNLL()  # one process-wide cache of block programs


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
    params = distributed.put_params(params, mesh)  # replicated over "data", weights sharded over "model" if any
    steps = range(0, len(padded), per_step)
    if progress is None:
        progress = len(steps) > 20
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"perplexity ({n} windows of {seq_len})", unit="step", leave=False)
    sums = []
    for s in steps:
        batch = distributed.put(padded[s:s + per_step], batch_sharding)
        sums.append(blockwise_nll(cfg, params, batch, impl=impl, masks=masks))  # async: host waits only at the end
    return np.concatenate([distributed.to_host(x) for x in sums])[:n]  # across processes: an all-gather


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
