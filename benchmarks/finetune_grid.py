"""Masked LoRA fine-tuning on a default model: perplexity grid before / after, and step throughput.

    python -m benchmarks.finetune_grid --arch llama --steps 300
    python -m benchmarks.finetune_grid --arch bamba --steps 300 --out benchmarks/finetune-cpu.json
    python -m benchmarks.finetune_grid --table benchmarks/finetune-cpu.json     # the README table

Pipeline (the stages of experiments.compress, 16-bit): convert -> sort on calibration
windows of the TinyStories training part -> allocate (block influence) -> masked LoRA
(`uniql_jax.finetune.train.finetune_stage` on the training part; its last 10 % of windows pick
the best adapters) -> perplexity of the sliced model at every rate on the held-out
TinyStories documents, which neither sorting nor fine-tuning saw. Then the train
step's throughput (tokens/s, compile excluded) in float32 and bfloat16. Results are
merged into --out by arch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from experiments import common
from experiments.compress import DEFAULT_RATES

DEFAULT_OUT = Path("benchmarks") / "finetune-cpu.json"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_grid", description=__doc__.split("\n")[0])
    p.add_argument("--arch", help="model family (its embedded default unless --model)")
    p.add_argument("--model", help="HF checkpoint folder or llama2.c .bin")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--rates", default=DEFAULT_RATES)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-steps", type=int, default=10, help="timed train steps per dtype (0: skip)")
    p.add_argument("--ckpt-dir", help="Orbax folder for the fine-tuning state (resumes when it exists)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--table", type=Path, help="print the markdown table of a results JSON and exit")
    return p


def step_throughput(cfg, params, table, tokens, *, batch_size, seq_len, dtype, steps) -> dict:
    """Median tokens/s of `finetune.train_step` (compile excluded: the first call is not timed)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from uniql_jax.compress import masks as mask_lib
    from uniql_jax.eval import windows
    from uniql_jax.finetune import lora as ft
    from uniql_jax.finetune.train import batch_indices

    lora_cfg = ft.LoraConfig()
    tc = ft.TrainConfig(steps=steps + 1, warmup_steps=100, batch_size=batch_size, seq_len=seq_len,
                        compute_dtype=dtype)
    base = ft.cast_floats(params, jnp.bfloat16) if dtype == "bfloat16" else params
    lora = ft.init_lora(cfg, params, lora_cfg)
    state = {"lora": lora, "opt": ft.make_optimizer(tc).init(lora)}
    _, stacked = mask_lib.mask_table(cfg, table)
    wins = windows(tokens, seq_len)
    times = []
    t0 = time.perf_counter()
    for step in range(steps + 1):
        batch = jnp.asarray(wins[batch_indices(len(wins), step, batch_size, 0)][None])
        t = time.perf_counter()
        state, metrics = ft.train_step(cfg, lora_cfg, tc, state, base, batch, stacked, jnp.int32(step))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        if step == 0:
            compile_s = time.perf_counter() - t0
    med = float(np.median(times[1:]))
    return {"dtype": dtype, "batch": batch_size, "seq_len": seq_len, "tokens_per_step": batch_size * seq_len,
            "compile_and_first_s": round(compile_s, 3), "median_step_s": round(med, 4),
            "tokens_per_s": round(batch_size * seq_len / med, 1), "timed_steps": steps}


def run(args):
    import jax
    import numpy as np

    import uniql_jax as uq
    from uniql_jax import data
    from uniql_jax.compress.allocate import default_steps, param_count
    from uniql_jax.compress.sort import sort
    from uniql_jax.finetune.data import FinetuneData
    from uniql_jax.finetune.lora import TrainConfig
    from uniql_jax.finetune.train import EvalConfig, ResumeConfig, finetune_stage
    from uniql_jax.pipeline import Timer, load_model

    rates = common.parse_rates(args.rates)
    timer = Timer()
    with timer.stage("convert"):
        cfg, params, tokenizer, source = load_model(args.arch, args.model)
        train = data.token_source(None, tokenizer, "train")
        held = data.token_source(None, tokenizer, "heldout")
        calib = data.calibration_windows(train, args.calib_samples, args.seq_len, seed=args.seed)
    with timer.stage("sort"):
        cfg, params = sort(cfg, params, calib, progress=False)
    with timer.stage("allocate"):
        table = uq.allocate(cfg, params, calib, rates, steps=default_steps(cfg))
    with timer.stage("finetune"):
        tc = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seq_len=args.seq_len, seed=args.seed)
        _, report = finetune_stage(cfg, params, table, FinetuneData(tokens=train), tc, eval_tokens=held,
                                   eval_cfg=EvalConfig(every=args.eval_every),
                                   resume=ResumeConfig(args.ckpt_dir) if args.ckpt_dir else None)
    throughput = []
    if args.bench_steps:
        with timer.stage("throughput"):
            for dtype in ("float32", "bfloat16"):
                throughput.append(step_throughput(cfg, params, table, train, batch_size=args.batch_size,
                                                  seq_len=args.seq_len, dtype=dtype, steps=args.bench_steps))
    entry = {"arch": cfg.arch, "model": source, "params": param_count(cfg), "blocks": "".join(
        {"attention": "*", "mlp": "-", "mamba2": "M"}[b.kind] for b in cfg.blocks),
        "train_tokens": int(len(train)), "heldout_tokens": int(len(held)), "calib_samples": args.calib_samples,
        "allocation": "block_influence", "rates": rates,
        "ppl": [{**row, "change_pct": round(100 * (row["after"] / row["before"] - 1), 2)} for row in report["ppl"]],
        "finetune": {k: report[k] for k in ("best_step", "best_eval_loss", "tokens_per_s", "config", "evals",
                                            "train_tokens", "dev_tokens", "timings_s", "rate_probs")},
        "throughput": throughput, "timings_s": timer.timings}
    out = {"benchmark": "finetune", "device": "cpu", "platform": jax.default_backend(), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "versions": {"python": platform.python_version(), "jax": jax.__version__},
           "load_average": list(os.getloadavg()), "models": []}
    if args.out.is_file():
        out = {**json.loads(args.out.read_text()), "load_average": list(os.getloadavg())}
    out["models"] = [m for m in out["models"] if m["arch"] != cfg.arch] + [entry]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out, out)
    print(markdown_table(out))
    del np


def markdown_table(results: dict) -> str:
    lines = []
    for m in results["models"]:
        lines.append(f"\n{m['arch']} ({m['params']:,} params, {m['blocks']}), "
                     f"{m['finetune']['config']['train']['steps']} steps, best step {m['finetune']['best_step']}:\n")
        lines.append("| pruning | ppl before | ppl after | change |")
        lines.append("|---|---|---|---|")
        for row in m["ppl"]:
            lines.append(f"| {row['rate']:.0%} | {row['before']:.3f} | {row['after']:.3f} | {row['change_pct']:+.2f} % |")
        for t in m["throughput"]:
            lines.append(f"\ntrain step {t['dtype']}: {t['tokens_per_s']:.0f} tokens/s "
                         f"(batch {t['batch']} x {t['seq_len']}, {results['device']})")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if not args.arch:
        raise SystemExit("--arch is required")
    common.main_guard(lambda: run(args))


if __name__ == "__main__":
    main(sys.argv[1:])
