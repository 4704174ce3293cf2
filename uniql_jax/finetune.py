"""Stage 3: one-shot masked LoRA fine-tuning across pruning rates (spec/UNIQL.md, "Stage 3").

One LoRA fine-tuning pass makes the sorted model better at *every* rate of its grid:
at each optimizer step one global rate is drawn (heavier pruning more likely,
P(i) ∝ exp(−0.1·i) over the rates in ascending keep ratio) and the full sorted model
runs its masked forward with that rate's per-block kept sizes (`compress.masks`):
q/k masks keep the same leading pairs of both rotary halves, the Mamba2 gated norm
counts kept channels only, so the masked forward equals the forward of the sliced
model exactly (defects 1 and 2 of the reference code). Adapters are merged into the
sorted weights afterwards (`merge`), before quantization; slicing a merged weight is
the same as merging the sliced weight and the sliced adapter, so the merged model
keeps its elastic property.

LoRA (Hu et al., arXiv 2106.09685, eq. 3): W' = W + (α/r)·A·B with A [d_in, r]
(uniform ±1/√d_in, PEFT's default) and B [r, d_out] = 0 at init, so fine-tuning
starts from the sorted model itself. One adapter per Hugging Face linear:

  attention  q (q, q_pass), k (k, k_pass), v, o
  mlp        gate, up, down
  mamba2     in_proj (z, x, B, C, dt), out_proj (out)

A HF linear that the elastic layout splits into several arrays (q_proj -> q and
q_pass; Mamba2 in_proj -> z | x | B | C | dt) gets one shared A and one B block per
part: exactly a LoRA on the packed HF linear, since the packed output is the
concatenation of the parts. Each part's product is reshaped into the part's elastic
layout (q: [D, K, G, 2, P]; o: [K, G, R, D] with the K·G·R input rows; out:
[H, C, D]), so pruned input rows and output columns of the update are sliced with the
weight.

Dropout. The merged weight is what the masked forward sees, so PEFT's per-token
dropout of the LoRA input cannot be expressed; here dropout drops input *features*
of the adapter (rows of A, rescaled by 1/(1−p)) with one mask per adapter per
micro-batch. Same expectation as input dropout, shared across the tokens of a
micro-batch.

Precision. Adapters, their gradients and the AdamW state are float32. With
compute_dtype="bfloat16" the frozen weights, the merged weights and the activations are
bfloat16; an update smaller than bfloat16's spacing at W (≈0.4 % of |W|) is rounded away
in the forward (the gradient still reaches A and B). bfloat16 is meant for
accelerators; on CPU it is no faster (benchmarks/finetune-cpu.json).

Selection. The evaluation loss is the held-out NLL averaged over the rates of the grid;
the adapters kept are the best by that loss among those that leave the lightest rate
(the dense model) within `dense_tolerance` (1 %) of its starting perplexity on that
split: a shared adapter may not buy pruned accuracy with dense accuracy beyond that.

Layers (house style): a pure core (`init_lora`, `merge`, `loss`, `train_step`,
`eval_nll_per_rate`) and a thin driver (`train_lora` / `finetune`) with progress,
wall times and an Orbax CheckpointManager. Every random choice (batch order, rate,
dropout) is a function of (seed, step), so a run killed mid-way and resumed from its
last checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniql_jax.compress import masks as mask_lib
from uniql_jax.config import ModelConfig
from uniql_jax.eval import window_nll, windows
from uniql_jax.paths import user_path

log = logging.getLogger(__name__)

F32 = jnp.float32

# adapter name -> the elastic arrays of that HF linear (parts absent from a block are skipped)
LORA_TARGETS = {
    "attention": {"q": ("q", "q_pass"), "k": ("k", "k_pass"), "v": ("v",), "o": ("o",)},
    "mlp": {"gate": ("gate",), "up": ("up",), "down": ("down",)},
    "mamba2": {"in_proj": ("z", "x", "B", "C", "dt"), "out_proj": ("out",)},
}
ALL_TARGETS = tuple(name for kind in LORA_TARGETS.values() for name in kind)
# adapters whose weight is [...input axes, D]: every axis but the last is the input
INPUT_SPLIT = frozenset({"o", "down", "out_proj"})
RATE_DECAY = 0.1  # P(i) ∝ exp(−RATE_DECAY·i), i over rates in ascending keep ratio


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (static: part of the jitted step's signature)."""

    rank: int = 8  # r
    alpha: float = 16.0  # α; the update is scaled by α / r
    dropout: float = 0.05  # probability of dropping an adapter input feature (module docstring)
    targets: tuple[str, ...] = ALL_TARGETS  # adapter names of LORA_TARGETS to train

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and step hyper-parameters (static; also the resume fingerprint)."""

    steps: int  # optimizer steps in the whole run
    lr: float = 1e-4  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to lr·end_lr_ratio
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the adapters
    clip_norm: float = 1.0  # global gradient-norm clip (0: none)
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per packed window
    compute_dtype: str = "float32"  # "float32" or "bfloat16": dtype of the base weights and activations
    seed: int = 0


# ============================================================================ pure core
def _adapter_parts(kind: str, block_params: dict, targets) -> dict[str, tuple[str, ...]]:
    """{adapter: parts present in this block} for the adapters of `targets`."""
    out = {}
    for name, parts in LORA_TARGETS.get(kind, {}).items():
        present = tuple(p for p in parts if p in block_params)
        if name in targets and present:
            out[name] = present
    return out


def _split_dims(name: str, shape) -> tuple[int, int]:
    """(d_in, d_out) of an elastic array read as the matrix of its HF linear."""
    n_in = len(shape) - 1 if name in INPUT_SPLIT else 1
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def lora_shapes(cfg: ModelConfig, params: dict, lora_cfg: LoraConfig) -> tuple:
    """Per block, per adapter: (name, d_in, ((part, d_out), ...)) — the static layout of the adapters."""
    unknown = set(lora_cfg.targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; expected some of {ALL_TARGETS}")
    return tuple(
        tuple((name, _split_dims(name, bp[parts[0]].shape)[0],
               tuple((p, _split_dims(name, bp[p].shape)[1]) for p in parts))
              for name, parts in _adapter_parts(blk.kind, bp, lora_cfg.targets).items())
        for blk, bp in zip(cfg.blocks, params["blocks"]))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_lora(shapes: tuple, rank: int, seed: int) -> dict:
    key = jax.random.PRNGKey(seed)
    blocks = []
    for i, block in enumerate(shapes):
        adapters = {}
        for j, (name, d_in, parts) in enumerate(block):
            bound = 1.0 / math.sqrt(d_in)
            A = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), j), (d_in, rank), F32, -bound, bound)
            adapters[name] = {"A": A, "B": {p: jnp.zeros((rank, d_out), F32) for p, d_out in parts}}
        blocks.append(adapters)
    return {"blocks": blocks}


def init_lora(cfg: ModelConfig, params: dict, lora_cfg: LoraConfig = LoraConfig(), seed: int = 0) -> dict:
    """Adapters {"blocks": [{adapter: {"A": [d_in, r], "B": {part: [r, d_out_part]}}}]}, float32.

    A ~ U(−1/√d_in, 1/√d_in) (PEFT's kaiming-uniform default), B = 0: the merged model
    starts equal to `params`. Only the shapes of `params` are read.
    """
    return _init_lora(lora_shapes(cfg, params, lora_cfg), int(lora_cfg.rank), int(seed))


def merge(params: dict, lora: dict, lora_cfg: LoraConfig, dropout_key=None) -> dict:
    """params with every adapted array replaced by W + (α/r)·reshape(A·B) (in W's dtype).

    With `dropout_key`, rows of A (adapter input features) are dropped with probability
    lora_cfg.dropout and the rest rescaled (module docstring). Pure and differentiable
    in `lora`; the merge is done in float32 and cast back to W's dtype.
    """
    blocks = []
    for i, (bp, adapters) in enumerate(zip(params["blocks"], lora["blocks"])):
        bp = dict(bp)
        for j, (name, ad) in enumerate(sorted(adapters.items())):
            A = ad["A"]
            if dropout_key is not None and lora_cfg.dropout > 0.0:
                k = jax.random.fold_in(jax.random.fold_in(dropout_key, i), j)
                keep = jax.random.bernoulli(k, 1.0 - lora_cfg.dropout, (A.shape[0],))
                A = A * (keep.astype(F32) / (1.0 - lora_cfg.dropout))[:, None]
            for part, B in ad["B"].items():
                W = bp[part]
                delta = (lora_cfg.scale * (A @ B)).reshape(W.shape)
                bp[part] = (W.astype(F32) + delta).astype(W.dtype)
        blocks.append(bp)
    return {**params, "blocks": blocks}


def cast_floats(tree, dtype):
    """Floating leaves cast to `dtype` (int leaves such as RoPE pair indices unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def rate_logits(n_rates: int) -> jax.Array:
    """Log-probabilities (unnormalized) of rate indices of `mask_table` (ascending rate).

    Index i (ascending rate) is position n−1−i in ascending keep ratio, so the heaviest
    pruning gets exp(0), the lightest exp(−0.1·(n−1)).
    """
    position = (n_rates - 1) - jnp.arange(n_rates, dtype=F32)
    return -RATE_DECAY * position


def rate_probs(n_rates: int) -> np.ndarray:
    return np.asarray(jax.nn.softmax(rate_logits(n_rates)), np.float64)


def loss(lora: dict, base: dict, cfg: ModelConfig, lora_cfg: LoraConfig, tokens_BxT, masks, dropout_key=None):
    """Mean next-token NLL (float32) of the masked forward of the merged model (tokens 2..T of each window)."""
    merged = merge(base, lora, lora_cfg, dropout_key)
    nll_B = window_nll(cfg, merged, tokens_BxT, masks=masks)
    return jnp.sum(nll_B) / (tokens_BxT.shape[0] * (tokens_BxT.shape[1] - 1))


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay (and a global-norm clip)."""
    warmup = min(tc.warmup_steps, max(tc.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                                  tc.lr * tc.end_lr_ratio)
    chain = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
    return optax.chain(*chain, optax.adamw(schedule, weight_decay=tc.weight_decay))


def learning_rate(tc: TrainConfig, step) -> float:
    warmup = min(tc.warmup_steps, max(tc.steps - 1, 0))
    return float(optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                                    tc.lr * tc.end_lr_ratio)(step))


def step_keys(seed: int, step):
    """(rate key, dropout key) of one optimizer step: a function of (seed, step) only."""
    return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), step))


def sample_rate_index(seed: int, step, n_rates: int):
    """The rate index (into `mask_table`'s ascending rates) that optimizer step `step` trains."""
    return jax.random.categorical(step_keys(seed, step)[0], rate_logits(n_rates))


def accumulated_grads(cfg: ModelConfig, lora_cfg: LoraConfig, lora: dict, base: dict, batch_MxBxT, masks,
                      dropout_key=None):
    """(mean loss, mean gradient w.r.t. `lora`) over M micro-batches int32 [M, B, T], scanned.

    Micro-batch m uses dropout key fold_in(dropout_key, m); equal to one batch of M·B
    windows when dropout is off (all windows have the same length).
    """
    grad_fn = jax.value_and_grad(loss)

    def micro(carry, inputs):
        grads_acc, loss_acc = carry
        tokens, m = inputs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, m)
        value, grads = grad_fn(lora, base, cfg, lora_cfg, tokens, masks, key)
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + value), None

    M = batch_MxBxT.shape[0]
    zeros = jax.tree.map(jnp.zeros_like, lora)
    (grads, total), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), F32)), (batch_MxBxT, jnp.arange(M)))
    return total / M, jax.tree.map(lambda g: g / M, grads)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step(cfg: ModelConfig, lora_cfg: LoraConfig, tc: TrainConfig, state: dict, base: dict,
               batch_MxBxT, stacked_masks, step):
    """One optimizer step; state = {"lora", "opt"}; batch int32 [grad_accum, batch, T].

    Draws the step's rate index (`sample_rate_index`: one rate for all micro-batches),
    accumulates the micro-batch gradients (`accumulated_grads`, each micro-batch with its
    own dropout mask) and applies AdamW. `base` (params in the compute dtype) is not
    differentiated. Returns (state, {"loss", "rate_index", "grad_norm"}).
    """
    n_rates = jax.tree.leaves(stacked_masks)[0].shape[0]
    rate_index = sample_rate_index(tc.seed, step, n_rates)
    masks = mask_lib.select(stacked_masks, rate_index)
    value, grads = accumulated_grads(cfg, lora_cfg, state["lora"], base, batch_MxBxT, masks,
                                     step_keys(tc.seed, step)[1])
    updates, opt = make_optimizer(tc).update(grads, state["opt"], state["lora"])
    lora = optax.apply_updates(state["lora"], updates)
    metrics = {"loss": value, "rate_index": rate_index, "grad_norm": optax.global_norm(grads)}
    return {"lora": lora, "opt": opt}, metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def merged_params(cfg: ModelConfig, lora_cfg: LoraConfig, base: dict, lora: dict) -> dict:
    """`merge` without dropout, jitted."""
    del cfg  # part of the cache key only: the structure of `base` follows it
    return merge(base, lora, lora_cfg)


