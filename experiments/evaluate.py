"""Perplexity (or lm-eval accuracy) of a compressed checkpoint over a grid of pruning rates.

    python -m experiments.evaluate --ckpt runs/llama-.../ [--rates 0,0.25] [--eval FILE] [--seq-len 256] [--json]
    python -m experiments.evaluate --ckpt runs/llama-.../ --rates 0,0.15,0.25,0.35 --tasks hellaswag,piqa
        [--num-fewshot K] [--limit N] [--tasks-dir DIR] [--out DIR] [--json]

The full-rank model is read once; each rate is sliced in memory and evaluated block by
block, one compiled program per distinct block shape shared by all rates (the compile
count is reported). With --tasks, each rate is one lm-eval run through the `uniql`
backend (uniql_jax/harness.py) instead: a table (rows rates, columns tasks and their
average), the same rows as JSON and a plot, written to --out (default: the run folder)
as accuracy.json and accuracy.png.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from experiments import common
from uniql_jax import distributed
from uniql_jax.paths import user_path

log = logging.getLogger("evaluate")


def build_parser():
    p = common.Parser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="output folder of experiments.compress (or its checkpoint/ folder)")
    p.add_argument("--rates", help="comma-separated rates to evaluate (default: every stored rate)")
    p.add_argument("--eval", help="evaluation text file or dataset id (default: the one recorded at compression)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the one recorded at compression)")
    p.add_argument("--eval-windows", type=int,
                   help="evaluate on the first N windows only (default: the number recorded at compression; 0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="windows (with --tasks: requests) per device per step (default 8)")
    p.add_argument("--json", action="store_true", help="print the rates list as JSON on stdout instead of a table")
    common.add_task_args(p)
    p.add_argument("--out", help="with --tasks: folder for accuracy.json and accuracy.png (default: the run folder)")
    distributed.add_flags(p)  # every process loads the checkpoint; process 0 prints and writes
    return p


def run(argv=None):
    args = build_parser().parse_args(argv)
    common.setup_logging()
    distributed.initialize_from_args(args)  # before any JAX work; nothing to do for one process
    mesh = distributed.global_mesh(args.model_axis)
    distributed.use_mesh(mesh)
    # --model-axis K > 1: the checkpoint is read sharded over the mesh, each process reading only its shards
    load_mesh = mesh if args.model_axis > 1 else None
    if not distributed.is_main():
        logging.getLogger("evaluate").setLevel(logging.WARNING)
    from uniql_jax import checkpoint, data, pipeline

    run_dir, ckpt = pipeline.checkpoint_dir(args.ckpt)
    info = checkpoint.read_info(ckpt)
    stored = sorted(info.table) or [0.0]
    rates = common.parse_rates(args.rates) if args.rates else stored
    for r in rates:
        checkpoint.resolve_rate(info.cfg, info.table, r)  # out of range / not stored: one-line error before any work
    if args.tasks:
        return run_tasks(args, run_dir, ckpt, rates, load_mesh)
    seq_len = args.seq_len or int(info.meta.get("seq_len", 256))
    tokenizer = pipeline.load_saved_tokenizer(run_dir)
    eval_spec = args.eval or info.meta.get("eval_source")
    tokens = data.token_source(eval_spec, tokenizer, "heldout")
    eval_windows = info.meta.get("eval_windows", 0) if args.eval_windows is None else args.eval_windows
    if eval_windows:
        tokens = tokens[: eval_windows * seq_len]
    rows, compiles = pipeline.checkpoint_perplexity(ckpt, rates, tokens, seq_len=seq_len, batch_size=args.batch_size,
                                                    mesh=load_mesh)
    log.info("%d rates evaluated with %d compiled evaluation programs", len(rates), compiles)
    if not distributed.is_main():  # process 0 prints
        return rows, compiles
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'rate':>6} {'ppl':>10} {'params':>10} {'MB':>8}")
        for row in rows:
            print(f"{row['rate']:>6.2f} {row['ppl']:>10.4f} {row['params']:>10d} {row['param_bytes'] / 1e6:>8.3f}")
    return rows, compiles


def run_tasks(args, run_dir: Path, ckpt: Path, rates, load_mesh=None):
    """lm-eval accuracy at every rate from one loaded checkpoint -> (rows, programs compiled)."""
    import time

    from uniql_jax import accuracy, pipeline
    from uniql_jax.elastic import ElasticModel

    start = time.perf_counter()
    names, manager = common.load_tasks(args)  # unknown / unreachable task: one line, exit 2, before loading the model
    out = user_path(args.out) if args.out else run_dir
    tokenizer = pipeline.load_saved_tokenizer(run_dir)
    model = ElasticModel.from_checkpoint(ckpt, mesh=load_mesh)
    result = {"ckpt": str(ckpt)} | accuracy.accuracy_report(model, tokenizer, rates, names, manager,
                                                            num_fewshot=args.num_fewshot, limit=args.limit,
                                                            batch_size=args.batch_size, log=log.info)
    rows, compiles = result["rates"], sum(result["compiles"].values())
    log.info("%d rates x %d tasks in %.0f s; %d compiled scoring programs (per bucket length: %s)", len(rates),
             len(names), time.perf_counter() - start, compiles, result["compiles"])
    if not distributed.is_main():  # process 0 writes and prints
        return rows, compiles
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "accuracy.json", result)
    common.save_accuracy_plot(rows, out / "accuracy.png", title=f"{run_dir.name}: lm-eval accuracy")
    log.info("wrote %s and %s", out / "accuracy.json", out / "accuracy.png")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(accuracy.accuracy_table(rows))
    return rows, compiles


def main(argv=None):
    common.main_guard(lambda: run(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
