"""Benchmark the BCQ kernels against XLA's bf16 dot and XLA dequantize-then-dot.

GPU:  python -m pallas_kernels.bcq.bench            (Llama-3.1-8B shapes, batch 1, 4, 16, 64)
CPU:  python -m pallas_kernels.bcq.bench --small    (interpret mode smoke run)
Paths: "lut" (LUT-GEMM, batch 1 only) and "dequant" (dequantize in the kernel; gemv launch
for batch <= 16, tiled above); 4 bit-planes, group size 128, bf16 activations.
Writes benchmarks/bcq_<device>[_small].json.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import bench_util, tiling
from pallas_kernels.bcq import api, reference
from uniql_jax.quant.formats.bcq import BCQArray

BITS, GROUP_SIZE = 4, 128
SMALL_SHAPES = ((256, 128), (128, 200))
SMALL_BATCHES = (1, 20)


def make_weight(key, kin, n, bits=BITS, group_size=GROUP_SIZE):
    """Random BCQArray (Kin, N): random planes, alpha halving per plane, small offsets."""
    k_planes, k_alpha, k_offset = jax.random.split(key, 3)
    planes = jax.random.bits(k_planes, (kin // 8, bits, n), jnp.uint8)
    halving = 2.0 ** -jnp.arange(bits, dtype=jnp.float32)[None, :, None]
    alpha = (jax.random.uniform(k_alpha, (kin // group_size, bits, n), jnp.float32, 5e-3, 2e-2) * halving)
    offset = jax.random.uniform(k_offset, (kin // group_size, n), jnp.float32, -1e-3, 1e-3)
    return BCQArray(planes, alpha.astype(jnp.float16), offset.astype(jnp.float16), bits, group_size, 0, (kin, n))


def kernels(interpret: bool) -> dict:
    """{path: select(batch) -> fn(x, w) or None}: the kernels through their dispatcher (the
    rows' `ran` field, from `common.dispatch_log`, proves which one was timed)."""
    pallas = functools.partial(api.matmul, implementation="pallas", interpret=interpret)
    return {
        "lut": lambda batch: functools.partial(pallas, path="lut") if batch == 1 else None,
        "dequant": lambda batch: functools.partial(pallas, path="gemv" if batch <= tiling.GEMV_MAX_ROWS else "tiled"),
    }


def main():
    args = bench_util.parse_args(__doc__, bench_util.LLAMA_8B_SHAPES, bench_util.LLAMA_8B_BATCHES,
                                 SMALL_SHAPES, SMALL_BATCHES)
    rows = bench_util.bench_packed_matmul("bcq", args, make_weight, kernels(args.interpret), reference.matmul)
    path = bench_util.write_report("bcq", args, rows,
                                   notes=f"BCQ {BITS} bit-planes, group size {GROUP_SIZE}, bf16 activations.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
