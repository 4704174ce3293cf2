"""Launch shapes shared by the packed-weight matmul kernels (W4A16, BCQ).

Both compute y [M, N] = x [M, Kin] @ W [Kin, N] with W stored as packed arrays whose leading
axis runs along Kin at some rows-per-entry ratio (4-bit codes: 2 rows per byte row; BCQ planes:
8; group scales: group_size) and whose last axis is N. A program owns a [BM, BN] output tile
and one of `k_splits` contiguous shares of Kin, and loops over that share in steps of BK rows.

Two launch shapes (`path`):
* "gemv" (decode, M <= 16): one 16-row tile (an MMA needs >= 16 rows; padded rows are masked),
  narrow N tiles, and split-K until there are enough programs to stream the weight at full
  bandwidth; the float32 partial sums [S, M, N] are added outside the kernel.
* "tiled" (prefill): up to 64x128 output tiles, K loop inside, no split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import alias_initial_outputs, is_pow2, lane_mask, next_pow2, triton_params

GEMV_MAX_ROWS = 16
MIN_MMA = 16  # Triton MMA: every dot operand dimension >= 16
TARGET_PROGRAMS = 264  # 2 per SM on an H100 (132 SMs): enough programs to saturate HBM in decode
PATHS = ("gemv", "tiled")


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration. block_k: a power-of-two multiple of the group size dividing Kin;
    k_splits divides Kin // block_k."""

    block_m: int
    block_n: int
    block_k: int
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def pick_block_k(kin: int, group_size: int, target: int, min_block_k: int) -> int:
    """Largest power-of-two multiple of max(group_size, min_block_k) that divides Kin and is
    <= max(target, that minimum). Assumes Kin is a multiple of the minimum."""
    bk = max(group_size, min_block_k)
    while bk * 2 <= target and kin % (bk * 2) == 0:
        bk *= 2
    return bk


def default_config(m: int, kin: int, n: int, group_size: int, path: str | None = None, *,
                   min_block_k: int) -> Config:
    """Heuristic launch shape (not tuned on hardware yet: bench.py sweeps alternatives)."""
    path = path or ("gemv" if m <= GEMV_MAX_ROWS else "tiled")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "gemv":
        block_n = min(64, max(MIN_MMA, next_pow2(n)))
        block_k = pick_block_k(kin, group_size, 256, min_block_k)
        n_steps = kin // block_k
        splits = 1
        while (n_steps % (splits * 2) == 0 and math.ceil(n / block_n) * splits < TARGET_PROGRAMS):
            splits *= 2
        return Config(block_m=MIN_MMA, block_n=block_n, block_k=block_k, k_splits=splits)
    block_m = min(64, max(MIN_MMA, next_pow2(m)))
    block_n = min(128, max(MIN_MMA, next_pow2(n)))
    return Config(block_m=block_m, block_n=block_n, block_k=pick_block_k(kin, group_size, 128, min_block_k))


def check_config(cfg: Config, kin: int, group_size: int, min_block_k: int):
    ok = (is_pow2(cfg.block_k) and cfg.block_k >= min_block_k and cfg.block_k % group_size == 0
          and kin % (cfg.block_k * cfg.k_splits) == 0 and cfg.block_m >= MIN_MMA and cfg.block_n >= MIN_MMA
          and is_pow2(cfg.block_m) and is_pow2(cfg.block_n))
    if not ok:
        raise ValueError(f"{cfg} does not tile Kin={kin} with group size {group_size} (min block_k {min_block_k})")


