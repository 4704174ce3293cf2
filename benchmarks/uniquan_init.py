"""UniQuan unified initialization: wall time (compile and run apart) and quality per weight shape.

    python -m benchmarks.uniquan_init [--blocks 1,29] [--random] [--baseline 1e60491]
        [--out benchmarks/cpu-uniquan-init.json]

Times ``uniquan.unified_init`` (4 bits, 10 clipping ratios x 2 starts x 15 rounds) on the MLP
weights of SmolLM2-135M (gate / up [576 -> 1536] in groups of 96, down [1536 -> 576] in
groups of 128: the groups the UniQuan driver gives them, ``plan.group_size_for``), or on
random Student-t weights of those shapes with ``--random`` (no model load). The first call
of each shape is lowering + compilation (``jit(...).lower(...).compile()``), then the run
time is the median of ``--repeats`` calls.

``--baseline <commit>`` runs the implementation of that commit side by side in the same
process (its ``quant/bcq_fit.py`` and ``quant/uniquan.py`` read with ``git show``), and
compares quality on the same weights: the init's weight error (sum of squared errors of
the folded BCQ weight, and the share of rows within 0.1 % of the baseline's), and, for real
blocks, the block reconstruction loss after init (MSE of the MLP block's output against
the float block, on inputs drawn from the embedding table: random token ids, not hidden
states propagated through the model). The JSON records the host load: on a shared CPU the
absolute times move with it; the side-by-side ratio is the number to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import timed_call
from benchmarks.real_model import REPO, SMOLLM2
from uniql_jax.quant import bcq_fit, uniquan
from uniql_jax.quant.plan import group_size_for

BITS = 4
MLP_WEIGHTS = ("gate", "up", "down")


def load_baseline(commit: str):
    """The ``uniquan`` module of ``commit`` (with that commit's ``bcq_fit``), imported under other names."""
    folder = Path(tempfile.mkdtemp(prefix="uniquan-baseline-"))

    def load(name, path, replace=()):
        src = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout
        for old, new in replace:
            src = src.replace(old, new)
        (folder / f"{name}.py").write_text(src)
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    load("bcq_fit_baseline", "uniql_jax/quant/bcq_fit.py")
    return load("uniquan_baseline", "uniql_jax/quant/uniquan.py",
                [("from uniql_jax.quant import bcq_fit\n", "import bcq_fit_baseline as bcq_fit\n")])


def time_init(module, W, group_size: int, repeats: int):
    """(compile s, median run s, output) of module.unified_init on W."""
    t0 = time.perf_counter()
    compiled = module.unified_init.lower(W, bits=BITS, group_size=group_size).compile()
    compile_s = time.perf_counter() - t0
    runs, out = [], None
    for _ in range(repeats):
        out, dt = timed_call(compiled, W)
        runs.append(dt)
    return compile_s, float(np.median(runs)), out


def folded(W, init):
    qp, qb = init
    return uniquan.fold_to_bcq(W, qp, qb, scale_dtype=jnp.float32).dequantize()


def row_errors(W, w_hat, group_size: int) -> np.ndarray:
    return np.asarray(jnp.sum(bcq_fit.to_rows((w_hat - W) ** 2, group_size, 0), -1), np.float64)


def weights(args):
    """[(block index, {name: float32 W}), ...], the model config and params (None with --random)."""
    if args.random:
        rng = np.random.default_rng(0)
        shapes = {"gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
        blocks = [(i, {n: jnp.asarray(rng.standard_t(4.0, s) * 0.02, jnp.float32) for n, s in shapes.items()})
                  for i in args.blocks]
        return blocks, None, None
    from converters import hf

    t0 = time.perf_counter()
    cfg, params = hf.load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    blocks = []
    for i in args.blocks:
        if cfg.blocks[i].kind != "mlp":
            raise SystemExit(f"block {i} is {cfg.blocks[i].kind}, not an MLP block")
        blocks.append((i, {n: jnp.asarray(params["blocks"][i][n], jnp.float32) for n in MLP_WEIGHTS}))
    return blocks, cfg, params


def block_loss(cfg, params, i, quantized: dict, tokens) -> float:
    """MSE of the MLP block's output with the quantized weights against the float block."""
    from uniql_jax.compress import calibration
    from uniql_jax.quant.uniquan_driver import block_apply

    fp = calibration.as_float32(params["blocks"][i])
    apply_fn = jax.jit(block_apply(cfg, cfg.blocks[i]))
    x = jnp.asarray(params["embed"], jnp.float32)[tokens]  # [B, T, D]
    y = apply_fn(fp, x)
    return float(jnp.mean((apply_fn({**fp, **quantized}, x) - y) ** 2))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.uniquan_init", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOLLM2), help="HF folder or .gguf file (default: the shared SmolLM2-135M)")
    p.add_argument("--blocks", default="1,29", help="MLP block indices (SmolLM2: odd indices 1..59)")
    p.add_argument("--random", action="store_true", help="random Student-t weights of the SmolLM2 MLP shapes")
    p.add_argument("--baseline", default=None, help="commit whose unified_init runs side by side")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per weight (median)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/<platform>-uniquan-init[-random].json)")
    args = p.parse_args(argv)
    args.blocks = [int(b) for b in args.blocks.split(",")]
    baseline = load_baseline(args.baseline) if args.baseline else None
    blocks, cfg, params = weights(args)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(4, 128)) if cfg else None
    implementations = {"current": uniquan} | ({f"baseline {args.baseline}": baseline} if baseline else {})
    rows, losses = [], []
    t_all = time.perf_counter()
    for i, ws in blocks:
        quantized = {name: {} for name in implementations}
        for n, W in ws.items():
            g = group_size_for([W.shape[0]], 128)
            row = {"block": i, "weight": n, "shape": list(W.shape), "group_size": g}
            errs = {}
            for name, module in implementations.items():
                compile_s, run_s, init = time_init(module, W, g, args.repeats)
                w_hat = folded(W, init)
                quantized[name][n] = w_hat
                errs[name] = row_errors(W, w_hat, g)
                row[name] = {"compile_s": round(compile_s, 2), "run_s": round(run_s, 2),
                             "weight_sq_error": float(errs[name].sum())}
                print(f"block {i} {n} {tuple(W.shape)} g{g} {name}: compile {compile_s:.2f} s, run {run_s:.2f} s, "
                      f"weight error {errs[name].sum():.6e}", flush=True)
            if baseline:
                base, cur = errs[f"baseline {args.baseline}"], errs["current"]
                row["speedup_run"] = round(row[f"baseline {args.baseline}"]["run_s"] / row["current"]["run_s"], 2)
                row["error_ratio_current_to_baseline"] = float(cur.sum() / base.sum())
                row["rows_within_0.1pct"] = float(np.mean(np.abs(cur - base) <= 1e-3 * base))
                row["rows_better_by_0.1pct"] = float(np.mean(cur < base * (1 - 1e-3)))
                row["rows_worse_by_0.1pct"] = float(np.mean(cur > base * (1 + 1e-3)))
                print(f"  run speedup {row['speedup_run']}x, error ratio {row['error_ratio_current_to_baseline']:.6f}, "
                      f"rows within 0.1 %: {row['rows_within_0.1pct']:.4f}", flush=True)
            rows.append(row)
        if cfg is not None:
            entry = {"block": i} | {name: block_loss(cfg, params, i, q, tokens) for name, q in quantized.items()}
            losses.append(entry)
            print(f"block {i} reconstruction loss after init: {entry}", flush=True)
    result = {"model": "random Student-t" if args.random else args.model, "bits": BITS,
              "clip_ratios": list(uniquan.DEFAULT_CLIP_RATIOS), "rounds": 15, "repeats": args.repeats,
              "baseline": args.baseline, "weights": rows, "block_loss_after_init": losses,
              "block_loss_inputs": None if args.random else "embedding rows of random token ids, [4, 128]",
              "host": platform.node(), "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "jax": jax.__version__, "platform": jax.devices()[0].platform,
              "wall_s": round(time.perf_counter() - t_all, 1)}
    out = Path(args.out or REPO / "benchmarks" / f"{result['platform']}-uniquan-init{'-random' if args.random else ''}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
