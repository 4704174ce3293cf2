"""BCQ (binary-coding quantization) matmul kernels (Pallas, Triton GPU backend or interpret mode).

Weight format (`uniql_jax.quant.formats.bcq.BCQArray`, 2-D (Kin, N) along axis 0, k bit-planes):
planes uint8 [Kin/8, k, N] (byte r of plane i holds bit_i of rows 8r..8r+7, row 8r+j in bit j),
alpha float16 [Kin/gs, k, N], offset float16 [Kin/gs, N], and

    W[row, n] = sum_i alpha[g, i, n] * (2 bit_i[row, n] - 1) + offset[g, n],   g = row // gs.

Two kernels compute y [M, N] = x [M, Kin] @ W with float32 accumulation:

* `matmul_dequant` (any M; decode and prefill launch shapes of `pallas_kernels.tiling`):
  per K step of BK rows, for each bit position j in 0..7 it rebuilds the BK/8 weight rows
  8r+j from the k plane bytes (sum of +-alpha, plus offset), casts them to the activation
  dtype and does one MMA against x[:, 8r+j] (x viewed as [M, Kin/8, 8], free). The 8
  rows of one byte are never interleaved in registers.

* `matmul_lut` (M = 1, the memory-bound decode case; LUT-GEMM, Park et al., ICLR 2024):
  every 8 consecutive activations x[8r:8r+8] have only 256 signed sums
  T[r, p] = sum_j x[8r+j] (2 bit_j(p) - 1), one per byte value p. With T built once
  ([Kin/8, 256] float32, a tiny XLA matmul before the kernel), each plane byte costs one
  table lookup instead of 8 multiply-adds:

      y[n] = sum_r [ sum_i alpha[g(r), i, n] * T[r, planes[r, i, n]] + offset[g(r), n] * sum_j x[8r+j] ].

  The kernel gathers T through the plane bytes, so no weight is ever dequantized (and for
  bfloat16 activations no weight is rounded to bfloat16: slightly *more* accurate than the
  dequantize path).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import tiling
from pallas_kernels.common import alias_initial_outputs, is_pow2, lane_mask, next_pow2, triton_params
from pallas_kernels.tiling import Config
from uniql_jax.quant.formats.bcq import BCQArray

ROWS_PER_BYTE = 8
MIN_BLOCK_K = ROWS_PER_BYTE * tiling.MIN_MMA  # BK/8 byte rows feed an MMA's K dimension
PATHS = ("gemv", "tiled", "lut")


def unsupported_reason(x_shape, w: BCQArray, path: str | None = None) -> str | None:
    """Why the kernels cannot take this product (None if they can)."""
    if w.ndim != 2 or w.axis != 0:
        return "weight must be 2-D along axis 0"
    kin = w.shape[0]
    if len(x_shape) != 2 or x_shape[-1] != kin:
        return f"x {tuple(x_shape)} is not [M, {kin}]"
    if not is_pow2(w.group_size):
        return f"group_size {w.group_size} is not a power of two"
    if path == "lut":
        if x_shape[0] != 1:
            return "the LUT kernel is for batch 1"
        return None if kin % max(w.group_size, 2 * ROWS_PER_BYTE) == 0 else f"Kin={kin} too small for the LUT kernel"
    if kin % max(w.group_size, MIN_BLOCK_K):
        return f"Kin={kin} is not a multiple of max(group_size, {MIN_BLOCK_K})"
    return None


def auto_path(m: int) -> str:
    return "lut" if m == 1 else ("gemv" if m <= tiling.GEMV_MAX_ROWS else "tiled")


def default_config(m: int, kin: int, n: int, group_size: int, path: str | None = None) -> Config:
    """Launch shape of the dequantize kernel: k float32 alpha tiles stay live per step, so N
    tiles are kept at most 64 wide."""
    cfg = tiling.default_config(m, kin, n, group_size, path, min_block_k=MIN_BLOCK_K)
    return dataclasses.replace(cfg, block_n=min(cfg.block_n, 64))


def _bcq_dequant_kernel(x_ref, planes_ref, alpha_ref, offset_ref, *refs, m: int, n: int, bits: int,
                        group_size: int, block_k: int):
    """One [BM, BN] output tile over one K split.

    Refs: x [BM, Ks/8, 8] (x.dtype; [..., j] the Kin columns = j mod 8), planes [Ks/8, k, BN]
    uint8, alpha [Ks/gs, k, BN] float16, offset [Ks/gs, BN] float16, out [BM, BN].
    """
    out_ref = refs[-1]
    block_m, block_n = out_ref.shape
    byte_rows = block_k // ROWS_PER_BYTE  # per K step
    groups_per_step = block_k // group_size
    rows_per_group = group_size // ROWS_PER_BYTE
    n_steps = planes_ref.shape[0] // byte_rows
    row_ok, col_ok = tiling.tile_masks(block_m, block_n, m, n)

    def step(kb, acc):
        rows = pl.ds(kb * byte_rows, byte_rows)
        groups = pl.ds(kb * groups_per_step, groups_per_step)
        per_group = lambda ref, *idx: tiling.load_group_rows(ref, groups, idx, col_ok, rows_per_group)  # noqa: E731
        offset = per_group(offset_ref)  # [BK/8, BN]
        alphas = [per_group(alpha_ref, jnp.int32(i)) for i in range(bits)]  # k x [BK/8, BN]
        planes = [plt.load(planes_ref.at[rows, jnp.int32(i), :], mask=col_ok, other=0)
                  for i in range(bits)]  # k x [BK/8, BN] uint8
        for j in range(ROWS_PER_BYTE):  # weight rows 8r + j of this step
            w_j = None
            for i in range(bits):  # sum_i alpha_i b_i, then + offset (the reference's order)
                sign = ((planes[i] >> j) & 1).astype(jnp.float32) * 2.0 - 1.0
                w_j = alphas[i] * sign if w_j is None else w_j + alphas[i] * sign
            w_j = w_j + offset
            x_j = plt.load(x_ref.at[:, rows, jnp.int32(j)], mask=row_ok, other=0)  # [BM, BK/8]
            acc += plt.dot(x_j, w_j.astype(x_j.dtype))
        return acc

    tiling.accumulate_and_store(step, n_steps, (block_m, block_n), out_ref, row_ok & col_ok)


@functools.partial(jax.jit, static_argnames=("interpret", "config", "path"))
def matmul_dequant(x: jax.Array, w: BCQArray, *, interpret: bool = False, config: Config | None = None,
                   path: str | None = None, out_init: jax.Array | None = None) -> jax.Array:
    """x [M, Kin] @ w (BCQArray (Kin, N), axis 0) -> [M, N] in x.dtype; dequantize in the kernel.

    config: launch shape (default `default_config(..., path)`, path "gemv" | "tiled" | None).
    out_init: optional buffer aliased to the kernel output, see `tiling.launch_packed_matmul`.
    """
    reason = unsupported_reason(x.shape, w)
    if reason:
        raise ValueError(f"BCQ kernel cannot take this product: {reason}")
    (m, kin), n, gs = x.shape, w.shape[1], w.group_size
    cfg = config or default_config(m, kin, n, gs, path)
    tiling.check_config(cfg, kin, gs, MIN_BLOCK_K)
    body = functools.partial(_bcq_dequant_kernel, m=m, n=n, bits=w.bits, group_size=gs, block_k=cfg.block_k)
    weights = [(w.planes, ROWS_PER_BYTE), (w.alpha, gs), (w.offset, gs)]
    return tiling.launch_packed_matmul(body, x, weights, n=n, x_rows_per_entry=ROWS_PER_BYTE, cfg=cfg,
                                       interpret=interpret, out_init=out_init, name="uniql_bcq_dequant")


# ---------------------------------------------------------------------------
# LUT-GEMM for batch 1
# ---------------------------------------------------------------------------

LUT_SIZE = 1 << ROWS_PER_BYTE  # 256 sign patterns of 8 weights


@dataclasses.dataclass(frozen=True)
class LutConfig:
    block_n: int = 128
    block_k: int = 256  # Kin rows per step (BK/8 byte rows of lookups)
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def default_lut_config(kin: int, n: int, group_size: int) -> LutConfig:
    block_n = min(128, max(16, next_pow2(n)))
    block_k = tiling.pick_block_k(kin, group_size, 256, 2 * ROWS_PER_BYTE)
    n_steps, splits = kin // block_k, 1
    while n_steps % (splits * 2) == 0 and math.ceil(n / block_n) * splits < tiling.TARGET_PROGRAMS:
        splits *= 2
    return LutConfig(block_n=block_n, block_k=block_k, k_splits=splits)


def signed_sum_table(x_row: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [Kin] -> (T [Kin/8 * 256] float32 flat, xsum [Kin/8] float32).

    T[r * 256 + p] = sum_j x[8r + j] * (2 bit_j(p) - 1): the signed sum of 8 activations
    for every sign pattern p, with weight 8r+j in bit j as in the planes.
    """
    xr = x_row.astype(jnp.float32).reshape(-1, ROWS_PER_BYTE)  # [Kin/8, 8]
    p = jnp.arange(LUT_SIZE, dtype=jnp.int32)
    signs = 2.0 * ((p[None, :] >> jnp.arange(ROWS_PER_BYTE, dtype=jnp.int32)[:, None]) & 1) - 1.0  # [8, 256]
    table = jnp.dot(xr, signs, precision=jax.lax.Precision.HIGHEST)  # [Kin/8, 256]
    return table.reshape(-1), xr.sum(axis=1)


