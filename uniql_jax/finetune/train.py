"""The driver of masked LoRA fine-tuning (docs/method.md, "Stage 3: masked LoRA"): batches, the loop, selection, resume.

The method (`finetune.lora`): LoRA adapters trained through the masked forward of the sorted
model at a rate drawn per step, so that one set of adapters serves every nested pruning mask
of the rate grid; merged into the sorted weights before quantization.

Selection. The evaluation loss is the held-out NLL averaged over the rates of the grid
(`eval_nll_per_rate`); the adapters kept are the best by that loss among those that leave
the lightest rate (the dense model) within `EvalConfig.dense_tolerance` (1 %) of its
starting perplexity on that split: a shared adapter may not buy pruned accuracy with dense
accuracy beyond that.

Resume. Every random choice (batch order `batch_indices`, rate, dropout) is a function of
(seed, step), so a run killed mid-way and resumed from its last checkpoint (an Orbax
CheckpointManager folder, `ResumeConfig`) ends bit-identical to an uninterrupted one. A
checkpoint is resumed only by the same run: same model weights (a hash of their bytes),
data, rate table and hyper-parameters (`fingerprint`).

Every stage reports its wall time (`history["timings_s"]`); the loop shows progress and ETA.
Shapes: W windows, T tokens per window (TrainConfig.seq_len).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.compress import masks as mask_lib
from uniql_jax.compress.allocate import evaluate_rates
from uniql_jax.config import ModelConfig
from uniql_jax.eval import window_nll, windows
from uniql_jax.finetune.data import FinetuneData
from uniql_jax.finetune.lora import (LoraConfig, TrainConfig, adapted_window_nll, cast_floats, init_lora,
                                     learning_rate, make_optimizer, merged_params, rate_probs, train_step)
from uniql_jax.host_memory import trim_heap
from uniql_jax.paths import user_path
from uniql_jax.quant.formats.packed import is_packed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """When and on what the adapters are evaluated, and which may be kept (module docstring)."""

    every: int | None = None  # evaluate every N steps, and after the last (None: max(1, steps // 4))
    windows: int = 32  # held-out windows evaluated (the first ones of the held-out stream)
    batch_size: int = 8  # windows per evaluation forward
    dense_tolerance: float | None = 0.01  # keep adapters only if exp(Δ dense loss) <= 1 + this (None: no guard)


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    """Checkpoints of the fine-tuning state, and resuming from them."""

    directory: str | Path  # an Orbax CheckpointManager folder: resumed when it holds this run's checkpoint
    every: int | None = None  # save every N steps, and after the last (None: at every evaluation)


@dataclasses.dataclass
class FinetuneResult:
    lora: dict  # adapters after the last step
    best_lora: dict  # adapters of the lowest evaluation loss (step 0: B = 0, the base model)
    history: dict  # per-step metrics, evaluations, timings, best step, the configs


# ============================================================================ batches and evaluation
def batch_indices(n_windows: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Window indices [per_step] of one optimizer step: epoch-wise shuffles, a function of (seed, step).

    Sample g (g = step·per_step + j) is window perm_e[g mod n] of epoch e = g // n, with
    perm_e drawn by numpy's default_rng([seed, e]).
    """
    g = step * per_step + np.arange(per_step)
    epochs, pos = np.divmod(g, n_windows)
    out = np.empty(per_step, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_windows)
        out[epochs == e] = perm[pos[epochs == e]]
    return out


def eval_nll_per_rate(cfg: ModelConfig, params: dict, windows_WxT, stacked_masks, *, batch_size: int = 8,
                      lora: dict | None = None, lora_cfg: LoraConfig = LoraConfig()):
    """Mean next-token NLL of `windows_WxT` under each rate's masks -> float64 [n_rates].

    One compiled forward (masks traced) serves every rate: `eval.window_nll`, or with `lora`
    the adapted model without a merged copy (`lora.adapted_window_nll`).
    """
    n_rates = jax.tree.leaves(stacked_masks)[0].shape[0]
    W, T = windows_WxT.shape

    def nll(batch, masks):
        if lora is None:
            return window_nll(cfg, params, batch, masks=masks)
        return adapted_window_nll(cfg, lora_cfg, params, lora, batch, masks)

    out = []
    for i in range(n_rates):
        masks = mask_lib.select(stacked_masks, i)
        nll_per_batch = [nll(jnp.asarray(windows_WxT[s:s + batch_size]), masks) for s in range(0, W, batch_size)]
        out.append(float(np.concatenate([np.asarray(x, np.float64) for x in nll_per_batch]).sum()) / (W * (T - 1)))
    return np.asarray(out)


