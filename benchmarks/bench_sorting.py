"""Benchmarks of UniQL stage 1 (structured sorting); JSON under benchmarks/, named after the device.

    python -m benchmarks.bench_sorting importance [--models stories260K,llama,mamba2] [--rates 0.15,0.25,0.35]
    python -m benchmarks.bench_sorting modegpt [--widths 1024,2048,4096,8192]
    python -m benchmarks.bench_sorting layer8b [--layers 2] [--windows 4] [--seq-len 256]

importance: perplexity at each rate for UniQL's order against a random channel order and a
    weight-magnitude order, all pruned with the same block-influence allocation (docs/method.md,
    "Stage 1: MLP" claims the sorted order matters; this measures it).
modegpt: UniQL's MLP sorting (one float32 ridge-leverage solve, then slicing) against a
    MoDeGPT-style rebuild (Lin et al. 2024: Nyström reconstruction of down_proj with an FP64
    pseudo-inverse, once per rate of the grid), on random MLPs of width F (hidden D = F / 4),
    given the same correlation C. Reports both times, their ratio, and the output error of each
    at each rate (what the reconstruction buys).
layer8b: stage-1 time and peak memory per decoder layer at Llama-3.1-8B shapes (D 4096, 32 query /
    8 kv heads of 128, MLP 14336; random weights), a few layers, extrapolated to 32 layers.

Output: benchmarks/<platform>-sorting-<command>.json (--out to change). tests/compress/test_importance.py
runs the same comparison (``compress.sort.importance_comparison``) on a smaller budget. On a shared, oversubscribed CPU run
the timings with OPENBLAS_NUM_THREADS=1: threaded OpenBLAS then spends most of its time waiting (a
1024-wide Cholesky measured 10x slower with 2 threads at a load average of 15); the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

GRID = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)  # the paper's rate grid


def device_tag() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"}


def write(res: dict, name: str, out: str | None):
    path = Path(out or f"benchmarks/{res['platform']}-sorting-{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- importance
def importance_row(name: str, rates, *, calib_samples: int, seq_len: int, eval_tokens: int | None = None,
                   seed: int = 0) -> dict:
    """One model's importance comparison (``compress.sort.importance_comparison``): calibration windows
    from the TinyStories training documents, perplexity on the held-out documents."""
    from uniql_jax.compress.sort import importance_comparison
    from uniql_jax.pipeline import load_named_model

    cfg, params, tok, source = load_named_model(name)
    row = importance_comparison(cfg, params, tok, rates, calib_samples=calib_samples, seq_len=seq_len,
                                eval_tokens=eval_tokens, seed=seed)
    return {"model": name, "source": source, **row}


def importance(args) -> dict:
    from uniql_jax.paths import InputError

    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    for name in args.models.split(","):
        try:
            row = importance_row(name, rates, calib_samples=args.calib_samples, seq_len=args.seq_len,
                                 eval_tokens=args.eval_tokens, seed=args.seed)
        except InputError as e:
            print(f"skipping {name}: {e}", flush=True)
            continue
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("model", "dense_ppl", "ppl", "wall_s")}), flush=True)
    return {"benchmark": "sorting_importance", **device_tag(), "allocation": "block_influence", "results": rows}


# ----------------------------------------------------------------------------- MoDeGPT comparison
def modegpt(args) -> dict:
    from uniql_jax.compress import lowrank
    from uniql_jax.compress.modegpt import modegpt_rebuild, output_error, synthetic_mlp

    rates = [float(r) for r in args.rates.split(",")]
    lowrank.ridge_leverage(np.eye(8, dtype=np.float32))  # imports and first-call setup outside the timings
    rows = []
    for F in (int(w) for w in args.widths.split(",")):
        D = F // 4
        C, W = synthetic_mlp(F, D, seed=F)
        uniql_runs = []
        for _ in range(args.repeats):  # best of a few: the machine may be shared
            t0, c0 = time.perf_counter(), time.process_time()
            scores = lowrank.ridge_leverage(C, 1.0)
            order = lowrank.descending_order(np.asarray(scores))
            W_sorted = W[order]  # the down_proj rows (gate/up columns follow the same order)
            uniql_runs.append((time.perf_counter() - t0, time.process_time() - c0))
        t_uniql, cpu_uniql = min(uniql_runs)
        t_rebuild, cpu_rebuild, err_uniql, err_modegpt, measured = [], [], [], [], []
        for i, r in enumerate(rates):
            k = int(round((1 - r) * F))
            kept = order[:k]
            err_uniql.append(output_error(C, W, kept, W_sorted[:k]))
            if F > args.max_measured_width and 0 < i < len(rates) - 1:
                t_rebuild.append(None), cpu_rebuild.append(None), err_modegpt.append(None), measured.append(False)
                continue  # large widths: only the extreme rates are rebuilt, the rest extrapolated below
            t1, c1 = time.perf_counter(), time.process_time()
            W_new = modegpt_rebuild(C, W, kept)
            t_rebuild.append(time.perf_counter() - t1)
            cpu_rebuild.append(time.process_time() - c1)
            err_modegpt.append(output_error(C, W, kept, W_new))
            measured.append(True)
        # unmeasured rates: the rebuild is dominated by the k x k FP64 eigendecomposition, t = c k^3
        ks = np.array([round((1 - r) * F) for r in rates], np.float64)
        for times in (t_rebuild, cpu_rebuild):
            c = np.mean([t / k ** 3 for t, k, m in zip(times, ks, measured) if m])
            times[:] = [t if m else float(c * k ** 3) for t, k, m in zip(times, ks, measured)]
        # MoDeGPT scores channels the same way, then rebuilds down_proj for every rate
        t_modegpt, cpu_modegpt = t_uniql + sum(t_rebuild), cpu_uniql + sum(cpu_rebuild)
        row = {"width": F, "hidden": D, "uniql_s": t_uniql, "modegpt_s": t_modegpt, "ratio": t_modegpt / t_uniql,
               "uniql_cpu_s": cpu_uniql, "modegpt_cpu_s": cpu_modegpt, "ratio_cpu": cpu_modegpt / cpu_uniql,
               "modegpt_rebuild_s": t_rebuild, "rebuild_measured": measured, "rates": rates,
               "output_error_uniql": err_uniql,
               "output_error_modegpt": err_modegpt}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("width", "uniql_s", "modegpt_s", "ratio", "ratio_cpu")}), flush=True)
    return {"benchmark": "sorting_vs_modegpt_mlp", **device_tag(), "results": rows,
            "note": "time of the sorting / reconstruction step given the calibration correlation C "
                    "(collecting C costs the same for both); MoDeGPT-style = ridge-leverage selection + "
                    "FP64 pinv Nyström rebuild of down_proj for every rate of the grid"}


# ----------------------------------------------------------------------------- Llama-3.1-8B layer shapes
def llama8b_config(layers: int):
    """The first `layers` layers of Llama-3.1-8B's shape (vocab 256: the embedding is not what is measured)."""
    from benchmarks.benchmark import SHAPES
    from uniql_jax.config import layout_config

    _, shape = SHAPES["llama3_8b"]
    return layout_config("llama", **{**shape, "layers": layers, "vocab_size": 256, "max_position_embeddings": 8192})


