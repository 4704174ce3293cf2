"""Compress a model once into an elastic checkpoint: convert -> sort -> allocate -> [finetune] -> quantize -> evaluate.

    python -m experiments.compress --arch nemotron_h            # the embedded tiny default
    python -m experiments.compress --arch llama --model DIR --rates 0,0.15,0.25,0.35

Writes into --out: the Orbax checkpoint, report.json and report.png (API.md).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from experiments import common

DEFAULT_RATES = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.35"


def build_parser():
    import uniql_jax as uq

    p = common.Parser(prog="python -m experiments.compress", description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, choices=uq.ARCHS, help="model family")
    p.add_argument("--model", help="HF checkpoint folder or Hub id (default: the arch's embedded tiny model)")
    p.add_argument("--out", help="output folder (default: runs/<arch>-<timestamp>); must not exist")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quantizer", choices=("gptq", "uniquan", "rtn", "none"), default="gptq",
                   help="weight quantizer applied after sorting (default gptq)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group along the input dim (reduced to fit narrow matrices; default 128)")
    p.add_argument("--finetune-steps", type=int, default=0, help="masked LoRA steps (0: no fine-tuning)")
    p.add_argument("--finetune-data", help="text or JSON-lines instruction file for fine-tuning")
    p.add_argument("--calib", help="calibration text file or dataset id (default: the TinyStories training split)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration / evaluation window")
    p.add_argument("--rates", default=DEFAULT_RATES, help=f"pruning-rate grid stored and evaluated (default {DEFAULT_RATES})")
    p.add_argument("--eval", help="evaluation text file or dataset id (default: held-out TinyStories)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and fine-tuning")
    return p


def run(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    rates = common.parse_rates(args.rates)
    out = Path(args.out or f"runs/{args.arch}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and not args.overwrite:
        raise common.UsageError(f"output directory {out} exists (pass --overwrite to replace it)")
    if args.bits not in (2, 3, 4, 8):
        raise common.UsageError(f"--bits must be 2, 3, 4 or 8, got {args.bits}")

    import numpy as np

    import uniql_jax as uq
    from uniql_jax.eval import perplexity
    from uniql_jax.quant.qarray import nbytes

    timer = common.Timer()
    with timer.stage("convert"):
        cfg, params, tokenizer, source = common.load_model(args.arch, args.model)
    eval_tokens = common.eval_stream(args.eval, tokenizer)
    with timer.stage("evaluate"):
        base_ppl = perplexity(cfg, params, eval_tokens, seq_len=args.seq_len)
    n_params = int(sum(np.prod(x.shape) for x in __import__("jax").tree.leaves(params) if x.dtype != np.int32))
    report = {
        "arch": cfg.arch, "model": source, "quantizer": args.quantizer, "bits": args.bits,
        "group_size": args.group_size, "seed": args.seed, "seq_len": args.seq_len,
        "timings_s": timer.timings,
        "rates": [{"rate": 0.0, "ppl": base_ppl, "param_bytes": 2 * n_params, "params": n_params}],
        "baseline": {"ppl": base_ppl, "param_bytes": 2 * n_params, "params": n_params},
    }
    del uq, nbytes, rates  # stages wired in as they land
    with common.staged_output(out, args.overwrite) as tmp:
        common.write_json(tmp / "report.json", report)
    print(f"baseline perplexity {base_ppl:.4f}; wrote {out}")
    return out


def main(argv=None):
    common.main_guard(lambda: run(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