# ============================================================================ resume
def _sha256(*arrays) -> str:
    """Hex sha256 over the dtype, shape and bytes of each array, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def weights_digest(params: dict) -> str:
    """sha256 over every leaf of `params` in tree order (path, dtype, shape, bytes): a permutation
    of channels changes it, unlike a sum of the weights."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    h = hashlib.sha256()
    for path, leaf in flat:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(_sha256(leaf).encode())
    return h.hexdigest()


def fingerprint(cfg: ModelConfig, params: dict, lora_cfg: LoraConfig, tc: TrainConfig, train_w_WxT, eval_w_WxT,
                rates, **selection) -> dict:
    """What must match for a checkpoint to be resumed (a different run must not continue it), as JSON:
    hyper-parameters, the selection rule, data, rates, the model's config and a hash of its weights."""
    return _json_roundtrip({
        "lora": dataclasses.asdict(lora_cfg), "train": dataclasses.asdict(tc),
        "model": hashlib.sha256(repr(cfg).encode()).hexdigest(), "weights": weights_digest(params),
        "train_windows": [int(train_w_WxT.shape[0]), _sha256(train_w_WxT)],
        "eval_windows": [int(eval_w_WxT.shape[0]), _sha256(eval_w_WxT)], "rates": [float(r) for r in rates],
        **selection})


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj))


class _Checkpoints:
    """Orbax CheckpointManager over {"state": arrays, "meta": JSON}; synchronous saves."""

    def __init__(self, directory, keep: int = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(user_path(directory), options=options,
                                             item_names=("state", "meta"))

    def latest(self):
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict):
        ocp = self.ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: dict):
        ocp = self.ocp
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.close()


