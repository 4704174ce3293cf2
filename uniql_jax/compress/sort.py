"""Stage 1 driver: structured weight sorting of every block (docs/method.md, "Stage 1: MLP",
"Stage 1: attention Q/K", "Stage 1: attention V/O", "Stage 1: Mamba2").

`sort` walks the model once with the calibration driver, and right after each block's
statistics are complete replaces that block's weights by their sorted form (MLP:
ridge leverage; attention: RoPE-pair Q/K order and quantization-aware V/O SVD;
Mamba2: B/C over d_state and state-aware z/x/out over head_dim; hybrids dispatch per
block). The sorted model computes the same function, so the hidden states that feed
the next block are those of the original model. Every prunable dimension then has
its most important channels first: pruning keeps a leading slice (`prune.prune`).

`baseline_order` reorders the same dimensions without calibration data (random, or by
weight magnitude) for the importance comparison.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from uniql_jax.compress import attention, calibration, mlp, ssm
from uniql_jax.config import ModelConfig

log = logging.getLogger(__name__)

SORTERS = {"mlp": mlp, "attention": attention, "mamba2": ssm}
BASELINES = ("random", "magnitude")


def _check_full_rank(cfg: ModelConfig):
    if not cfg.is_full_rank():
        raise ValueError("sorting needs the full-rank model (a pruned config was given)")


def sort_timed(cfg: ModelConfig, params: dict, calib, *, progress: bool = True, batch_size: int = 8,
               lam: float = 1.0, mesh=None, consume: bool = False) -> tuple[ModelConfig, dict, dict]:
    """`sort` that also returns per-stage wall times {"calibration", "solve", "total", per kind}."""
    _check_full_rank(cfg)
    if consume:
        params["blocks"] = list(params["blocks"])
    sorted_blocks = list(params["blocks"])
    solve_s = {kind: 0.0 for kind in SORTERS}

    def on_block(i, blk, stats):
        t0 = time.perf_counter()
        sorter = SORTERS[blk.kind]
        kw = {} if blk.kind == "attention" else {"lam": lam}
        sorted_blocks[i] = sorter.sort_block(cfg, blk, params["blocks"][i], stats, **kw)
        solve_s[blk.kind] += time.perf_counter() - t0

    collectors = {kind: sorter.collect for kind, sorter in SORTERS.items()}
    run = calibration.run_blocks(cfg, params, calib, collectors, on_block, batch_size=batch_size, mesh=mesh,
                                 progress=progress, desc="sort", release_blocks=consume)
    t = run["timings_s"]
    timings = {"calibration": t["embed"] + t["blocks"], "solve": t["on_block"], "total": t["total"],
               **{f"solve_{k}": v for k, v in solve_s.items() if v}}
    log.info("sorted %d blocks in %.1f s (calibration %.1f s, solve %.1f s)", len(cfg.blocks), timings["total"],
             timings["calibration"], timings["solve"])
    return cfg, {**params, "blocks": sorted_blocks}, timings


def sort(cfg: ModelConfig, params: dict, calib, *, progress: bool = True, batch_size: int = 8, lam: float = 1.0,
         mesh=None, consume: bool = False) -> tuple[ModelConfig, dict]:
    """UniQL structured sorting (`uq.sort`, docs/api.md): calib int32 [W, T] -> (cfg, sorted params).

    The result computes the same function as the input; its per-block sizes are
    unchanged, its prunable channels ordered by importance, and attention blocks carry
    the permuted RoPE pair indices. Statistics are float32 sums streamed `batch_size`
    windows at a time, data-parallel over `mesh` (default: all local devices).
    `consume=True` hands `params` over: each original block is dropped from it once sorted
    (``params["blocks"]`` is emptied to None entries), so two copies never coexist.
    """
    cfg, params, _ = sort_timed(cfg, params, calib, progress=progress, batch_size=batch_size, lam=lam, mesh=mesh,
                                consume=consume)
    return cfg, params


def baseline_order(cfg: ModelConfig, params: dict, kind: str = "random", seed: int = 0) -> tuple[ModelConfig, dict]:
    """The model with every prunable dimension reordered without data: kind "random"
    (a random permutation, RoPE pairs kept together) or "magnitude" (by the norms of
    the weights touching each channel). Same function as the input; v biases are
    folded into o_bias as in `sort`, and V/O keeps its original basis (no SVD)."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES}")
    _check_full_rank(cfg)
    rng = np.random.default_rng(seed)
    blocks = [SORTERS[b.kind].baseline_block(cfg, b, p, kind, rng) for b, p in zip(cfg.blocks, params["blocks"])]
    return cfg, {**params, "blocks": blocks}


