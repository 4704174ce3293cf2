"""Benchmark the fused RoPE kernel against the XLA reference (rope_angles + apply_rope, jitted).

GPU:  python -m pallas_kernels.rope.bench            (Llama-3.1-8B heads: K=8, G=4, P0=64)
CPU:  python -m pallas_kernels.rope.bench --small    (interpret mode smoke run)
Shapes are BxT (batch x tokens): decode B x 1 and prefill 1 x T; each at kept pairs P = 64
(unpruned), 48 and 40 (25 % / 37.5 % of the head dim pruned). Writes
benchmarks/rope_<device>[_small].json.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import bench_util
from pallas_kernels.common import dispatch_log
from pallas_kernels.rope import api

KV_HEADS, GROUPS, FULL_PAIRS = 8, 4, 64  # Llama-3.1-8B
KEPT_PAIRS = (64, 48, 40)
SHAPES = ((1, 1), (4, 1), (16, 1), (64, 1), (1, 512), (1, 2048), (4, 2048))
SMALL_SHAPES = ((1, 1), (2, 9))
SMALL_KEPT_PAIRS = (12,)
COLUMNS = ("batch", "tokens", "pairs", "kernel_us", "xla_us", "kernel_GBps", "speedup_vs_xla", "max_rel_err")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def make_inputs(key, batch, tokens, pairs, dtype=jnp.bfloat16):
    kq, kk, kp, ki = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, tokens, KV_HEADS, GROUPS, 2, pairs), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, tokens, KV_HEADS, 2, pairs), jnp.float32).astype(dtype)
    positions = jax.random.randint(kp, (batch, tokens), 0, 8192, jnp.int32)
    # a random order of the pairs per kv head (argsort of uniforms: one cheap sort)
    pair_index = jnp.argsort(jax.random.uniform(ki, (KV_HEADS, FULL_PAIRS)), axis=-1)[:, :pairs].astype(jnp.int32)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(FULL_PAIRS, dtype=jnp.float32) / FULL_PAIRS))
    return q, k, positions, pair_index, inv_freq


def bench(args, kept_pairs) -> list[dict]:
    """One row per (batch, tokens) of args.shapes and kept pair count: the fused kernel and the
    XLA reference, both through `api.rope` (each row's `ran` records what the dispatcher ran)."""
    fused = functools.partial(api.rope, implementation="pallas", interpret=args.interpret)
    xla = functools.partial(api.rope, implementation="xla")
    rows = []
    for batch, tokens in args.shapes:
        for pairs in kept_pairs:
            inputs = make_inputs(bench_util.bench_key(batch * 10007 + tokens + pairs), batch, tokens, pairs)
            qk_bytes = bench_util.nbytes(inputs[:2])
            copies = [inputs] + [make_inputs(bench_util.bench_key(c), batch, tokens, pairs)
                                 for c in range(1, bench_util.copies_for(qk_bytes))]
            # positions shifted per call (no two calls identical), q/k rotating through the copies
            arg_sets = [(*copies[c % len(copies)][:2], copies[c % len(copies)][2] + c, *inputs[3:])
                        for c in range(args.calls)]
            with dispatch_log() as log:
                t, got = bench_util.time_calls(fused, arg_sets, repeats=args.repeats)
            t_xla, want = bench_util.time_calls(xla, arg_sets, repeats=args.repeats)
            err = max(bench_util.max_rel_err(g, w) for g, w in zip(got, want))  # first call: copies[0] in both
            moved = 2 * qk_bytes + bench_util.nbytes(inputs[2:])  # q, k read and written once
            rows.append(dict(op="rope", batch=batch, tokens=tokens, pairs=pairs, kv_heads=KV_HEADS, groups=GROUPS,
                             dtype="bfloat16", kernel_us=t * 1e6, xla_us=t_xla * 1e6, kernel_GBps=moved / t / 1e9,
                             xla_GBps=moved / t_xla / 1e9, speedup_vs_xla=t_xla / t, max_rel_err=err,
                             ran=dict(log.counts)))
            bench_util.print_rows(rows[-1:], COLUMNS, header=False)
    return rows


def main():
    args = bench_util.parse_args(__doc__, SHAPES, (), SMALL_SHAPES, ())
    bench_util.print_rows([], COLUMNS)
    rows = bench(args, SMALL_KEPT_PAIRS if args.small else KEPT_PAIRS)
    path = bench_util.write_report("rope", args, rows, notes="Fused RoPE (q and k in one kernel) vs XLA reference.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
