"""Timing and reporting shared by the per-op `bench.py` scripts.

Timing method: one jitted program makes `calls` independent calls of the function, each on a
different activation and on rotating copies of the large inputs (distinct buffers, together
larger than the GPU's L2 cache), so that (a) Python dispatch is paid once per program, not per call,
which matters for microsecond decode kernels, and (b) a weight is read from HBM, not from L2,
as it is in a real decode step. Reported time = median over repeats of program time / calls.

On CPU (`--small`) the kernels run in Pallas interpret mode: those numbers only prove that
the script works; they say nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.common import dispatch_log, on_gpu

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
L2_BYTES_TO_DEFEAT = 128 << 20  # > 2x the 50 MiB L2 of an H100
LLAMA_8B_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024))  # (Kin, N): qkv/o, up/gate, down, k/v
LLAMA_8B_BATCHES = (1, 4, 16, 64)


def bench_key(seed: int) -> jax.Array:
    """A PRNG key for benchmark data. "rbg" (XLA's RngBitGenerator) compiles in a fraction of
    threefry's time on CPU, and benchmark data needs no cross-platform reproducibility."""
    return jax.random.key(seed, impl="rbg")


def device_kind() -> str:
    return jax.devices()[0].device_kind


def device_slug() -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3' (JSON file names are per device)."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind().lower()).strip("_") or jax.default_backend()


def copies_for(bytes_per_copy: int, max_copies: int = 32) -> int:
    """How many input copies to rotate through so that together they exceed L2 (1 on CPU)."""
    if not on_gpu():
        return 1
    return int(min(max_copies, max(2, math.ceil(L2_BYTES_TO_DEFEAT / max(bytes_per_copy, 1)))))


def time_calls(fn: Callable, arg_sets: Sequence[tuple], *, repeats: int):
    """(median seconds per call, output of the first call): fn called once on each arg set,
    all calls in one compiled program.

    The arg sets must be pairwise distinct (e.g. a different x per call): XLA merges identical
    computations, which would make repeated calls free and the timing wrong.
    """

    def many(arg_sets):
        return [fn(*args) for args in arg_sets]

    program = jax.jit(many)
    first = jax.block_until_ready(program(arg_sets))[0]  # compile + warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(arg_sets))
        samples.append((time.perf_counter() - start) / len(arg_sets))
    return statistics.median(samples), first


def nbytes(*trees) -> int:
    """Bytes of all array leaves (packed weights count their stored arrays)."""
    return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize for tree in trees for leaf in jax.tree.leaves(tree))


def parse_args(description: str, default_shapes, default_batches, small_shapes, small_batches):
    """Common CLI: --small (CPU-sized, interpret mode), --shapes KxN,..., --batches 1,4,..."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU / interpret mode smoke run)")
    ap.add_argument("--shapes", type=str, default=None, help="comma list of AxB shapes, e.g. 4096x4096,4096x14336")
    ap.add_argument("--batches", type=str, default=None, help="comma list of batch sizes, e.g. 1,4,16,64")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    ap.add_argument("--calls", type=int, default=None, help="kernel calls per timed program")
    ap.add_argument("--out-dir", type=Path, default=BENCH_DIR)
    args = ap.parse_args()
    if args.shapes:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        args.shapes = list(small_shapes if args.small else default_shapes)
    if args.batches:
        args.batches = [int(b) for b in args.batches.split(",")]
    else:
        args.batches = list(small_batches if args.small else default_batches)
    args.repeats = args.repeats or (2 if args.small else 20)
    args.calls = args.calls or (1 if args.small else 32)
    args.interpret = not on_gpu()
    return args


def report(op: str, args, rows: list[dict], notes: str = "") -> dict:
    """The rows and the run's context, as `write_report` stores them."""
    return {
        "op": op,
        "device": device_kind(),
        "backend": jax.default_backend(),
        "interpret": args.interpret,
        "small": args.small,
        "jax_version": jax.__version__,
        "timing": f"median of {args.repeats} repeats of {args.calls} calls in one program, rotating input copies",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes + (" Interpret mode on CPU: timings are not kernel performance." if args.interpret else ""),
        "rows": rows,
    }