def eval_nll_per_rate(cfg: ModelConfig, params: dict, windows_NxT, stacked_masks, *, batch_size: int = 8):
    """Mean next-token NLL of `windows_NxT` under each rate's masks -> float64 [n_rates].

    One compiled forward (`eval.window_nll`, masks traced) serves every rate.
    """
    n_rates = jax.tree.leaves(stacked_masks)[0].shape[0]
    N, T = windows_NxT.shape
    out = []
    for i in range(n_rates):
        masks = mask_lib.select(stacked_masks, i)
        sums = [window_nll(cfg, params, jnp.asarray(windows_NxT[s:s + batch_size]), masks=masks)
                for s in range(0, N, batch_size)]
        out.append(float(np.concatenate([np.asarray(x, np.float64) for x in sums]).sum()) / (N * (T - 1)))
    return np.asarray(out)


# ============================================================================ data
def batch_indices(n_windows: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Window indices of one optimizer step: epoch-wise shuffles, a function of (seed, step).

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


ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n{output}")


def alpaca_text(record: dict) -> str:
    """The Alpaca training text of one {instruction, input, output} record (or a {"text"} record)."""
    if "text" in record and "instruction" not in record:
        return str(record["text"])
    inp = str(record.get("input") or "").strip()
    return ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context" if inp else "",
        instruction=str(record["instruction"]).strip(),
        input=f"### Input:\n{inp}\n\n" if inp else "",
        output=str(record.get("output", "")).strip())