def layer8b(args) -> dict:
    import jax
    import jax.numpy as jnp

    from uniql_jax.compress import calibration
    from uniql_jax.compress.sort import SORTERS
    from uniql_jax.models.stacks import init_params

    cfg = llama8b_config(args.layers)
    params = init_params(cfg, 0)  # std 0.02 weights, unit norms (int32 RoPE pair indices kept as they are)
    calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.windows, args.seq_len)).astype(np.int32)
    per_block = []

    def on_block(i, blk, stats):
        tracemalloc.start()
        t0, c0 = time.perf_counter(), time.process_time()
        out = SORTERS[blk.kind].sort_block(cfg, blk, params["blocks"][i], stats)
        jax.block_until_ready(out)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        per_block.append({"block": i, "kind": blk.kind, "layer": blk.layer, "solve_s": time.perf_counter() - t0,
                          "solve_cpu_s": time.process_time() - c0, "solve_peak_host_bytes": peak,
                          "stats_bytes": int(sum(np.asarray(v).nbytes for v in stats.values()))})
        print(json.dumps(per_block[-1]), flush=True)

    collectors = {kind: s.collect for kind, s in SORTERS.items()}
    t0, c0 = time.perf_counter(), time.process_time()
    run = calibration.run_blocks(cfg, params, calib, collectors, on_block, batch_size=args.batch_size, progress=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    t = run["timings_s"]
    calib_per_layer = t["blocks"] / args.layers  # includes one compile per block kind (first layer)
    solve_per_layer = t["on_block"] / args.layers
    tokens = args.windows * args.seq_len
    res = {"benchmark": "sorting_llama31_8b_layers", **device_tag(), "layers": args.layers,
           "calibration_tokens": tokens, "per_block": per_block, "timings_s": t, "wall_s": wall, "cpu_s": cpu,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "per_layer_s": {"calibration": calib_per_layer, "solve": solve_per_layer},
           "extrapolated_32_layers_s": {
               "solve": 32 * solve_per_layer,
               "calibration_at_these_tokens": 32 * calib_per_layer,
               "calibration_at_128x2048_tokens": 32 * calib_per_layer * (128 * 2048) / tokens,
           },
           "note": "calibration time scales with the number of calibration tokens; the solve does not. "
                   "Peak host bytes of a solve are measured with tracemalloc (NumPy/SciPy buffers); "
                   "peak_rss covers the whole process (weights, residual stream, XLA)."}
    del jnp
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_sorting", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("importance")
    p.add_argument("--models", default="stories260K,llama,mamba2,nemotron_h,bamba,qwen2")
    p.add_argument("--rates", default="0.15,0.25,0.35")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="score only the first N held-out tokens (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    p = sub.add_parser("modegpt")
    p.add_argument("--widths", default="1024,2048,4096,8192")
    p.add_argument("--rates", default=",".join(map(str, GRID)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-measured-width", type=int, default=4096,
                   help="above this width only the first and last rate are rebuilt; the others are extrapolated")
    p.add_argument("--out")
    p = sub.add_parser("layer8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out")
    args = ap.parse_args(argv)
    res = {"importance": importance, "modegpt": modegpt, "layer8b": layer8b}[args.cmd](args)
    write(res, args.cmd, args.out)


if __name__ == "__main__":
    main()
