"""Benchmark the W4A16 kernel against XLA's bf16 dot and XLA dequantize-then-dot.

GPU:  python -m pallas_kernels.w4a16.bench            (Llama-3.1-8B shapes, batch 1, 4, 16, 64)
      python -m pallas_kernels.w4a16.bench --sweep    (also a few alternative launch shapes)
CPU:  python -m pallas_kernels.w4a16.bench --small    (interpret mode smoke run)
Writes benchmarks/w4a16_<device>[_small].json.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import bench_util, tiling
from pallas_kernels.w4a16 import api, kernel, reference
from uniql_jax.quant.formats.qarray import QArray

GROUP_SIZE = 128
SMALL_SHAPES = ((256, 128), (128, 200))
SMALL_BATCHES = (1, 20)


def make_weight(key, kin, n, group_size=GROUP_SIZE):
    """Random 4-bit QArray (Kin, N): any byte is a valid pair of codes."""
    k_codes, k_scales = jax.random.split(key)
    codes = jax.random.bits(k_codes, (kin // 2, n), jnp.uint8)
    scales = jax.random.uniform(k_scales, (kin // group_size, n), jnp.float32, 1e-3, 2e-2).astype(jnp.float16)
    return QArray(codes, scales, 4, group_size, 0, (kin, n))


def kernels(interpret: bool) -> dict:
    """{path: select(batch) -> fn(x, w)}: the kernel through its dispatcher, so that the rows'
    `ran` field (`common.dispatch_log`) proves the kernel, not the reference, was timed."""
    return {"pallas": lambda batch: functools.partial(api.matmul, implementation="pallas", interpret=interpret)}


def sweep_configs(batch, kin, n):
    """A few alternatives to the default launch shape (GPU tuning aid)."""
    if batch <= tiling.GEMV_MAX_ROWS:
        base = kernel.default_config(batch, kin, n, GROUP_SIZE, "gemv")
        return [tiling.Config(16, bn, bk, splits) for bn in (32, 64, 128) for bk in (128, 256, 512)
                for splits in (1, base.k_splits) if kin % (bk * splits) == 0]
    return [tiling.Config(bm, bn, 128, 1, warps) for bm, bn, warps in ((32, 64, 4), (64, 64, 4), (128, 128, 8))]


def main():
    sweep = "--sweep" in sys.argv
    if sweep:
        sys.argv.remove("--sweep")
    args = bench_util.parse_args(__doc__, bench_util.LLAMA_8B_SHAPES, bench_util.LLAMA_8B_BATCHES,
                                 SMALL_SHAPES, SMALL_BATCHES)
    rows = bench_util.bench_packed_matmul("w4a16", args, make_weight, kernels(args.interpret), reference.matmul)
    if sweep:
        for kin, n in args.shapes:
            for batch in args.batches:
                sub = dict(args.__dict__)
                alt = {f"cfg{c.block_m}x{c.block_n}x{c.block_k}s{c.k_splits}w{c.num_warps}":
                       (lambda batch, c=c: functools.partial(kernel.matmul, interpret=args.interpret, config=c))
                       for c in sweep_configs(batch, kin, n)}
                sub_args = type(args)(**{**sub, "shapes": [(kin, n)], "batches": [batch]})
                rows += bench_util.bench_packed_matmul("w4a16", sub_args, make_weight, alt, reference.matmul)
    path = bench_util.write_report("w4a16", args, rows, notes=f"4-bit QArray, group size {GROUP_SIZE}, bf16 activations.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