def read_finetune_documents(source) -> list[str]:
    """Documents of a fine-tuning file: JSON lines / a JSON list of Alpaca-style records
    ({instruction, input, output} or {text}), one document each, or plain text split into
    documents as `data.load_documents` does. Raises data.DataError on unreadable input."""
    from uniql_jax import data

    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        text = data.read_text(path)
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                records = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise data.DataError(f"{source}: not a JSON list ({e.msg} at line {e.lineno})") from None
        else:
            records = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise data.DataError(f"{source}: not JSON lines ({e.msg} at line {lineno})") from None
        bad = [i for i, r in enumerate(records) if not isinstance(r, dict) or
               not ({"instruction", "output"} <= set(r) or "text" in r)]
        if bad:
            raise data.DataError(f"{source}: record {bad[0]} has neither instruction/output nor text fields")
        docs = [alpaca_text(r) for r in records]
        if not docs:
            raise data.DataError(f"{source}: no records")
        return docs
    return data.load_documents(source)


# ============================================================================ driver
@dataclasses.dataclass
class FinetuneResult:
    lora: dict  # adapters after the last step
    best_lora: dict  # adapters of the lowest evaluation loss (step 0: B = 0, the base model)
    history: dict  # per-step metrics, evaluations, timings, best step


def _fingerprint(cfg, params, lora_cfg, tc, train_w, eval_w, rates, **selection) -> dict:
    """What must match for a checkpoint to be resumed (a different run must not continue it):
    hyper-parameters, data, rates, the model's config and a per-leaf checksum of its weights."""
    crc = lambda a: zlib.crc32(np.ascontiguousarray(a).tobytes())  # noqa: E731
    sums = jax.tree.leaves(jax.tree.map(lambda x: jnp.sum(x.astype(F32)), params))
    return {"lora": dataclasses.asdict(lora_cfg), "train": dataclasses.asdict(tc),
            "model": zlib.crc32(repr(cfg).encode()), "weights": crc(np.asarray(jnp.stack(sums))), "train_windows": [int(train_w.shape[0]), crc(train_w)],
            "eval_windows": [int(eval_w.shape[0]), crc(eval_w)], "rates": [float(r) for r in rates],
            **selection}


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


