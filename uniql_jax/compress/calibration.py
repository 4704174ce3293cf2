"""Layer-by-layer calibration driver (docs/method.md, "Pipeline", stages 1 and 2).

The model runs block by block over calibration windows (int32 [W, T], real tokens,
no padding; docs/method.md, "What we do differently from the reference code", 4).
The residual stream of all windows is kept on the host ([W, T, D] float32); each
block then streams it in batches, so accelerator memory is bounded by one batch
through one block. For every batch a jitted, data-parallel step computes the block's update and its
statistics; statistics are sums in float32, reduced across the devices of a
`data` mesh (exact collective sums, so results do not depend on the device count beyond
float reassociation); the reduction adds in a fixed order (``distributed.ordered_psum``),
so they do not depend at all on how those devices are spread over processes.

Across processes (``uniql_jax.distributed``) the mesh is global: each process embeds and
streams only its own share of the windows (``distributed.process_rows``: its data shards of
every step, so the per-device batches are those of one process with as many devices), the
statistics are summed over every device of every process, and the last-token / final
residuals are all-gathered at the end: every process gets the same result. A mesh with a
``model`` axis shards each block's weights over it (``distributed.put_params``);
``shard_map`` is then manual over ``data`` only and XLA partitions the block over ``model``.

A *collector* says what a block kind contributes:

    collect(cfg, blk, module, x_BxTxD, positions_BxT, w_B) -> stats pytree (sums over tokens)

where `w_B` weighs each window (0 for the padding rows added so a batch divides
the device count). After a block's batches the driver calls
`on_block(i, blk, stats)`, then moves on with the block's outputs.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from uniql_jax import distributed
from uniql_jax.config import BlockConfig, ModelConfig
from uniql_jax.eval import data_mesh
from uniql_jax.models.stacks import bind_block, block_key, embed_lookup  # noqa: F401 (bind_block: re-export)

F32 = jnp.float32


def no_stats(cfg, blk, module, x_BxTxD, positions_BxT, w_B):
    """A collector that gathers nothing (propagation only)."""
    return {}


def weighted_rows(u, w_B):
    """u [B, T, ...] scaled by √w per window, so that Σ (√w u)ᵀ(√w u) = Σ w uᵀu."""
    return u * jnp.sqrt(w_B).reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)


@functools.lru_cache(maxsize=256)
def _block_step(cfg: ModelConfig, blk: BlockConfig, collect: Callable, mesh):
    """jit(shard_map(one batch through one block)): (params, x, w) -> (stats psum'ed, x + update)."""

    def local(block_params, x_BxTxD, w_B):
        module = bind_block(cfg, blk, block_params)
        B, T = x_BxTxD.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        stats = collect(cfg, blk, module, x_BxTxD, positions, w_B)
        # a fixed-order sum over "data": the same bits on 1 process x 4 devices as on 2 x 2
        stats = distributed.ordered_psum(jax.tree.map(lambda s: s.astype(F32), stats), "data", mesh.shape["data"])
        update, _ = module(x_BxTxD, positions, None, None, "xla")
        return stats, x_BxTxD + update.astype(x_BxTxD.dtype)

    data, rep = PartitionSpec("data"), PartitionSpec()
    # other mesh axes ("model") stay automatic: XLA partitions the block over the weights' shardings
    manual = {"data"} if len(mesh.axis_names) > 1 else frozenset()
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(rep, data, data), out_specs=(rep, data), check_vma=False,
                            axis_names=manual)
    n_model = mesh.shape.get("model", 1)
    if n_model == 1:
        return jax.jit(sharded, out_shardings=(NamedSharding(mesh, rep), NamedSharding(mesh, data)))
    # with a "model" axis the statistics (Hessians [Din, Din]: 3.3 GB for a 70B down_proj) are sharded
    # over it too, by rows; their structure is known once traced, one program per params structure
    programs = {}

    def step(block_params, x, w):
        key = jax.tree.structure(block_params)
        if key not in programs:
            stats_shape = jax.eval_shape(sharded, block_params, x, w)[0]
            stat_shardings = jax.tree.map(
                lambda a: NamedSharding(mesh, distributed.stat_spec(a.shape, n_model)), stats_shape)
            programs[key] = jax.jit(sharded, out_shardings=(stat_shardings, NamedSharding(mesh, data)))
        return programs[key](block_params, x, w)

    return step