def launch_packed_matmul(body: Callable, x: jax.Array, weights: Sequence[tuple[jax.Array, int]], *, n: int,
                         x_rows_per_entry: int, cfg: Config, interpret: bool, out_init, name: str) -> jax.Array:
    """pallas_call of `body` over the [M, N] output with split-K; returns y [M, N] in x.dtype.

    x [M, Kin] is passed as the free view [M, Kin/r, r] (r = x_rows_per_entry), so that
    `x_ref[:, rows, j]` are the Kin columns congruent to j mod r, matching packed weights whose
    entry holds r consecutive rows. weights: (array, rows_per_entry) with arrays shaped
    [Kin / rows_per_entry, *middle, N]; each program sees its split's rows, all of `middle`
    and a BN-wide column block. body(x_ref, *weight_refs, [init_ref], out_ref) writes the
    [BM, BN] tile (split axis squeezed) and must mask rows >= M and columns >= N itself.

    out_init: optional buffer aliased to the kernel output (tests pass NaN-poisoned ones); its
    shape is [M, N] (x.dtype), or [S, M, N] float32 partial sums when cfg.k_splits = S > 1.
    """
    m, kin = x.shape
    r = x_rows_per_entry
    split_rows = kin // cfg.k_splits  # Kin rows per split
    in_specs = [pl.BlockSpec((cfg.block_m, split_rows // r, r), lambda i, j, s: (i, s, 0))]
    for array, rows_per_entry in weights:
        middle = array.shape[1:-1]
        in_specs.append(pl.BlockSpec(
            (split_rows // rows_per_entry, *middle, cfg.block_n),
            lambda i, j, s, _mid=len(middle): (s, *([0] * _mid), j),
        ))
    if cfg.k_splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
        out_spec = pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.k_splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((pl.squeezed, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j))
    args = [x.reshape(m, kin // r, r)] + [a for a, _ in weights]
    aliases = alias_initial_outputs(args, in_specs, [out_shape], [out_spec], None if out_init is None else [out_init])
    out = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(math.ceil(m / cfg.block_m), math.ceil(n / cfg.block_n), cfg.k_splits),
        in_specs=in_specs,
        out_specs=out_spec,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        name=name,
    )(*args)
    if cfg.k_splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out


def partial_out_shape(cfg: Config, m: int, n: int, dtype) -> tuple[tuple[int, ...], jnp.dtype]:
    """Shape and dtype of the kernel's own output (what `out_init` must match)."""
    if cfg.k_splits > 1:
        return (cfg.k_splits, m, n), jnp.dtype(jnp.float32)
    return (m, n), jnp.dtype(dtype)


def load_group_rows(ref, groups, index: tuple, col_ok, rows_per_group: int):
    """Per-group values (scales, alpha, offset) of one K step, repeated over their rows.

    ref [..groups.., *index axes, BN] is read at (groups, *index, :) -> [n_groups, BN] (masked
    columns read 0) and returned as float32 [n_groups * rows_per_group, BN], where
    rows_per_group is how many packed rows of the weight one group spans.
    """
    values = plt.load(ref.at[(groups, *index, slice(None))], mask=col_ok, other=0).astype(jnp.float32)
    n_groups, block_n = values.shape
    return jnp.broadcast_to(values[:, None, :], (n_groups, rows_per_group, block_n)).reshape(
        n_groups * rows_per_group, block_n)


def accumulate_and_store(step, n_steps: int, acc_shape, out_ref, mask, reduce_rows: bool = False):
    """acc = step(kb, acc) for kb < n_steps from float32 zeros; store it (summed over rows if
    reduce_rows) masked into out_ref in out_ref's dtype."""
    acc = jax.lax.fori_loop(0, n_steps, step, jnp.zeros(acc_shape, jnp.float32))
    if reduce_rows:
        acc = jnp.sum(acc, axis=0)
    plt.store(out_ref, acc.astype(out_ref.dtype), mask=mask)


def tile_masks(block_m: int, block_n: int, m: int, n: int):
    """(rows [BM, 1], cols [1, BN]) validity of the current program's output tile."""
    rows = lane_mask(pl.program_id(0) * block_m, block_m, m)[:, None]
    cols = lane_mask(pl.program_id(1) * block_n, block_n, n)[None, :]
    return rows, cols
