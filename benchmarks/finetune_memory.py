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

Then the step time of both, side by side in one process (`--pair-batch-size` windows, both
compiled, run alternately `--pair-rounds` times): the ratio, and whether the losses are equal.
`--only memory|pair` reruns one part and keeps the other part of `--out`.
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


MEMORY_SETTINGS = ("no-remat", "remat", "remat+allocator")


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
    p.add_argument("--only", choices=("memory", "pair"), help="run one part and update that part of --out")
    p.add_argument("--child", choices=MEMORY_SETTINGS + ("pair",), help=argparse.SUPPRESS)
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
    if args.child == "remat+allocator":  # what the command-line tools do first
        from uniql_jax.host_memory import return_freed_arrays_to_os

        assert return_freed_arrays_to_os()
    cfg, params = hf.load(args.model)
    tokenizer = hf.load_tokenizer(args.model)
    text = open(args.text, encoding="utf-8").read()
    tokens = np.asarray(data.encode_documents([text], tokenizer)[0], np.int32)
    need = (args.steps + 1) * args.batch_size * args.seq_len
    train, held = tokens[:need], tokens[need:need + 4 * args.seq_len]
    table = allocate(cfg, None, None, [0.0, 0.15, 0.25, 0.35], method="uniform", steps=default_steps(cfg))
    tc = ft.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, remat=remat)
    lora_cfg = ft.LoraConfig()

    t0 = time.perf_counter()
    result = train_lora(cfg, params, table, train, held, tc, lora_cfg=lora_cfg,
                        eval_cfg=EvalConfig(windows=4, batch_size=4), progress=False)
    run_s = time.perf_counter() - t0
    jax.block_until_ready(result.best_lora)
    xla = result.history["step_memory_bytes"]  # XLA's view of the compiled step
    compile_s = result.history["timings_s"]["compile"]
    return {"setting": args.child, "remat": remat, "compile_s": round(compile_s, 2), "train_lora_s": round(run_s, 2),
            "xla_step_bytes": xla, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "float32_weight_bytes": int(sum(x.size * 4 for x in jax.tree.leaves(params)))}


def pair_child(args) -> dict:
    """Step time with and without remat, side by side in one process: both steps compiled, then
    run alternately `--pair-rounds` times on the same batch (the ratio survives a noisy machine)."""
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
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.pair_batch_size, args.seq_len)),
                        jnp.int32)
    steps, seconds, losses = {}, {False: [], True: []}, {False: [], True: []}
    for remat in (False, True):
        tc = ft.TrainConfig(steps=2, batch_size=args.pair_batch_size, seq_len=args.seq_len, remat=remat)
        lora = ft.init_lora(cfg, params, lora_cfg, 0)
        state = {"lora": lora, "opt": ft.make_optimizer(tc).init(lora)}
        steps[remat] = (ft.train_step.lower(cfg, lora_cfg, tc, state, params, batch, stacked, jnp.int32(0)).compile(),
                        state)
    for r in range(args.pair_rounds):
        for remat in (False, True):
            compiled, state = steps[remat]
            state = jax.tree.map(jnp.copy, state)  # the step donates its state
            t0 = time.perf_counter()
            _, metrics = jax.block_until_ready(compiled(state, params, batch, stacked, jnp.int32(r)))
            seconds[remat].append(round(time.perf_counter() - t0, 3))
            losses[remat].append(float(metrics["loss"]))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"batch_size": args.pair_batch_size, "seq_len": args.seq_len, "step_s": {"no_remat": seconds[False],
            "remat": seconds[True]}, "median_s": {"no_remat": med[False], "remat": med[True]},
            "remat_over_no_remat": round(med[True] / med[False], 3),
            "same_loss": losses[False] == losses[True]}


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
        print(json.dumps(pair_child(args) if args.child == "pair" else child(args)))
        return
    out = {}
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            out = json.load(f)
    if args.only != "pair":
        out.update(memory_part(args))
    if args.only != "memory":
        out["step_time_pair"] = run_child(args, "pair")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


def memory_part(args) -> dict:
    rows = []
    for setting in MEMORY_SETTINGS:
        rows.append(run_child(args, setting))
    return {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "host": platform.node(), "cpus": os.cpu_count(), "settings": rows,
            "note": "peak RSS per process (load, compile, steps, 4-window evaluation per rate)"}


if __name__ == "__main__":
    main()