def embed_windows(cfg: ModelConfig, params: dict, calib) -> np.ndarray:
    """Input of the first block for every window: float32 [W, T, D] on the host."""
    tokens = np.asarray(calib, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be int32 [W, T], got shape {tokens.shape}")
    return np.array(embed_lookup(params["embed"], jnp.asarray(tokens), F32))  # a writable copy


def as_float32(tree):
    """Block params in float32 for calibration (packed weights left as they are)."""
    return jax.tree.map(lambda a: a.astype(F32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def run_blocks(cfg: ModelConfig, params: dict, calib, collectors: dict[str, Callable] | None = None,
               on_block: Callable | None = None, *, batch_size: int = 8, mesh=None, progress: bool = True,
               desc: str = "calibration", return_final: bool = False, release_blocks: bool = False) -> dict:
    """Run the model block by block over `calib` (int32 [W, T]).

    collectors: block kind -> collector (kinds not listed gather nothing).
    on_block(i, blk, stats): called after block i with its summed statistics
    (stats include "tokens", the number of tokens they sum over). When it returns
    new block params (sequential quantization: GPTQ), block i's outputs are
    recomputed with them, so later blocks see the already-replaced prefix.
    return_final: also return "final", the residual stream after the last block [W, T, D].
    release_blocks: the caller hands ``params["blocks"]`` (a list) over: entry i is set to
    None once block i has run and `on_block` has returned, so a driver that replaces the
    blocks (sorting, quantizing) never holds two whole copies of the model.
    Returns {"last_token": float32 [n_blocks + 1, W, D] (the residual stream at the
    last position before each block and after the last one), "timings_s": {...}}.
    """
    collectors = collectors or {}
    if release_blocks and not isinstance(params["blocks"], list):
        raise TypeError("release_blocks needs params['blocks'] as a list the caller hands over")
    mesh = mesh or data_mesh()
    ndev = distributed.data_size(mesh)
    t0 = time.perf_counter()
    tokens = np.asarray(calib, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be int32 [W, T], got shape {tokens.shape}")
    W = tokens.shape[0]
    per_step = max(batch_size, ndev) // ndev * ndev
    pad = (-W) % per_step
    rows = distributed.process_rows(W + pad, per_step, mesh)  # this process's windows (all, for one process)
    per_local = len(rows) // ((W + pad) // per_step)  # rows this process feeds per step
    real = rows < W
    x_WxTxD = np.zeros((len(rows),) + tokens.shape[1:] + (cfg.hidden_size,), np.float32)
    if real.any():
        x_WxTxD[real] = embed_windows(cfg, params, tokens[rows[real]])
    w_all = real.astype(np.float32)
    timings = {"embed": time.perf_counter() - t0, "blocks": 0.0, "on_block": 0.0}
    last_token = [x_WxTxD[:, -1].copy()]

    def put_rows(a, s):
        return distributed.global_batch(a[s:s + per_local], mesh)

    blocks = list(enumerate(cfg.blocks))
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc=desc, unit="block")
    for i, blk in blocks:
        t_block = time.perf_counter()
        collect = collectors.get(blk.kind, no_stats)
        # one compiled step serves all blocks of equal sizes (block_key)
        step = _block_step(*block_key(cfg, blk), collect, mesh)
        block_params = distributed.put_params(as_float32(params["blocks"][i]), mesh)
        stats = None
        x_in = x_WxTxD.copy() if on_block is not None else None
        for s in range(0, len(x_WxTxD), per_local):
            batch_stats, x_out = step(block_params, put_rows(x_WxTxD, s), put_rows(w_all, s))
            stats = batch_stats if stats is None else jax.tree.map(jnp.add, stats, batch_stats)
            x_WxTxD[s:s + per_local] = distributed.local_rows(x_out)
        stats = dict(distributed.to_host(stats or {}))
        stats["tokens"] = float(W * x_WxTxD.shape[1])
        t_visit = time.perf_counter()
        timings["blocks"] += t_visit - t_block
        replaced = on_block(i, blk, stats) if on_block is not None else None
        timings["on_block"] += time.perf_counter() - t_visit
        if replaced is not None:
            propagate = _block_step(*block_key(cfg, blk), no_stats, mesh)
            new_params = distributed.put_params(as_float32(replaced), mesh)
            for s in range(0, len(x_in), per_local):
                x_WxTxD[s:s + per_local] = distributed.local_rows(propagate(new_params, put_rows(x_in, s),
                                                                            put_rows(w_all, s))[1])
        if release_blocks:
            params["blocks"][i] = block_params = None
        last_token.append(x_WxTxD[:, -1].copy())
    timings["total"] = time.perf_counter() - t0
    # every process: all windows, in window order (an all-gather across processes)
    last = distributed.allgather_rows(np.stack(last_token, axis=1), rows)[:W]  # [W, n_blocks + 1, D]
    out = {"last_token": np.ascontiguousarray(last.swapaxes(0, 1)), "timings_s": timings}
    if return_final:
        out["final"] = distributed.allgather_rows(x_WxTxD, rows)[:W]
    return out


def propagate_all(cfg: ModelConfig, blk: BlockConfig, block_params: dict, x_WxTxD: np.ndarray, *, batch_size: int,
                  mesh) -> np.ndarray:
    """Block outputs x + update of every window (host float32 [W, T, D], the same on every process),
    data-parallel over `mesh`: each process runs its share, then all-gather (every process gets all)."""
    ndev = distributed.data_size(mesh)
    per_step = max(batch_size, ndev) // ndev * ndev
    W = len(x_WxTxD)
    pad = (-W) % per_step
    rows = distributed.process_rows(W + pad, per_step, mesh)
    per_local = len(rows) // ((W + pad) // per_step)
    x_pad = np.concatenate([x_WxTxD, np.zeros((pad,) + x_WxTxD.shape[1:], np.float32)]) if pad else x_WxTxD
    x_local = x_pad[rows]
    w_local = (rows < W).astype(np.float32)
    step = _block_step(*block_key(cfg, blk), no_stats, mesh)
    params = distributed.put_params(as_float32(block_params), mesh)
    out = np.empty_like(x_local)
    for s in range(0, len(rows), per_local):
        _, y = step(params, distributed.global_batch(x_local[s:s + per_local], mesh),
                    distributed.global_batch(w_local[s:s + per_local], mesh))
        out[s:s + per_local] = distributed.local_rows(y)
    return distributed.allgather_rows(out, rows)[:W]
