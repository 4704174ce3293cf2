"""Compress a model once into an elastic checkpoint: convert -> sort -> allocate -> [finetune] -> quantize -> evaluate.

    python -m experiments.compress --arch nemotron_h            # the embedded tiny default
    python -m experiments.compress --model DIR_OR_GGUF --calib FILE --eval FILE --rates 0,0.15,0.25,0.35

With --model, the arch is read from the checkpoint (config.json's model_type or the GGUF's
architecture) and the data default to WikiText-2 (train for calibration, test for
evaluation) through `datasets`; the embedded defaults calibrate on TinyStories.

Writes into --out: the Orbax checkpoint, the tokenizer, report.json and report.png (docs/api.md).
Nothing is left in --out when a stage fails. The stages are the library's
(``uniql_jax.pipeline.compress``); this module parses the flags, resolves paths and defaults,
and writes the outputs.
"""

from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

from experiments import common
from uniql_jax import distributed
from uniql_jax.paths import user_path

DEFAULT_RATES = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.35"
WIKITEXT2 = "Salesforce/wikitext:wikitext-2-raw-v1"  # the default data of --model (a dataset id)
log = logging.getLogger("compress")


def build_parser():
    import uniql_jax as uq
    from uniql_jax.pipeline import FINETUNE_BATCH, FINETUNE_MICRO_BATCHES, CompressConfig

    p = common.Parser(prog="python -m experiments.compress", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=uq.ARCHS,
                   help="model family: picks the embedded tiny default model; with --model it is read from the "
                        "checkpoint (an explicit --arch must agree)")
    p.add_argument("--model", help="HF checkpoint folder, Hub id or .gguf file (default: the arch's embedded tiny model)")
    p.add_argument("--out", help="output folder (default: runs/<arch>-<timestamp>); refused if it exists")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quantizer", choices=("gptq", "uniquan", "rtn", "none"), default="gptq",
                   help="weight quantizer applied after sorting and fine-tuning (default gptq)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group along the input dim; reduced per matrix to a multiple of 8 that "
                        "divides every kept size of that dim, so pruning slices whole groups (default 128)")
    p.add_argument("--keep-embeddings-16bit", action="store_true", help="do not quantize embeddings and lm_head")
    p.add_argument("--embedding-bits", type=int, choices=(2, 3, 4, 8),
                   help="bits of the embedding table and an untied lm_head (default: --bits)")
    p.add_argument("--tied-head", choices=("gptq", "rtn"), default="gptq",
                   help="a tied embedding table is also the output head: quantize it with GPTQ on the final "
                        "hidden states (gptq, default) or per row with round-to-nearest (rtn); --quantizer gptq only")
    p.add_argument("--quantizer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the quantizer's driver, repeatable, e.g. --quantizer-option steps=2560 for "
                        "uniquan (its keys: steps, lr, alpha_lr_ratio, windows_per_step, mix_prob, period, "
                        "head_steps, seed)")
    p.add_argument("--act-order", action="store_true",
                   help="gptq: quantize columns in order of decreasing Hessian diagonal (groups stay contiguous)")
    p.add_argument("--zero-point", action="store_true",
                   help="uniform grids with a per-group offset (min/max, like GGUF Q4_1) instead of symmetric ones; "
                        "--quantizer gptq or rtn")
    p.add_argument("--finetune-steps", type=int, default=0, help="masked LoRA steps (default 0: no fine-tuning)")
    p.add_argument("--finetune-data", help="text or JSON-lines (Alpaca) file for fine-tuning (default: calibration text)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="peak learning rate of the LoRA adapters (default 1e-3)")
    micro = CompressConfig.finetune_micro_batch
    p.add_argument("--finetune-micro-batch", type=int, default=micro,
                   choices=FINETUNE_MICRO_BATCHES,
                   help=f"windows per micro-batch of each {FINETUNE_BATCH}-window fine-tuning step; the micro-batch "
                        "gradients are accumulated (the same gradient), and smaller micro-batches need less memory "
                        "(SmolLM2: 4 peaks at 2.12 GB against 2.56 GB for 8, at the same step time; 2 at 2.05 GB, "
                        f"+12 %% step time) (default {micro})")
    p.add_argument("--calib", help="calibration text file or dataset id NAME[:CONFIG][@SPLIT] (default: the TinyStories "
                                   f"training part; with --model {WIKITEXT2}@train)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration / evaluation window (default 256)")
    p.add_argument("--rates", default=DEFAULT_RATES, help=f"pruning-rate grid stored and evaluated (default {DEFAULT_RATES})")
    p.add_argument("--allocation", choices=("block_influence", "uniform"), default="block_influence",
                   help="layer-wise allocation of each global rate (default block_influence)")
    p.add_argument("--eval", help="evaluation text file or dataset id (default: held-out TinyStories; with --model "
                                  f"{WIKITEXT2}@test)")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="evaluate on the first N windows of --eval only (default 0: all of it)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and fine-tuning (default 0)")
    common.add_task_args(p)  # --tasks ...: lm-eval accuracy per rate into report.json / report.png
    distributed.add_flags(p)  # --coordinator / --num-processes / --process-id / --model-axis
    return p


