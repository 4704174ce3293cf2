"""Compile time against run time of a perplexity grid on a real model: whole-model programs vs block programs.

    python -m benchmarks.eval_compile [--model ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--windows 20] [--seq-len 512] [--before-rates 0,0.35] [--out benchmarks/cpu-eval-compile-smollm2.json]

The rate table is the one compress would store (block-influence allocation with the
quantization-compatible rounding steps, from a few WikiText-2 validation windows), so
layers keep different sizes, as they do in a real run. Sorting does not change any
shape, so the model is not sorted here.

* before: ``eval.window_nll``, one program for the whole model per rate: its
  ``lower().compile()`` time and the run time over the windows, for `--before-rates`
  (each costs a full compile, so not the whole grid by default);
* after: ``uq.perplexity`` (block programs, ``eval.blockwise_nll``) over the whole
  grid twice; the first pass compiles, the second only runs, and compile time is the
  difference. The number of programs compiled is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import uniql_jax as uq
from benchmarks.real_model import REPO, add_model_and_data_args
from uniql_jax import data
from uniql_jax.compress.allocate import default_steps
from uniql_jax.eval import blockwise_nll, window_nll, windows
from uniql_jax.models.stacks import block_key
from uniql_jax.quant.plan import allocation_steps

RATES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_compile", description=__doc__.split("\n")[0])
    add_model_and_data_args(p)
    p.add_argument("--before-rates", default="0,0.35", help="rates timed with whole-model programs (default 0,0.35)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "cpu-eval-compile-smollm2.json"), help="JSON output")
    return p


def main(argv=None):
    from converters import hf

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    cfg, params = hf.load(args.model)
    tok = hf.load_tokenizer(args.model)
    tokens = data.load_tokens(args.eval, tok)[: args.windows * args.seq_len]
    calib = data.calibration_windows(data.load_tokens(args.calib, tok), 8, args.seq_len, seed=0)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    table = uq.allocate(cfg, params, calib, list(RATES), steps=allocation_steps(cfg, 128, default_steps(cfg)))
    print(f"allocated in {time.perf_counter() - t0:.1f} s", flush=True)
    result = {"model": args.model, "windows": args.windows, "seq_len": args.seq_len, "rates": list(RATES),
              "host": platform.node(), "cpus": os.cpu_count(), "jax": jax.__version__,
              "distinct_block_shapes": len({block_key(cfg, b) for r in RATES for b in table[r]})}

    before = []
    for r in [float(x) for x in args.before_rates.split(",") if x]:
        small, p = uq.prune(cfg, params, r, table)
        wins = windows(tokens, args.seq_len)
        batch = wins[:4]
        t0 = time.perf_counter()
        compiled = window_nll.lower(small, p, batch).compile()
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(0, len(wins) - 3, 4):
            np.asarray(compiled(p, wins[s:s + 4]))
        before.append({"rate": r, "compile_s": round(t_compile, 2), "run_s": round(time.perf_counter() - t0, 2)})
        print("before", before[-1], flush=True)
    result["before_whole_model"] = before

    passes = []
    for _ in range(2):
        start_programs, t_pass, rows = blockwise_nll.compiles(), time.perf_counter(), []
        for r in RATES:
            small, p = uq.prune(cfg, params, r, table)
            t0 = time.perf_counter()
            ppl = uq.perplexity(small, p, tokens, seq_len=args.seq_len, batch_size=4)
            rows.append({"rate": r, "ppl": ppl, "s": round(time.perf_counter() - t0, 2)})
        passes.append({"wall_s": round(time.perf_counter() - t_pass, 2),
                       "programs_compiled": blockwise_nll.compiles() - start_programs, "rates": rows})
        print("after pass", passes[-1]["wall_s"], passes[-1]["programs_compiled"], flush=True)
    result["after_block_programs"] = {"first_pass": passes[0], "second_pass": passes[1],
                                      "compile_s": round(passes[0]["wall_s"] - passes[1]["wall_s"], 2),
                                      "run_s": passes[1]["wall_s"]}
    if before:
        per_rate = np.mean([b["compile_s"] for b in before])
        result["before_whole_model_grid_estimate"] = {
            "compile_s": round(per_rate * len(RATES), 1),
            "run_s": round(np.mean([b["run_s"] for b in before]) * len(RATES), 1),
            "note": f"mean of the {len(before)} measured rates times {len(RATES)} rates"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "after_block_programs"}, indent=2))
    print(json.dumps({k: v for k, v in result["after_block_programs"].items() if "pass" not in k}))


if __name__ == "__main__":
    main()