def train_lora(cfg: ModelConfig, params: dict, table: dict, train_tokens, eval_tokens, *, steps: int,
               seq_len: int = 256, batch_size: int = 8, grad_accum: int = 1, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.05, targets=ALL_TARGETS, lr: float = 1e-4, warmup_steps: int | None = None,
               end_lr_ratio: float = 0.0, weight_decay: float = 0.0, clip_norm: float = 1.0,
               compute_dtype: str = "float32", eval_every: int | None = None, eval_windows: int = 32,
               eval_batch_size: int = 8, dense_tolerance: float | None = 0.01, ckpt_dir=None,
               ckpt_every: int | None = None, seed: int = 0, progress: bool = True, callback: Callable[[int, dict], None] | None = None) -> FinetuneResult:
    """Masked LoRA fine-tuning of a sorted model over the rates of `table` (module docstring).

    train_tokens / eval_tokens: 1-D token streams, packed into non-overlapping windows of
    `seq_len` (eval: the first `eval_windows`). The evaluation loss is the held-out mean
    NLL averaged over every rate of the table; it is measured before training (step 0),
    every `eval_every` steps and after the last, and the adapters with the lowest are
    kept (`best_lora`) among those that keep the lightest rate of the table (the dense
    model when 0 is in the grid) within `dense_tolerance` of its starting perplexity on
    the same split (exp(Δ loss) ≤ 1 + dense_tolerance; None: no such guard). Step 0
    (the sorted model itself) always qualifies. warmup_steps None: min(100, steps // 10).

    ckpt_dir: an Orbax CheckpointManager folder. The state (adapters, AdamW state, best
    adapters, history) is saved every `ckpt_every` steps and at the end; when the folder
    already holds a checkpoint of the same run (same data, table and hyper-parameters)
    training resumes from its last step and reaches the same result as an uninterrupted
    run. `callback(step, metrics)` is called after every step (and after its checkpoint).
    """
    t_start = time.perf_counter()
    from uniql_jax.quant.formats.packed import is_packed

    if any(is_packed(x) for x in jax.tree.leaves(params, is_leaf=is_packed)):
        raise ValueError("fine-tune the 16-bit sorted model: adapters are merged before quantization")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if warmup_steps is None:
        warmup_steps = min(100, steps // 10)
    lora_cfg = LoraConfig(rank=int(rank), alpha=float(alpha), dropout=float(dropout), targets=tuple(targets))
    tc = TrainConfig(steps=int(steps), lr=float(lr), warmup_steps=int(warmup_steps), end_lr_ratio=float(end_lr_ratio),
                     weight_decay=float(weight_decay), clip_norm=float(clip_norm), batch_size=int(batch_size),
                     grad_accum=int(grad_accum), seq_len=int(seq_len), compute_dtype=compute_dtype, seed=int(seed))
    train_w = windows(train_tokens, seq_len)
    eval_w = windows(eval_tokens, seq_len)[:eval_windows]
    _, stacked = mask_lib.mask_table(cfg, table)
    rates = sorted(float(r) for r in table)  # the row order of mask_table
    eval_every = eval_every or max(1, steps // 4)
    ckpt_every = ckpt_every or eval_every
    per_step = tc.batch_size * tc.grad_accum

    base = cast_floats(params, jnp.bfloat16) if compute_dtype == "bfloat16" else params
    lora = init_lora(cfg, params, lora_cfg, seed)
    state = {"lora": lora, "opt": make_optimizer(tc).init(lora)}
    best_lora = jax.tree.map(jnp.copy, lora)  # `state` is donated to the step; keep separate buffers
    history = {"steps": [], "evals": [], "rates": rates, "rate_probs": rate_probs(len(rates)).tolist(),
               "best_step": None, "best_eval_loss": None}
    fingerprint = _json_roundtrip(_fingerprint(cfg, params, lora_cfg, tc, train_w, eval_w, rates, eval_every=eval_every,
                                               dense_tolerance=dense_tolerance))

    spent = {"evaluate": 0.0, "checkpoint": 0.0}

    def evaluate(step, lora_now):
        """Eval loss of the adapters, or None when they break the dense guard."""
        t0 = time.perf_counter()
        merged = merged_params(cfg, lora_cfg, base, lora_now)
        per_rate = eval_nll_per_rate(cfg, merged, eval_w, stacked, batch_size=eval_batch_size)
        entry = {"step": step, "eval_loss": float(per_rate.mean()), "per_rate": per_rate.tolist()}
        if history["evals"] and dense_tolerance is not None:
            entry["dense_ok"] = bool(per_rate[0] <= history["evals"][0]["per_rate"][0] + math.log1p(dense_tolerance))
        history["evals"].append(entry)
        spent["evaluate"] += time.perf_counter() - t0
        return entry["eval_loss"] if entry.get("dense_ok", True) else None

    ckpts = _Checkpoints(ckpt_dir) if ckpt_dir is not None else None
    start = 0
    if ckpts is not None and ckpts.latest() is not None:
        saved, meta = ckpts.restore(ckpts.latest(), {"state": state, "best_lora": best_lora})
        if meta["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt_dir} holds a checkpoint of a different fine-tuning run "
                             "(data, table or hyper-parameters differ); use another folder")
        state, best_lora, history, start = saved["state"], saved["best_lora"], meta["history"], meta["step"]
        log.info("resuming fine-tuning from step %d of %d (%s)", start, steps, ckpt_dir)
    if start == 0:
        history["best_eval_loss"], history["best_step"] = evaluate(0, lora), 0

    def checkpoint(step):
        if ckpts is not None:
            t0 = time.perf_counter()
            ckpts.save(step, {"state": state, "best_lora": best_lora},
                       {"step": step, "history": history, "fingerprint": fingerprint})
            spent["checkpoint"] += time.perf_counter() - t0

    bar = range(start, steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="masked LoRA", unit="step", initial=start, total=steps)
    t_first, step_s, n_timed = None, 0.0, 0
    for step in bar:
        idx = batch_indices(len(train_w), step, per_step, seed)
        batch = jnp.asarray(train_w[idx].reshape(tc.grad_accum, tc.batch_size, seq_len))
        t0 = time.perf_counter()
        state, metrics = train_step(cfg, lora_cfg, tc, state, base, batch, stacked, jnp.int32(step))
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
        if t_first is None:
            t_first = time.perf_counter() - t0  # includes compilation
        else:
            step_s, n_timed = step_s + time.perf_counter() - t0, n_timed + 1
        metrics = {"step": step + 1, "loss": metrics["loss"], "rate": rates[int(metrics["rate_index"])],
                   "grad_norm": metrics["grad_norm"], "lr": learning_rate(tc, step)}
        history["steps"].append(metrics)
        if progress:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", rate=metrics["rate"])
        done = step + 1
        if done % eval_every == 0 or done == steps:
            value = evaluate(done, state["lora"])
            if value is not None and value < history["best_eval_loss"]:
                history["best_eval_loss"], history["best_step"] = value, done
                best_lora = jax.tree.map(jnp.copy, state["lora"])  # state buffers are donated to the next step
            log.info("step %d: eval loss %.4f%s (best %.4f at step %d)", done, history["evals"][-1]["eval_loss"],
                     "" if value is not None else " (dense guard)", history["best_eval_loss"], history["best_step"])
        if done % ckpt_every == 0 or done == steps:
            checkpoint(done)
        if callback is not None:
            callback(done, metrics)
    if ckpts is not None:
        ckpts.close()
    if n_timed:  # train steps only: compilation, evaluations and checkpoints excluded
        history["tokens_per_s"] = n_timed * per_step * seq_len / max(step_s, 1e-9)
    history["timings_s"] = {"total": round(time.perf_counter() - t_start, 3), "first_step": t_first,
                            "steps": round(step_s, 3), **{k: round(v, 3) for k, v in spent.items()}}
    log.info("masked LoRA: %d steps in %.1f s (first step %.1f s, evaluations %.1f s, checkpoints %.1f s)",
             steps - start, history["timings_s"]["total"], t_first or 0.0, spent["evaluate"], spent["checkpoint"])
    history["config"] = {"lora": dataclasses.asdict(lora_cfg), "train": dataclasses.asdict(tc),
                          "eval_every": eval_every, "eval_windows": int(eval_w.shape[0]),
                          "train_windows": int(train_w.shape[0]), "resumed_from": start}
    return FinetuneResult(lora=state["lora"], best_lora=best_lora, history=history)


def finetune(cfg: ModelConfig, params: dict, table: dict, train_tokens, eval_tokens, *, steps: int, **kw):
    """(params with the best adapters merged, history): `train_lora` then `merge`.

    The merged params keep the dtype and layout of `params` (the sorted full model), so
    `prune`, `quantize` and `save` apply unchanged. Keyword arguments: those of `train_lora`.
    """
    result = train_lora(cfg, params, table, train_tokens, eval_tokens, steps=steps, **kw)
    lora_cfg = LoraConfig(**{**result.history["config"]["lora"],
                             "targets": tuple(result.history["config"]["lora"]["targets"])})
    return merged_params(cfg, lora_cfg, params, result.best_lora), result.history


def split_stream(tokens, fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) of a 1-D stream: the held-out part is its last ⌈fraction · windows⌉
    windows of `seq_len`, so no training window overlaps it."""
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens) // seq_len
    n_out = int(math.ceil(n * fraction))
    if not 0 < n_out < n:
        raise ValueError(f"{len(tokens)} tokens ({n} windows of {seq_len}) cannot be split with a "
                         f"{fraction:.0%} held-out part")
    cut = (n - n_out) * seq_len
    return tokens[:cut], tokens[cut:]


def finetune_stage(cfg: ModelConfig, params: dict, table: dict, *, steps: int, tokens=None, source=None,
                   tokenizer=None, holdout: float = 0.1, seq_len: int = 256, seed: int = 0, eval_tokens=None,
                   **kw) -> tuple[dict, dict]:
    """Stage 3 of `experiments.compress`: (sorted params with the best adapters merged, report).

    Training text: `source` (a JSON-lines / JSON Alpaca-style instruction file or a text
    file, tokenized with `tokenizer`; its last `holdout` documents are the evaluation
    split that picks the best adapters), or else `tokens` (a 1-D stream, e.g. the
    calibration stream; its last `holdout` windows are the evaluation split). Keep both
    disjoint from the perplexity text. With `eval_tokens` the report holds the
    perplexity grid of the sliced model at every rate of `table` before and after
    ("ppl": [{"rate", "before", "after"}]). Other keywords go to `train_lora`
    (batch_size, lr, rank, ckpt_dir, ...).
    """
    from uniql_jax import data
    from uniql_jax.compress.allocate import evaluate_rates

    t0 = time.perf_counter()
    if source is not None:
        if tokenizer is None:
            raise ValueError("a fine-tuning source file needs the model's tokenizer")
        train_docs, dev_docs = data.holdout(read_finetune_documents(source), holdout)
        train_tokens, dev_tokens = data.token_stream(train_docs, tokenizer), data.token_stream(dev_docs, tokenizer)
    elif tokens is not None:
        train_tokens, dev_tokens = split_stream(tokens, holdout, seq_len)
    else:
        raise ValueError("finetune_stage needs `source` (with `tokenizer`) or `tokens`")
    data_s = time.perf_counter() - t0
    before = evaluate_rates(cfg, params, table, eval_tokens, seq_len=seq_len) if eval_tokens is not None else None
    merged, history = finetune(cfg, params, table, train_tokens, dev_tokens, steps=steps, seq_len=seq_len,
                               seed=seed, **kw)
    report = {key: history.get(key) for key in ("best_step", "best_eval_loss", "tokens_per_s", "config", "evals",
                                                "rates", "rate_probs")}
    report["source"] = str(source) if source is not None else "token stream"
    report["train_tokens"], report["dev_tokens"] = int(len(train_tokens)), int(len(dev_tokens))
    report["loss_curve"] = [[h["step"], h["loss"], h["rate"]] for h in history["steps"]]
    report["timings_s"] = {"data": round(data_s, 3), **history["timings_s"]}
    if before is not None:
        after = evaluate_rates(cfg, merged, table, eval_tokens, seq_len=seq_len)
        report["ppl"] = [{"rate": b["rate"], "before": b["ppl"], "after": a["ppl"]} for b, a in zip(before, after)]
    return merged, report