# ============================================================================ the loop
def train_lora(cfg: ModelConfig, params: dict, table: dict, train_tokens, eval_tokens, tc: TrainConfig, *,
               lora_cfg: LoraConfig = LoraConfig(), eval_cfg: EvalConfig = EvalConfig(),
               resume: ResumeConfig | None = None, progress: bool = True,
               callback: Callable[[int, dict], None] | None = None) -> FinetuneResult:
    """Masked LoRA fine-tuning of a sorted model over the rates of `table` (module docstring).

    train_tokens / eval_tokens: 1-D token streams, packed into non-overlapping windows of
    tc.seq_len (eval: the first eval_cfg.windows). The evaluation loss is measured before
    training (step 0), every eval_cfg.every steps and after the last; the adapters with the
    lowest are kept (`best_lora`) among those within the dense guard. Step 0 (the sorted
    model itself) always qualifies.

    resume: the state (adapters, AdamW state, best adapters, history) is saved every
    resume.every steps and at the end; when the folder already holds a checkpoint of the same
    run (`fingerprint`) training resumes from its last step and reaches the same result as an
    uninterrupted run. `callback(step, metrics)` is called after every step (and its checkpoint).
    """
    t_start = time.perf_counter()
    if any(is_packed(x) for x in jax.tree.leaves(params, is_leaf=is_packed)):
        raise ValueError("fine-tune the 16-bit sorted model: adapters are merged before quantization")
    train_w_WxT = windows(train_tokens, tc.seq_len)
    eval_w_WxT = windows(eval_tokens, tc.seq_len)[:eval_cfg.windows]
    _, stacked_masks = mask_lib.mask_table(cfg, table)
    rates = sorted(float(r) for r in table)  # the row order of mask_table
    eval_every = eval_cfg.every or max(1, tc.steps // 4)
    per_step = tc.batch_size * tc.grad_accum

    base = cast_floats(params, jnp.bfloat16) if tc.compute_dtype == "bfloat16" else params
    lora = init_lora(cfg, params, lora_cfg, tc.seed)
    state = {"lora": lora, "opt": make_optimizer(tc).init(lora)}
    best_lora = jax.tree.map(jnp.copy, lora)  # `state` is donated to the step; keep separate buffers
    history = {"steps": [], "evals": [], "rates": rates, "rate_probs": rate_probs(len(rates)).tolist(),
               "best_step": None, "best_eval_loss": None}
    spent = {"evaluate": 0.0, "checkpoint": 0.0}

    def evaluate(step, lora_now):
        """Eval loss of the adapters, or None when they break the dense guard."""
        t0 = time.perf_counter()
        per_rate = eval_nll_per_rate(cfg, base, eval_w_WxT, stacked_masks, batch_size=eval_cfg.batch_size,
                                     lora=lora_now, lora_cfg=lora_cfg)
        entry = {"step": step, "eval_loss": float(per_rate.mean()), "per_rate": per_rate.tolist()}
        if history["evals"] and eval_cfg.dense_tolerance is not None:
            dense_start = history["evals"][0]["per_rate"][0]
            entry["dense_ok"] = bool(per_rate[0] <= dense_start + math.log1p(eval_cfg.dense_tolerance))
        history["evals"].append(entry)
        trim_heap()  # the evaluation's freed blocks leave before the next step's peak
        spent["evaluate"] += time.perf_counter() - t0
        return entry["eval_loss"] if entry.get("dense_ok", True) else None

    ckpts, start = None, 0
    if resume is not None:
        ckpt_every = resume.every or eval_every
        ckpts = _Checkpoints(resume.directory)
        run_id = fingerprint(cfg, params, lora_cfg, tc, train_w_WxT, eval_w_WxT, rates, eval_every=eval_every,
                             dense_tolerance=eval_cfg.dense_tolerance)
        if ckpts.latest() is not None:
            saved, meta = ckpts.restore(ckpts.latest(), {"state": state, "best_lora": best_lora})
            if meta["fingerprint"] != run_id:
                ckpts.close()
                raise ValueError(f"{resume.directory} holds a checkpoint of a different fine-tuning run "
                                 "(weights, data, table or hyper-parameters differ); use another folder")
            state, best_lora, history, start = saved["state"], saved["best_lora"], meta["history"], meta["step"]
            log.info("resuming fine-tuning from step %d of %d (%s)", start, tc.steps, resume.directory)
    if start == 0:
        history["best_eval_loss"], history["best_step"] = evaluate(0, lora), 0

    def checkpoint(step):
        t0 = time.perf_counter()
        ckpts.save(step, {"state": state, "best_lora": best_lora},
                   {"step": step, "history": history, "fingerprint": run_id})
        spent["checkpoint"] += time.perf_counter() - t0

    bar = range(start, tc.steps)
    if progress:
        from tqdm.auto import tqdm  # its bar shows the rate and the ETA

        bar = tqdm(bar, desc="masked LoRA", unit="step", initial=start, total=tc.steps)

    def batch(step):
        idx = batch_indices(len(train_w_WxT), step, per_step, tc.seed)
        return jnp.asarray(train_w_WxT[idx].reshape(tc.grad_accum, tc.batch_size, tc.seq_len))

    compile_s, step_memory = 0.0, {}
    if start < tc.steps:  # compiled ahead, so that the compiler's freed memory leaves before the first step runs
        t0 = time.perf_counter()
        compiled_step = train_step.lower(cfg, lora_cfg, tc, state, base, batch(start), stacked_masks,
                                         jnp.int32(start)).compile()
        compile_s = time.perf_counter() - t0
        step_memory = _memory_analysis(compiled_step)
        trim_heap()
        log.info("masked LoRA step compiled in %.1f s (%s)", compile_s,
                 ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in step_memory.items()) or "no memory analysis")
    t_first, step_s, n_timed = None, 0.0, 0
    for step in bar:
        batch_MxBxT = batch(step)
        t0 = time.perf_counter()
        state, metrics = compiled_step(state, base, batch_MxBxT, stacked_masks, jnp.int32(step))
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
        if t_first is None:
            t_first = time.perf_counter() - t0
        else:
            step_s, n_timed = step_s + time.perf_counter() - t0, n_timed + 1
        trim_heap()  # the step's freed blocks leave the resident set before the next evaluation or step
        metrics = {"step": step + 1, "loss": metrics["loss"], "rate": rates[int(metrics["rate_index"])],
                   "grad_norm": metrics["grad_norm"], "lr": learning_rate(tc, step)}
        history["steps"].append(metrics)
        if progress:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", rate=metrics["rate"])
        done = step + 1
        if done % eval_every == 0 or done == tc.steps:
            value = evaluate(done, state["lora"])
            if value is not None and value < history["best_eval_loss"]:
                history["best_eval_loss"], history["best_step"] = value, done
                best_lora = jax.tree.map(jnp.copy, state["lora"])  # state buffers are donated to the next step
            log.info("step %d: eval loss %.4f%s (best %.4f at step %d)", done, history["evals"][-1]["eval_loss"],
                     "" if value is not None else " (dense guard)", history["best_eval_loss"], history["best_step"])
        if ckpts is not None and (done % ckpt_every == 0 or done == tc.steps):
            checkpoint(done)
        if callback is not None:
            callback(done, metrics)
    if ckpts is not None:
        ckpts.close()
    if n_timed:  # train steps only: compilation, evaluations and checkpoints excluded
        history["tokens_per_s"] = n_timed * per_step * tc.seq_len / max(step_s, 1e-9)
    history["step_memory_bytes"] = step_memory
    history["timings_s"] = {"total": round(time.perf_counter() - t_start, 3), "compile": round(compile_s, 3),
                            "first_step": t_first,
                            "steps": round(step_s, 3), **{k: round(v, 3) for k, v in spent.items()}}
    log.info("masked LoRA: %d steps in %.1f s (compile %.1f s, first step %.1f s, evaluations %.1f s, "
             "checkpoints %.1f s)", tc.steps - start, history["timings_s"]["total"], compile_s, t_first or 0.0,
             spent["evaluate"], spent["checkpoint"])
    history["config"] = {"lora": dataclasses.asdict(lora_cfg), "train": dataclasses.asdict(tc),
                         "eval_every": eval_every, "eval_windows": int(eval_w_WxT.shape[0]),
                         "train_windows": int(train_w_WxT.shape[0]), "resumed_from": start}
    return FinetuneResult(lora=state["lora"], best_lora=best_lora, history=history)


