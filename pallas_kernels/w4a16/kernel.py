"""W4A16 group-wise matmul (Pallas, Triton GPU backend or interpret mode).

Computes y [M, N] = x [M, Kin] @ W [Kin, N] where W is stored as a 4-bit `QArray`
(two codes per byte along Kin, even row in the low nibble; float16 scale per group of
`group_size` rows): W[k, n] = s[k // group_size, n] * (code[k, n] - 8).

Each program owns a [BM, BN] output tile and walks its share of Kin in blocks of BK rows
(BK a multiple of the group size): it loads BK/2 packed bytes per column, splits them into
the even rows (low nibbles) and odd rows (high nibbles), scales both by their group's
scale, casts to the activation dtype and accumulates two MMAs in float32,

    acc += x[:, even rows] @ W_even + x[:, odd rows] @ W_odd,

so the unpacked weight never exists in HBM and nibbles are never interleaved in registers.
The activation columns are split the same way for free by viewing x as [M, Kin/2, 2].

Two launch shapes (`path`):
* "gemv" (decode, M <= 16): one 16-row tile (MMA needs >= 16 rows; padded rows are masked),
  narrow N tiles and split-K so that enough programs stream the weight (memory-bound);
  split-K partial sums [S, M, N] float32 are added outside the kernel.
* "tiled" (prefill): 64x128 output tiles, K loop inside, no split.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import is_pow2, lane_mask, next_pow2, triton_params
from uniql_jax.quant.qarray import QArray

GEMV_MAX_ROWS = 16
MIN_MMA = 16  # Triton MMA: every dot operand dimension >= 16
TARGET_PROGRAMS = 264  # 2 per SM on an H100 (132 SMs): enough to saturate HBM in decode


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration. block_k is a power-of-two multiple of the group size dividing Kin;
    k_splits divides Kin // block_k."""

    block_m: int
    block_n: int
    block_k: int
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def unsupported_reason(x_shape, w: QArray) -> str | None:
    """Why the kernel cannot take this product (None if it can); callers then use the reference."""
    if w.bits != 4:
        return f"bits={w.bits} (kernel is 4-bit only)"
    if w.ndim != 2 or w.axis != 0:
        return "weight must be 2-D and quantized along axis 0"
    kin = w.shape[0]
    if x_shape[-1] != kin:
        return f"x has {x_shape[-1]} columns, weight {kin} rows"
    if not is_pow2(w.group_size):
        return f"group_size {w.group_size} is not a power of two"
    if kin % max(w.group_size, 2 * MIN_MMA):
        return f"Kin={kin} is not a multiple of max(group_size, {2 * MIN_MMA})"
    return None


def pick_block_k(kin: int, group_size: int, target: int) -> int:
    """Largest power-of-two multiple of the group size (>= 32 for the MMA), <= max(target,
    group_size, 32), that divides Kin."""
    bk = max(group_size, 2 * MIN_MMA)
    while bk * 2 <= target and kin % (bk * 2) == 0:
        bk *= 2
    return bk


def default_config(m: int, kin: int, n: int, group_size: int, path: str | None = None) -> Config:
    path = path or ("gemv" if m <= GEMV_MAX_ROWS else "tiled")
    if path == "gemv":
        block_n = min(64, max(MIN_MMA, next_pow2(n)))
        block_k = pick_block_k(kin, group_size, 256)
        n_blocks_k = kin // block_k
        splits = 1
        while (splits * 2 <= n_blocks_k and n_blocks_k % (splits * 2) == 0
               and math.ceil(n / block_n) * splits < TARGET_PROGRAMS):
            splits *= 2
        return Config(block_m=MIN_MMA, block_n=block_n, block_k=block_k, k_splits=splits, num_warps=4, num_stages=3)
    block_m = min(64, max(MIN_MMA, next_pow2(m)))
    block_n = min(128, max(MIN_MMA, next_pow2(n)))
    return Config(block_m=block_m, block_n=block_n, block_k=pick_block_k(kin, group_size, 128), num_warps=4,
                  num_stages=3)