def _bcq_lut_kernel(table_ref, xsum_ref, planes_ref, alpha_ref, offset_ref, *refs, n: int, bits: int,
                    group_size: int, block_k: int):
    """One BN-wide block of y over one K split.

    Refs: table [Kin/8 * 256] float32 (whole), xsum [Ks/8] float32, planes [Ks/8, k, BN] uint8,
    alpha [Ks/gs, k, BN] float16, offset [Ks/gs, BN] float16, out [BN] (row and split squeezed).
    """
    out_ref = refs[-1]
    block_n = out_ref.shape[-1]
    byte_rows = block_k // ROWS_PER_BYTE
    groups_per_step = block_k // group_size
    rows_per_group = group_size // ROWS_PER_BYTE
    split_byte_rows = planes_ref.shape[0]
    n_steps = split_byte_rows // byte_rows
    col_ok = lane_mask(pl.program_id(0) * block_n, block_n, n)[None, :]  # [1, BN]
    split_row0 = pl.program_id(1) * split_byte_rows  # first byte row (of the whole table) of this split

    def step(kb, acc):
        rows = pl.ds(kb * byte_rows, byte_rows)
        groups = pl.ds(kb * groups_per_step, groups_per_step)
        per_group = lambda ref, *idx: tiling.load_group_rows(ref, groups, idx, col_ok, rows_per_group)  # noqa: E731
        # table row of each byte row of this step, as a flat offset: [BK/8, 1]
        table_row = (split_row0 + kb * byte_rows + jax.lax.broadcasted_iota(jnp.int32, (byte_rows, 1), 0)) * LUT_SIZE
        for i in range(bits):
            byte = plt.load(planes_ref.at[rows, jnp.int32(i), :], mask=col_ok, other=0)  # [BK/8, BN] uint8
            looked_up = table_ref[table_row + byte.astype(jnp.int32)]  # [BK/8, BN] gather
            acc += per_group(alpha_ref, jnp.int32(i)) * looked_up
        xsum = xsum_ref[rows]  # [BK/8]
        acc += per_group(offset_ref) * xsum[:, None]
        return acc

    tiling.accumulate_and_store(step, n_steps, (byte_rows, block_n), out_ref, col_ok[0], reduce_rows=True)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def matmul_lut(x: jax.Array, w: BCQArray, *, interpret: bool = False, config: LutConfig | None = None,
               out_init: jax.Array | None = None) -> jax.Array:
    """x [1, Kin] @ w -> [1, N] in x.dtype by table lookups (LUT-GEMM), float32 throughout.

    out_init: optional buffer aliased to the kernel output: [1, N] x.dtype, or [S, 1, N]
    float32 partial sums with S = config.k_splits > 1.
    """
    reason = unsupported_reason(x.shape, w, "lut")
    if reason:
        raise ValueError(f"BCQ LUT kernel cannot take this product: {reason}")
    kin, n, gs = w.shape[0], w.shape[1], w.group_size
    cfg = config or default_lut_config(kin, n, gs)
    if cfg.block_k % max(gs, 2 * ROWS_PER_BYTE) or not is_pow2(cfg.block_k) or kin % (cfg.block_k * cfg.k_splits):
        raise ValueError(f"{cfg} does not tile Kin={kin} with group size {gs}")
    table, xsum = signed_sum_table(x[0])
    split_rows = kin // cfg.k_splits
    in_specs = [
        pl.BlockSpec(table.shape, lambda j, s: (0,)),
        pl.BlockSpec((split_rows // ROWS_PER_BYTE,), lambda j, s: (s,)),
        pl.BlockSpec((split_rows // ROWS_PER_BYTE, w.bits, cfg.block_n), lambda j, s: (s, 0, j)),
        pl.BlockSpec((split_rows // gs, w.bits, cfg.block_n), lambda j, s: (s, 0, j)),
        pl.BlockSpec((split_rows // gs, cfg.block_n), lambda j, s: (s, j)),
    ]
    if cfg.k_splits == 1:
        out_shape = jax.ShapeDtypeStruct((1, n), x.dtype)
        out_spec = pl.BlockSpec((pl.squeezed, cfg.block_n), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.k_splits, 1, n), jnp.float32)
        out_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, cfg.block_n), lambda j, s: (s, 0, j))
    args = [table, xsum, w.planes, w.alpha, w.offset]
    aliases = alias_initial_outputs(args, in_specs, [out_shape], [out_spec], None if out_init is None else [out_init])
    out = pl.pallas_call(
        functools.partial(_bcq_lut_kernel, n=n, bits=w.bits, group_size=gs, block_k=cfg.block_k),
        out_shape=out_shape,
        grid=(math.ceil(n / cfg.block_n), cfg.k_splits),
        in_specs=in_specs,
        out_specs=out_spec,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        name="uniql_bcq_lut",
    )(*args)
    if cfg.k_splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out


def lut_out_shape(cfg: LutConfig, n: int, dtype):
    """Shape and dtype of the LUT kernel's own output (what `out_init` must match)."""
    return ((cfg.k_splits, 1, n), jnp.dtype(jnp.float32)) if cfg.k_splits > 1 else ((1, n), jnp.dtype(dtype))