def write_report(op: str, args, rows: list[dict], notes: str = "") -> Path:
    """benchmarks/<op>_<device>[_small].json with the rows and the run's context."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{op}_{device_slug()}{'_small' if args.small else ''}.json"
    path.write_text(json.dumps(report(op, args, rows, notes), indent=1))
    return path


def print_rows(rows: list[dict], columns: Sequence[str], header: bool = True):
    if header:
        print(" ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(" ".join(f"{row[c]:>14.4g}" if isinstance(row[c], float) else f"{row[c]!s:>14}" for c in columns))


def max_rel_err(got, want) -> float:
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-30))


MATMUL_COLUMNS = ("kin", "n", "batch", "path", "kernel_us", "kernel_GBps", "speedup_vs_bf16_dot",
                  "speedup_vs_dequant_dot", "max_rel_err_vs_reference")


def bench_packed_matmul(op: str, args, make_weight: Callable, kernels: dict[str, Callable],
                        dequant_dot: Callable, dtype=jnp.bfloat16) -> list[dict]:
    """Rows for a packed-weight matmul at every (Kin, N) x batch of `args`.

    make_weight(key, kin, n) -> packed weight (Kin, N); kernels: {path name: select(batch) ->
    fn(x, w) or None (path not run at this batch)}; dequant_dot(x, w): the XLA
    dequantize-then-dot baseline. The bf16 dot baseline multiplies x by the dequantized weight.
    Each row's `ran` holds `common.dispatch_log` counts of the timed program's trace: a
    kernel reached through its dispatcher shows "<op>/pallas" there, a fallback (only
    implementation="auto" falls back; the benches ask for "pallas", which raises instead)
    "<op>/fallback".
    """
    from uniql_jax.quant.formats.packed import dense as dense_weight  # dequantize any packed format

    rows = []
    key = bench_key(0)
    print(" ".join(f"{c:>14}" for c in MATMUL_COLUMNS))
    for kin, n in args.shapes:
        w0 = make_weight(jax.random.fold_in(key, kin * 7 + n), kin, n)
        w_bytes = nbytes(w0)
        dense_bytes = kin * n * jnp.dtype(dtype).itemsize
        n_w = copies_for(w_bytes)
        n_dense = copies_for(dense_bytes, max_copies=4)
        weights = [w0] + [make_weight(jax.random.fold_in(key, 1000 + c), kin, n) for c in range(1, n_w)]
        dense = [jax.jit(dense_weight, static_argnums=1)(weights[c % n_w], dtype) for c in range(n_dense)]
        for batch in args.batches:
            # a different x per call (no two calls identical), weights rotating through the copies
            xs = [jax.random.normal(jax.random.fold_in(key, batch * 1000 + c), (batch, kin), jnp.float32).astype(dtype)
                  for c in range(args.calls)]
            x_bytes, y_bytes = batch * kin * jnp.dtype(dtype).itemsize, batch * n * jnp.dtype(dtype).itemsize
            dense_sets = [(x, dense[c % n_dense]) for c, x in enumerate(xs)]
            packed_sets = [(x, weights[c % n_w]) for c, x in enumerate(xs)]
            t_dense, _ = time_calls(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype),
                                    dense_sets, repeats=args.repeats)
            t_deq, want = time_calls(dequant_dot, packed_sets, repeats=args.repeats)
            for path, select in kernels.items():
                fn = select(batch)
                if fn is None:
                    continue
                with dispatch_log() as log:  # which implementation the timed calls ran
                    t, got = time_calls(fn, packed_sets, repeats=args.repeats)
                err = max_rel_err(got, want)  # first call: xs[0] @ weights[0] in both
                moved = w_bytes + x_bytes + y_bytes
                rows.append(dict(
                    op=op, kin=kin, n=n, batch=batch, path=path, dtype=jnp.dtype(dtype).name,
                    kernel_us=t * 1e6, bf16_dot_us=t_dense * 1e6, dequant_dot_us=t_deq * 1e6,
                    kernel_GBps=moved / t / 1e9, bf16_dot_GBps=(dense_bytes + x_bytes + y_bytes) / t_dense / 1e9,
                    speedup_vs_bf16_dot=t_dense / t, speedup_vs_dequant_dot=t_deq / t,
                    weight_MB=w_bytes / 1e6, max_rel_err_vs_reference=err, ran=dict(log.counts),
                ))
                print_rows(rows[-1:], MATMUL_COLUMNS, header=False)
    return rows
