"""Host memory of a masked-LoRA fine-tuning step on a real model, with and without rematerialization.

    python -m benchmarks.finetune_memory [--model ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--batch-size 8] [--seq-len 512] [--steps 2] [--out benchmarks/cpu-finetune-memory-smollm2.json]

Each setting runs in its own process (peak RSS is per process): the model is loaded, a uniform
rate table built, and `finetune.train.train_lora` runs `--steps` steps of `--batch-size`
windows of `--seq-len` tokens (the shape of the SmolLM2 fine-tuning run in the README), with a
small evaluation set. Per setting: XLA's memory analysis of the compiled step (temporaries,
arguments, outputs), the process's peak RSS, and the wall time of a step after compilation.

`train_lora` compiles the step ahead of the loop and reports XLA's memory analysis of it
(temporaries, arguments, outputs); it gives the freed heap back after the compilation and
after every step and evaluation (`host_memory.trim_heap`), and evaluates the adapters without a
merged copy of the model (`lora.adapted_window_nll`).

Settings: `remat=False` (every block's activations kept for the backward pass),
`remat=True`, the default (runs of identical blocks scanned under `jax.checkpoint`, each block
recomputed in the backward pass with its adapters merged inside; `eval.rematerialized_blocks`), and
that with `host_memory.return_freed_arrays_to_os()` as the command-line tools run. All
run the head over 128-position chunks (`eval.head_nll_sums`), so neither holds the float32
logits of the whole batch.

The `+microM` settings split each step of `--batch-size` windows into accumulated micro-batches
of M windows (`TrainConfig(batch_size=M, grad_accum=batch_size / M)`, what `compress
--finetune-micro-batch M` runs): the same gradient, the activation memory of one micro-batch.

Then step times side by side in one process (each variant compiled, then run alternately
`--pair-rounds` times on the same batch): remat against no remat (`--pair-batch-size` windows;
the ratio, and whether the losses are equal), and the micro-batch sizes of MICRO_BATCHES at
`--batch-size` windows per step. `--only memory|pair|micro-pair` reruns one part and keeps the
rest of `--out`; `--settings a,b` reruns only those memory settings and keeps the other rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from benchmarks.real_model import REPO, SMOLLM2, WIKITEXT2_VALID


MICRO_BATCHES = (8, 4, 2)  # windows per micro-batch compared at 8 windows per step
MEMORY_SETTINGS = ("no-remat", "remat", "remat+allocator", "remat+allocator+micro4", "remat+allocator+micro2")
PAIRS = ("pair", "micro-pair")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOLLM2), help="HF folder or .gguf (default: the shared SmolLM2-135M)")
    p.add_argument("--text", default=str(WIKITEXT2_VALID), help="training text (default: WikiText-2 valid)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "cpu-finetune-memory-smollm2.json"))
    p.add_argument("--pair-batch-size", type=int, default=2,
                   help="windows per step of the paired step-time comparison (default 2: both fit in memory)")
    p.add_argument("--pair-rounds", type=int, default=3)
    p.add_argument("--only", choices=("memory",) + PAIRS, help="run one part and update that part of --out")
    p.add_argument("--settings", help=f"comma-separated memory settings to rerun (default all: {','.join(MEMORY_SETTINGS)})")
    p.add_argument("--child", choices=MEMORY_SETTINGS + PAIRS, help=argparse.SUPPRESS)
    return p


def child(args) -> dict:
    """One setting, in this process: compile and run the steps, report memory and time."""
    import jax
    import numpy as np

    from converters import hf
    from uniql_jax import data
    from uniql_jax.compress.allocate import allocate, default_steps
    from uniql_jax.finetune import lora as ft
    from uniql_jax.finetune.train import EvalConfig, train_lora

    remat = args.child.startswith("remat")
    micro = int(args.child.split("+micro")[1]) if "+micro" in args.child else args.batch_size
    if args.child.startswith("remat+allocator"):  # what the command-line tools do first
        from uniql_jax.host_memory import return_freed_arrays_to_os

        assert return_freed_arrays_to_os()
    cfg, params = hf.load(args.model)
    tokenizer = hf.load_tokenizer(args.model)
    text = open(args.text, encoding="utf-8").read()
    tokens = np.asarray(data.encode_documents([text], tokenizer)[0], np.int32)
    need = (args.steps + 1) * args.batch_size * args.seq_len
    train, held = tokens[:need], tokens[need:need + 4 * args.seq_len]
    table = allocate(cfg, None, None, [0.0, 0.15, 0.25, 0.35], method="uniform", steps=default_steps(cfg))
    tc = ft.TrainConfig(steps=args.steps, batch_size=micro, grad_accum=args.batch_size // micro, seq_len=args.seq_len,
                        remat=remat)
    lora_cfg = ft.LoraConfig()

    t0 = time.perf_counter()
    result = train_lora(cfg, params, table, train, held, tc, lora_cfg=lora_cfg,
                        eval_cfg=EvalConfig(windows=4, batch_size=4), progress=False)
    run_s = time.perf_counter() - t0
    jax.block_until_ready(result.best_lora)
    xla = result.history["step_memory_bytes"]  # XLA's view of the compiled step
    compile_s = result.history["timings_s"]["compile"]
    return {"setting": args.child, "measured": time.strftime("%Y-%m-%d"), "remat": remat, "micro_batch": micro,
            "compile_s": round(compile_s, 2), "train_lora_s": round(run_s, 2),
            "xla_step_bytes": xla, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "float32_weight_bytes": int(sum(x.size * 4 for x in jax.tree.leaves(params)))}


def pair_child(args) -> dict:
    """Step times side by side in one process: every variant compiled, then run alternately
    `--pair-rounds` times on the same batch (the ratios survive a noisy machine).

    pair: remat against no remat at `--pair-batch-size` windows. micro-pair: the micro-batch sizes
    of MICRO_BATCHES at `--batch-size` windows per step, remat."""
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np

    from converters import hf
    from uniql_jax.compress import masks as mask_lib
    from uniql_jax.compress.allocate import allocate, default_steps
    from uniql_jax.finetune import lora as ft

    cfg, params = hf.load(args.model)
    table = allocate(cfg, None, None, [0.0, 0.15, 0.25, 0.35], method="uniform", steps=default_steps(cfg))
    _, stacked = mask_lib.mask_table(cfg, table)
    lora_cfg = ft.LoraConfig()
    if args.child == "pair":  # name: (remat, windows per micro-batch, micro-batches)
        variants = {"no_remat": (False, args.pair_batch_size, 1), "remat": (True, args.pair_batch_size, 1)}
    else:
        variants = {f"micro{m}": (True, m, args.batch_size // m) for m in MICRO_BATCHES}
    windows = args.pair_batch_size if args.child == "pair" else args.batch_size
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (windows, args.seq_len))
    compiled, seconds, losses = {}, {k: [] for k in variants}, {k: [] for k in variants}
    for name, (remat, micro, accum) in variants.items():
        tc = ft.TrainConfig(steps=2, batch_size=micro, grad_accum=accum, seq_len=args.seq_len, remat=remat)
        batch = jnp.asarray(tokens.reshape(accum, micro, args.seq_len), jnp.int32)
        lora = ft.init_lora(cfg, params, lora_cfg, 0)
        state = {"lora": lora, "opt": ft.make_optimizer(tc).init(lora)}
        step = ft.train_step.lower(cfg, lora_cfg, tc, state, params, batch, stacked, jnp.int32(0)).compile()
        compiled[name] = (step, state, batch)
    for r in range(args.pair_rounds):
        for name, (step, state, batch) in compiled.items():
            state = jax.tree.map(jnp.copy, state)  # the step donates its state
            t0 = time.perf_counter()
            _, metrics = jax.block_until_ready(step(state, params, batch, stacked, jnp.int32(r)))
            seconds[name].append(round(time.perf_counter() - t0, 3))
            losses[name].append(float(metrics["loss"]))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    first = next(iter(variants))
    out = {"windows_per_step": windows, "seq_len": args.seq_len, "step_s": seconds, "median_s": med,
           "over_" + first: {k: round(v / med[first], 3) for k, v in med.items()}, "losses": losses}
    if args.child == "pair":
        out["remat_over_no_remat"] = round(med["remat"] / med["no_remat"], 3)
        out["same_loss"] = losses["no_remat"] == losses["remat"]
    return out


def run_child(args, setting: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.finetune_memory", "--child", setting, "--model", args.model,
           "--text", args.text, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--pair-batch-size", str(args.pair_batch_size),
           "--pair-rounds", str(args.pair_rounds)]
    print("running", setting, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode:
        sys.exit(f"{setting} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(pair_child(args) if args.child in PAIRS else child(args)))
        return
    out = {}
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            out = json.load(f)
    if args.only in (None, "memory"):
        out.update(memory_part(args, out.get("settings", [])))
    if args.only in (None, "pair"):
        out["step_time_pair"] = run_child(args, "pair")
    if args.only in (None, "micro-pair"):
        out["micro_batch_step_time"] = run_child(args, "micro-pair")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


def memory_part(args, old_rows) -> dict:
    """The memory rows: the settings asked for are run, the other rows of `old_rows` kept."""
    wanted = args.settings.split(",") if args.settings else list(MEMORY_SETTINGS)
    unknown = set(wanted) - set(MEMORY_SETTINGS)
    if unknown:
        sys.exit(f"unknown --settings {sorted(unknown)}; expected some of {MEMORY_SETTINGS}")
    kept = {row["setting"]: row for row in old_rows}
    for setting in wanted:
        kept[setting] = run_child(args, setting)
    rows = [kept[s] for s in MEMORY_SETTINGS if s in kept]
    return {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "host": platform.node(), "cpus": os.cpu_count(), "settings": rows,
            "note": "peak RSS per process (load, compile, steps, 4-window evaluation per rate)"}


if __name__ == "__main__":
    main()