def _w4a16_kernel(x_ref, codes_ref, scales_ref, *refs, m: int, n: int, group_size: int, block_k: int):
    """One [BM, BN] output tile over one K split.

    Refs: x [BM, Ks/2, 2] (x.dtype; [..., 0] even and [..., 1] odd Kin columns),
    codes [Ks/2, BN] uint8, scales [Ks/gs, BN] float16, out [BM, BN] (split axis squeezed);
    Ks = Kin / k_splits. Any refs between scales and out are aliased initial outputs.
    """
    out_ref = refs[-1]
    block_m, block_n = out_ref.shape
    half_k = block_k // 2  # packed byte rows per K step
    groups_per_step = block_k // group_size
    n_steps = codes_ref.shape[0] // half_k
    row_ok = lane_mask(pl.program_id(0) * block_m, block_m, m)[:, None]  # [BM, 1]
    col_ok = lane_mask(pl.program_id(1) * block_n, block_n, n)[None, :]  # [1, BN]
    even, odd = jnp.int32(0), jnp.int32(1)

    def step(kb, acc):
        rows = pl.ds(kb * half_k, half_k)
        x_even = plt.load(x_ref.at[:, rows, even], mask=row_ok, other=0)  # [BM, BK/2]
        x_odd = plt.load(x_ref.at[:, rows, odd], mask=row_ok, other=0)  # [BM, BK/2]
        packed = plt.load(codes_ref.at[rows, :], mask=col_ok, other=0)  # [BK/2, BN] uint8
        scale = plt.load(scales_ref.at[pl.ds(kb * groups_per_step, groups_per_step), :], mask=col_ok,
                         other=0).astype(jnp.float32)  # [BK/gs, BN]
        # a group of gs rows is gs/2 byte rows: repeat each group's scale over them
        scale = jnp.broadcast_to(scale[:, None, :], (groups_per_step, group_size // 2, block_n)).reshape(half_k, block_n)
        w_even = ((packed & 0xF).astype(jnp.float32) - 8.0) * scale  # rows k0, k0+2, ...
        w_odd = ((packed >> 4).astype(jnp.float32) - 8.0) * scale  # rows k0+1, k0+3, ...
        acc += pl.dot(x_even, w_even.astype(x_even.dtype))
        acc += pl.dot(x_odd, w_odd.astype(x_odd.dtype))
        return acc

    acc = jax.lax.fori_loop(0, n_steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    plt.store(out_ref, acc.astype(out_ref.dtype), mask=row_ok & col_ok)


@functools.partial(jax.jit, static_argnames=("interpret", "config", "path"))
def matmul(x: jax.Array, w: QArray, *, interpret: bool = False, config: Config | None = None,
           path: str | None = None, out_init: jax.Array | None = None) -> jax.Array:
    """x [M, Kin] @ w (4-bit QArray (Kin, N), axis 0) -> [M, N] in x.dtype, float32 accumulation.

    out_init: optional buffer aliased to the kernel output (a test passes a NaN-poisoned one:
    every element the kernel fails to write stays NaN). With split-K the kernel output is the
    float32 partial sums [S, M, N], so out_init must have that shape.
    """
    reason = unsupported_reason(x.shape, w)
    if reason:
        raise ValueError(f"W4A16 kernel cannot take this product: {reason}")
    (m, kin), n, gs = x.shape, w.shape[1], w.group_size
    cfg = config or default_config(m, kin, n, gs, path)
    if kin % (cfg.block_k * cfg.k_splits) or cfg.block_k % gs or not is_pow2(cfg.block_k):
        raise ValueError(f"{cfg} does not tile Kin={kin} with group size {gs}")
    split_rows = kin // cfg.k_splits  # Kin rows per split

    x_pairs = x.reshape(m, kin // 2, 2)  # [M, Kin/2, 2]: even/odd columns side by side (free view)
    grid = (math.ceil(m / cfg.block_m), math.ceil(n / cfg.block_n), cfg.k_splits)
    in_specs = [
        pl.BlockSpec((cfg.block_m, split_rows // 2, 2), lambda i, j, s: (i, s, 0)),
        pl.BlockSpec((split_rows // 2, cfg.block_n), lambda i, j, s: (s, j)),
        pl.BlockSpec((split_rows // gs, cfg.block_n), lambda i, j, s: (s, j)),
    ]
    if cfg.k_splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
        out_spec = pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.k_splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((pl.squeezed, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j))
    args = [x_pairs, w.codes, w.scales]
    aliases = {}
    if out_init is not None:
        args.append(out_init.astype(out_shape.dtype).reshape(out_shape.shape))
        in_specs.append(out_spec)
        aliases = {3: 0}

    out = pl.pallas_call(
        functools.partial(_w4a16_kernel, m=m, n=n, group_size=gs, block_k=cfg.block_k),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        name="uniql_w4a16",
    )(*args)
    if cfg.k_splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out