def _memory_analysis(compiled) -> dict:
    """XLA's bytes of a compiled program: {"temporaries", "arguments", "outputs"} ({} where not reported)."""
    mem = compiled.memory_analysis()
    names = {"temporaries": "temp_size_in_bytes", "arguments": "argument_size_in_bytes",
             "outputs": "output_size_in_bytes"}
    return {k: int(getattr(mem, v)) for k, v in names.items() if mem is not None and hasattr(mem, v)}


# ============================================================================ entry points
def finetune(cfg: ModelConfig, params: dict, table: dict, train_tokens, eval_tokens, tc: TrainConfig, *,
             lora_cfg: LoraConfig = LoraConfig(), **driver) -> tuple[dict, dict]:
    """(params with the best adapters merged, history): `train_lora` then `lora.merge`.

    The merged params keep the dtype and layout of `params` (the sorted full model), so
    `prune`, `quantize` and `save` apply unchanged. `driver`: eval_cfg, resume, progress,
    callback of `train_lora`.
    """
    result = train_lora(cfg, params, table, train_tokens, eval_tokens, tc, lora_cfg=lora_cfg, **driver)
    return merged_params(cfg, lora_cfg, params, result.best_lora), result.history


def finetune_stage(cfg: ModelConfig, params: dict, table: dict, text: FinetuneData, tc: TrainConfig, *,
                   eval_tokens=None, **finetune_kw) -> tuple[dict, dict]:
    """Stage 3 of `experiments.compress`: (sorted params with the best adapters merged, report).

    `text` is split into the training stream and the held-out stream that picks the best
    adapters (`FinetuneData.split`). With `eval_tokens` (a 1-D stream, the perplexity text)
    the report holds the perplexity grid of the sliced model at every rate of `table` before
    and after ("ppl": [{"rate", "before", "after"}]). `finetune_kw`: lora_cfg, eval_cfg,
    resume, progress, callback (`finetune`, `train_lora`).
    """
    t0 = time.perf_counter()
    train_tokens, dev_tokens = text.split(tc.seq_len)
    data_s = time.perf_counter() - t0
    before = evaluate_rates(cfg, params, table, eval_tokens, seq_len=tc.seq_len) if eval_tokens is not None else None
    merged, history = finetune(cfg, params, table, train_tokens, dev_tokens, tc, **finetune_kw)
    report = {key: history.get(key) for key in ("best_step", "best_eval_loss", "tokens_per_s", "step_memory_bytes",
                                                "config", "evals",
                                                "rates", "rate_probs")}
    report["source"] = text.name
    report["train_tokens"], report["dev_tokens"] = int(len(train_tokens)), int(len(dev_tokens))
    report["loss_curve"] = [[h["step"], h["loss"], h["rate"]] for h in history["steps"]]
    report["timings_s"] = {"data": round(data_s, 3), **history["timings_s"]}
    if before is not None:
        after = evaluate_rates(cfg, merged, table, eval_tokens, seq_len=tc.seq_len)
        report["ppl"] = [{"rate": b["rate"], "before": b["ppl"], "after": a["ppl"]} for b, a in zip(before, after)]
    return merged, report
