"""W4A16 group-wise matmul (Pallas, Triton GPU backend or interpret mode).

Computes y [M, N] = x [M, Kin] @ W [Kin, N] where W is stored as a 4-bit `QArray`
(two codes per byte along Kin, even row in the low nibble; float16 scale per group of
`group_size` rows): W[k, n] = s[k // group_size, n] * (code[k, n] - 8), or with a zero point
(`ZeroPointQArray`, float16 offset per group) W[k, n] = s[g, n] * code[k, n] + o[g, n],
g = k // group_size: the offsets are one more per-group input, loaded like the scales.

Each program owns a [BM, BN] output tile and walks its share of Kin in blocks of BK rows
(BK a multiple of the group size): it loads BK/2 packed bytes per column, splits them into
the even rows (low nibbles) and odd rows (high nibbles), scales both by their group's scale,
casts to the activation dtype and accumulates two MMAs in float32,

    acc += x[:, even rows] @ W_even + x[:, odd rows] @ W_odd,

so the unpacked weight never exists in HBM and nibbles are never interleaved in registers.
The activation columns are split the same way for free by viewing x as [M, Kin/2, 2].
Launch shapes (GEMV-shaped split-K for decode, tiled for prefill): `pallas_kernels.tiling`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import tiling
from pallas_kernels.common import is_pow2
from pallas_kernels.tiling import Config  # noqa: F401  (re-exported: callers pass kernel.Config)
from uniql_jax.quant.formats.qarray import QArray

MIN_BLOCK_K = 2 * tiling.MIN_MMA  # BK/2 byte rows feed an MMA's K dimension


def unsupported_reason(x_shape, w: QArray) -> str | None:
    """Why the kernel cannot take this product (None if it can); callers then use the reference."""
    if w.bits != 4:
        return f"bits={w.bits} (kernel is 4-bit only)"
    if w.ndim != 2 or w.axis != 0:
        return "weight must be 2-D and quantized along axis 0"
    kin = w.shape[0]
    if x_shape[-1] != kin or len(x_shape) != 2:
        return f"x {tuple(x_shape)} is not [M, {kin}]"
    if not is_pow2(w.group_size):
        return f"group_size {w.group_size} is not a power of two"
    if kin % max(w.group_size, MIN_BLOCK_K):
        return f"Kin={kin} is not a multiple of max(group_size, {MIN_BLOCK_K})"
    return None


def default_config(m: int, kin: int, n: int, group_size: int, path: str | None = None) -> Config:
    return tiling.default_config(m, kin, n, group_size, path, min_block_k=MIN_BLOCK_K)


def _w4a16_kernel(x_ref, codes_ref, scales_ref, *refs, m: int, n: int, group_size: int, block_k: int,
                  has_offset: bool):
    """One [BM, BN] output tile over one K split.

    Refs: x [BM, Ks/2, 2] (x.dtype; [..., 0] even and [..., 1] odd Kin columns),
    codes [Ks/2, BN] uint8, scales [Ks/gs, BN] float16, [offsets [Ks/gs, BN] float16 if
    has_offset], out [BM, BN]; Ks = Kin / k_splits. Any ref between the weight refs and out
    is an aliased initial output.
    """
    out_ref = refs[-1]
    offset_ref = refs[0] if has_offset else None
    block_m, block_n = out_ref.shape
    half_k = block_k // 2  # packed byte rows per K step
    groups_per_step = block_k // group_size
    n_steps = codes_ref.shape[0] // half_k
    row_ok, col_ok = tiling.tile_masks(block_m, block_n, m, n)  # [BM, 1], [1, BN]
    even, odd = jnp.int32(0), jnp.int32(1)

    def step(kb, acc):
        rows = pl.ds(kb * half_k, half_k)
        x_even = plt.load(x_ref.at[:, rows, even], mask=row_ok, other=0)  # [BM, BK/2]
        x_odd = plt.load(x_ref.at[:, rows, odd], mask=row_ok, other=0)  # [BM, BK/2]
        packed = plt.load(codes_ref.at[rows, :], mask=col_ok, other=0)  # [BK/2, BN] uint8
        # each group's scale over its gs/2 byte rows: [BK/2, BN]
        groups = pl.ds(kb * groups_per_step, groups_per_step)
        scale = tiling.load_group_rows(scales_ref, groups, (), col_ok, group_size // 2)
        if has_offset:  # w = s * code + o (qarray.grid_values)
            offset = tiling.load_group_rows(offset_ref, groups, (), col_ok, group_size // 2)
            w_even = (packed & 0xF).astype(jnp.float32) * scale + offset  # rows k0, k0+2, ...
            w_odd = (packed >> 4).astype(jnp.float32) * scale + offset  # rows k0+1, k0+3, ...
        else:  # w = s * (code - 8)
            w_even = ((packed & 0xF).astype(jnp.float32) - 8.0) * scale  # rows k0, k0+2, ...
            w_odd = ((packed >> 4).astype(jnp.float32) - 8.0) * scale  # rows k0+1, k0+3, ...
        acc += plt.dot(x_even, w_even.astype(x_even.dtype))
        acc += plt.dot(x_odd, w_odd.astype(x_odd.dtype))
        return acc

    tiling.accumulate_and_store(step, n_steps, (block_m, block_n), out_ref, row_ok & col_ok)


@functools.partial(jax.jit, static_argnames=("interpret", "config", "path"))
def matmul(x: jax.Array, w: QArray, *, interpret: bool = False, config: Config | None = None,
           path: str | None = None, out_init: jax.Array | None = None) -> jax.Array:
    """x [M, Kin] @ w (4-bit QArray (Kin, N), axis 0, with or without zero point) -> [M, N] in x.dtype,
    float32 accumulation.

    config: launch shape (default: `default_config(..., path)`, path "gemv" | "tiled" | None=auto).
    out_init: optional buffer aliased to the kernel output, see `tiling.launch_packed_matmul`.
    """
    reason = unsupported_reason(x.shape, w)
    if reason:
        raise ValueError(f"W4A16 kernel cannot take this product: {reason}")
    (m, kin), n, gs = x.shape, w.shape[1], w.group_size
    cfg = config or default_config(m, kin, n, gs, path)
    tiling.check_config(cfg, kin, gs, MIN_BLOCK_K)
    has_offset = w.offset is not None
    body = functools.partial(_w4a16_kernel, m=m, n=n, group_size=gs, block_k=cfg.block_k, has_offset=has_offset)
    weights = [(w.codes, 2), (w.scales, gs)] + ([(w.offset, gs)] if has_offset else [])
    return tiling.launch_packed_matmul(body, x, weights, n=n, x_rows_per_entry=2, cfg=cfg,
                                       interpret=interpret, out_init=out_init, name="uniql_w4a16")
