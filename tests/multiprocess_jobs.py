"""Small jobs that tests/test_distributed.py runs on N processes (``python -m tests.multiprocess_jobs JOB ...``
plus the distributed flags of `distributed.add_flags`); each process prints one JSON line on stdout.

* ``checkpoint --out DIR [--also CKPT]``: a random dense model (every process draws the same),
  placed on ``global_mesh(--model-axis)``, saved collectively to DIR; then at every stored rate
  each process loads DIR whole (``device=``, what one process reads) and sharded (``mesh=``),
  both under a ``ReadCounter``, and checks that the sharded arrays, all-gathered, are the
  whole ones bit for bit; `--also` CKPT (e.g. written by one process) is loaded sharded too.
* ``harness --tasks-dir DIR --model MODEL``: lm-eval's ``simple_evaluate`` through the `uniql`
  backend on every process (the same requests everywhere; the backend splits each batch's rows
  over the processes); every process prints the per-request log-likelihoods it got back.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from uniql_jax import distributed

# A dense model whose MLP widths split as (n // 128, 128) in storage: large enough that chunks are
# several KiB (TensorStore reads through smaller gaps), small enough to save in a second.
BLOCKS = dict(attention=(32, 64), mlp=768)


def model():
    from uniql_jax.config import AttentionBlock, MLPBlock, ModelConfig

    (pairs, rank), width = BLOCKS["attention"], BLOCKS["mlp"]
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=256,
                      blocks=(AttentionBlock(0, pairs, 0, rank), MLPBlock(0, width),
                              AttentionBlock(1, pairs, 0, rank), MLPBlock(1, width)),
                      num_heads=4, num_kv_heads=2, head_dim=64, rotary_dim=64, intermediate_size=width)
    table = {0.0: cfg.blocks,
             0.2: (AttentionBlock(0, 24, 0, 48), MLPBlock(0, 640), AttentionBlock(1, 24, 0, 56), MLPBlock(1, 512))}
    return cfg, table


def checkpoint_job(args) -> dict:
    import jax

    from tests.helpers import random_params
    from uniql_jax import checkpoint
    from uniql_jax.checkpoint.io import ReadCounter
    from uniql_jax.checkpoint.layout import raw_arrays

    mesh = distributed.global_mesh(args.model_axis)
    cfg, table = model()
    checkpoint.save(args.out, cfg, distributed.put_params(random_params(cfg, 0), mesh), table=table,
                    meta={"model": "random", "seed": 0})
    cpu = jax.local_devices(backend="cpu")[0]
    result = {"process": jax.process_index(), "rates": {}, "also_identical": None}
    for rate in sorted(table):
        with ReadCounter() as whole:
            _, full = checkpoint.load(args.out, rate, device=cpu)
        with ReadCounter() as mine:
            _, sharded = checkpoint.load(args.out, rate, mesh=mesh)
        want, got = raw_arrays(full), distributed.to_host(raw_arrays(sharded))
        identical = all(np.asarray(want[k]).dtype == got[k].dtype and np.array_equal(np.asarray(want[k]), got[k])
                        for k in want)
        result["rates"][str(rate)] = {"whole": whole.tensorstore, "mine": mine.tensorstore, "identical": identical}
        if args.also:
            _, other = checkpoint.load(args.also, rate, mesh=mesh)
            other = distributed.to_host(raw_arrays(other))
            same = all(np.array_equal(np.asarray(want[k]), other[k]) for k in want)
            result["also_identical"] = same if result["also_identical"] is None else result["also_identical"] and same
    return result


def harness_job(args) -> dict:
    import jax
    import lm_eval
    from lm_eval.tasks import TaskManager

    import uniql_jax.harness as harness

    lm = harness.UniQLM(pretrained=args.model, max_length=128, batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["stories_cloze", "stories_rolling"], log_samples=True,
                                  task_manager=TaskManager(include_path=args.tasks_dir), bootstrap_iters=0)
    lls = {}
    for task, samples in out["samples"].items():
        lls[task] = [[float(r[0][0] if isinstance(r[0], (tuple, list)) else r[0]) for r in s["resps"]]
                     for s in sorted(samples, key=lambda s: s["doc_id"])]
    return {"process": jax.process_index(), "loglikelihoods": lls, "batches": sum(lm.batches.values())}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.multiprocess_jobs")
    p.add_argument("job", choices=("checkpoint", "harness"))
    p.add_argument("--out")
    p.add_argument("--also")
    p.add_argument("--tasks-dir")
    p.add_argument("--model")
    distributed.add_flags(p)
    args = p.parse_args(argv)
    distributed.initialize_from_args(args)
    distributed.use_mesh(distributed.global_mesh(args.model_axis))
    result = checkpoint_job(args) if args.job == "checkpoint" else harness_job(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