def check_args(args):
    from uniql_jax.compress.allocate import MAX_PRUNE

    rates = common.parse_rates(args.rates)
    if rates[-1] > MAX_PRUNE:
        raise common.UsageError(f"--rates above {MAX_PRUNE:g} are not supported, got {rates[-1]:g}")
    if 0.0 not in rates:
        rates = [0.0] + rates
    if args.bits not in (2, 3, 4, 8):
        raise common.UsageError(f"--bits must be 2, 3, 4 or 8, got {args.bits}")
    if args.group_size < 8 or args.group_size % 8:
        raise common.UsageError(f"--group-size must be a positive multiple of 8, got {args.group_size}")
    if args.eval_windows < 0:
        raise common.UsageError("--eval-windows must be >= 0")
    for name in ("calib_samples", "seq_len"):
        if getattr(args, name) < 2:
            raise common.UsageError(f"--{name.replace('_', '-')} must be at least 2")
    if args.finetune_steps < 0:
        raise common.UsageError("--finetune-steps must be >= 0")
    if not args.finetune_lr > 0:
        raise common.UsageError(f"--finetune-lr must be positive, got {args.finetune_lr:g}")
    if args.model is None and args.arch is None:
        raise common.UsageError("pass --arch (an embedded default model) or --model (your checkpoint)")
    for name in ("model", "calib", "eval", "finetune_data"):  # local files: absolute where they enter
        value = getattr(args, name)
        if value and user_path(value).exists():
            setattr(args, name, str(user_path(value)))
    if args.model is not None:
        from converters import hf

        arch = "llama" if args.model.endswith(".bin") else hf.arch_of(args.model)  # .bin: a llama2.c model
        if args.arch is not None and args.arch != arch:
            raise common.UsageError(f"--model {args.model} is a {arch} checkpoint, not {args.arch}")
        args.arch = arch
    out = user_path(args.out or f"runs/{args.arch}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    args.quantizer_options = quantizer_options(args.quantizer, args.quantizer_option)
    if args.act_order and args.quantizer != "gptq":
        raise common.UsageError(f"--act-order applies to --quantizer gptq, not {args.quantizer}")
    if args.zero_point and args.quantizer not in ("gptq", "rtn"):
        raise common.UsageError(f"--zero-point applies to --quantizer gptq or rtn, not {args.quantizer}")
    if out.exists() and not args.overwrite:
        raise common.UsageError(f"output directory {out} exists (pass --overwrite to replace it)")
    return rates, out


def quantizer_options(method: str, pairs: list[str]) -> tuple:
    """((key, value), ...) of --quantizer-option KEY=VALUE, each value parsed as its default's type."""
    from uniql_jax.quant.quantize import method_options

    allowed = method_options(method)
    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise common.UsageError(f"--quantizer-option {pair!r}: expected KEY=VALUE")
        if key not in allowed:
            raise common.UsageError(f"--quantizer-option {key!r}: --quantizer {method} takes "
                                    f"{', '.join(sorted(allowed)) if allowed else 'no options'}")
        kind = type(allowed[key]) if allowed[key] is not None else int
        try:
            out.append((key, kind(text)))
        except ValueError:
            raise common.UsageError(f"--quantizer-option {key}={text!r}: not a {kind.__name__}") from None
    return tuple(out)


def pipeline_config(args, rates):
    """The library's CompressConfig of the parsed flags (arch and paths already resolved by check_args)."""
    from uniql_jax.pipeline import CompressConfig

    return CompressConfig(
        arch=args.arch, model=args.model, quantizer=args.quantizer, bits=args.bits, group_size=args.group_size,
        keep_embeddings_16bit=args.keep_embeddings_16bit, embedding_bits=args.embedding_bits,
        tied_head=args.tied_head, zero_point=args.zero_point, act_order=args.act_order, quantizer_options=args.quantizer_options,
        finetune_steps=args.finetune_steps, finetune_data=args.finetune_data,
        finetune_lr=args.finetune_lr, finetune_micro_batch=args.finetune_micro_batch, calib=args.calib,
        calib_samples=args.calib_samples, seq_len=args.seq_len,
        rates=tuple(rates), allocation=args.allocation, eval=args.eval, eval_windows=args.eval_windows,
        seed=args.seed, default_data=WIKITEXT2 if args.model is not None else None,
        num_fewshot=args.num_fewshot, limit=args.limit)


def run(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    common.setup_logging()
    distributed.initialize_from_args(args)  # before any JAX work; nothing to do for one process
    distributed.use_mesh(distributed.global_mesh(args.model_axis))
    main = distributed.is_main()
    if not main:  # one voice: process 0 logs, prints and writes
        for name in ("compress", "uniql_jax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    rates, out = check_args(args)
    tasks = common.load_tasks(args) if args.tasks else None  # unknown / unreachable task: fails before any work

    from uniql_jax import accuracy, pipeline

    config = pipeline_config(args, rates)
    inputs = pipeline.load_inputs(config)
    cfg, params, table, report = pipeline.compress(config, inputs, tasks=tasks, consume_inputs=True)
    if main:
        print_table(report)
        if tasks:
            print(accuracy.accuracy_table(report["accuracy"]["rates"]))
    # process 0 stages --out and renames it into place; the checkpoint inside is saved by every process
    with common.staged_output(out, args.overwrite, writer=main) as tmp:
        distributed.barrier("compress: staging folder made")
        if main:  # the report first: a failed save keeps it
            common.write_json(tmp / "report.json", report)
            common.plot_report(report, tmp / "report.png")
            pipeline.save_tokenizer(inputs.tokenizer, tmp / "tokenizer")
        pipeline.save_checkpoint(tmp / "checkpoint", cfg, params, table, report, inputs.eval_spec)
    log.info("wrote %s", out)
    distributed.barrier("compress: output written")
    return out


def print_table(report):
    base = report["baseline"]
    print(f"\n{'rate':>6} {'ppl':>10} {'params':>10} {'MB':>8}   (baseline: ppl {base['ppl']:.4f}, "
          f"{base['param_bytes'] / 1e6:.2f} MB at 16 bits)")
    before = {r["rate"]: r["ppl"] for r in report.get("rates_before_finetune", [])}
    for row in report["rates"]:
        extra = f"   (before fine-tuning, 16-bit: {before[row['rate']]:.4f})" if row["rate"] in before else ""
        print(f"{row['rate']:>6.2f} {row['ppl']:>10.4f} {row['params']:>10d} {row['param_bytes'] / 1e6:>8.3f}{extra}")


def main(argv=None):
    common.main_guard(lambda: run(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
