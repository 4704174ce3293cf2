"""UniQL's channel order and allocation against their baselines on a real model, 16-bit, one run.

    python -m benchmarks.real_model_baselines [--model ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--rates 0.15,0.25,0.35] [--calib-windows 32] [--out benchmarks/cpu-real-model-baselines-smollm2.json]

Perplexity (WikiText-2 test, first `--windows` windows of `--seq-len`) of the model pruned at
each rate, with

* UniQL's sorted order, a random order and a weight-magnitude order, all under the same
  block-influence allocation table (``compress.sort.compare_orders``);
* UniQL's order under a uniform allocation (every layer keeps the same share),
  ``ppl["uniql_uniform"]``.

Calibration (sorting statistics and block influence): `--calib-windows` windows from
WikiText-2 valid. No quantization, no fine-tuning: the order and the allocation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax

from benchmarks.real_model import REPO, add_model_and_data_args
from uniql_jax import data
from uniql_jax.compress.sort import compare_orders


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_model_baselines", description=__doc__.split("\n")[0])
    add_model_and_data_args(p)
    p.add_argument("--rates", default="0.15,0.25,0.35", help="pruning rates (default 0.15,0.25,0.35)")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling and random order (default 0)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "cpu-real-model-baselines-smollm2.json"), help="JSON output")
    return p


def main(argv=None):
    from converters import hf

    args = build_parser().parse_args(argv)
    t_all = time.perf_counter()
    rates = [float(r) for r in args.rates.split(",")]
    cfg, params = hf.load(args.model)
    tok = hf.load_tokenizer(args.model)
    tokens = data.load_tokens(args.eval, tok)[: args.windows * args.seq_len]
    calib = data.calibration_windows(data.load_tokens(args.calib, tok), args.calib_windows, args.seq_len,
                                     seed=args.seed)
    res = compare_orders(cfg, params, calib, tokens, rates, seq_len=args.seq_len, seed=args.seed, progress=True,
                         other_allocations=("uniform",))
    res.pop("table")
    out = {"model": args.model, "rates": rates, "windows": args.windows, "seq_len": args.seq_len,
           "calib_windows": args.calib_windows, **res, "host": platform.node(), "cpus": os.cpu_count(),
           "load_average_1min": os.getloadavg()[0], "jax": jax.__version__, "wall_s": time.perf_counter() - t_all}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"dense": out["dense_ppl"], **out["ppl"], "wall_s": out["wall_s"]}, indent=1))


if __name__ == "__main__":
    main()