def compare_orders(cfg: ModelConfig, params: dict, calib, eval_tokens, rates, *, seq_len: int,
                   baselines=BASELINES, seed: int = 0, method: str = "block_influence", steps=None,
                   batch_size: int = 8, progress: bool = False, other_allocations=()) -> dict:
    """Importance check: perplexity at each rate for UniQL's order and the data-free baselines,
    all pruned with the same allocation table (computed once: the block influence does not
    depend on channel order, since every order computes the same function).

    `other_allocations` (e.g. ``("uniform",)``): UniQL's order is also evaluated under the
    tables of these allocation methods, as ``ppl["uniql_<method>"]``.

    Returns {"rates": [...], "dense_ppl": float, "dense_params": int, "params": [pruned parameter count
    per rate, the same for every order], "table": {...}, "ppl": {"uniql": [...], kind: [...]},
    "timings_s": {...}}.
    """
    from uniql_jax.compress.allocate import allocate, evaluate_rates, param_count
    from uniql_jax.eval import perplexity

    rates = [float(r) for r in rates]
    t0 = time.perf_counter()
    table = allocate(cfg, params, calib, rates, method=method, steps=steps, batch_size=batch_size)
    t1 = time.perf_counter()
    ordered = {"uniql": sort(cfg, params, calib, progress=progress, batch_size=batch_size)[1]}
    t2 = time.perf_counter()
    for kind in baselines:
        ordered[kind] = baseline_order(cfg, params, kind, seed)[1]
    rows = {name: evaluate_rates(cfg, p, table, eval_tokens, seq_len=seq_len) for name, p in ordered.items()}
    for other in other_allocations:
        other_table = allocate(cfg, params, calib, rates, method=other, steps=steps, batch_size=batch_size)
        rows[f"uniql_{other}"] = evaluate_rates(cfg, ordered["uniql"], other_table, eval_tokens, seq_len=seq_len)
    ppl = {name: [row["ppl"] for row in r] for name, r in rows.items()}
    return {"rates": rates, "dense_ppl": perplexity(cfg, params, eval_tokens, seq_len=seq_len),
            "dense_params": param_count(cfg), "params": [row["params"] for row in rows["uniql"]],
            "params_other_allocations": {k: [row["params"] for row in rows[f"uniql_{k}"]] for k in other_allocations},
            "table": table, "ppl": ppl,
            "timings_s": {"allocate": t1 - t0, "sort": t2 - t1, "evaluate": time.perf_counter() - t2}}


def importance_comparison(cfg: ModelConfig, params: dict, tokenizer, rates, *, calib_samples: int, seq_len: int,
                          eval_tokens: int | None = None, seed: int = 0) -> dict:
    """`compare_orders` on the shared TinyStories text: calibration windows from its training
    documents, perplexity on the held-out documents (the last 10 %, unseen by the embedded
    defaults; the first `eval_tokens` of them, default all). The row of benchmarks/bench_sorting.py
    importance, without the model's name."""
    from uniql_jax import data

    calib_stream = data.token_source(None, tokenizer, "train")
    eval_stream = data.token_source(None, tokenizer, "heldout")[:eval_tokens]
    calib = data.calibration_windows(calib_stream, calib_samples, seq_len, seed=seed)
    t0 = time.perf_counter()
    res = compare_orders(cfg, params, calib, eval_stream, rates, seq_len=seq_len, seed=seed)
    return {"arch": cfg.arch, "dense_ppl": res["dense_ppl"], "rates": list(rates), "ppl": res["ppl"],
            "dense_params": res["dense_params"], "params": res["params"], "timings_s": res["timings_s"],
            "wall_s": time.perf_counter() - t0, "calib": [len(calib), seq_len], "eval_tokens": int(len(eval_stream))}
