"""Masked LoRA, the pure core of stage 3 (docs/method.md, "Stage 3: masked LoRA"): adapters, merge, loss, one step.

The method: one LoRA fine-tuning pass over the *nested pruning masks* of a sorted model
makes it better at every rate of its grid. At each optimizer step one global rate is drawn
(heavier pruning more likely, P(i) ∝ exp(−0.1·i) over the rates in ascending keep ratio)
and the full sorted model runs its masked forward with that rate's per-block kept sizes
(`compress.masks`). q/k masks keep the same leading pairs of both rotary halves and the
Mamba2 gated norm counts kept channels only, so the masked forward equals the forward of
the sliced model exactly. Adapters are merged into the sorted weights afterwards (`merge`),
before quantization; slicing a merged weight is the same as merging the sliced weight and
the sliced adapter, so the merged model keeps its elastic property.

LoRA (Hu et al., arXiv 2106.09685, eq. 3): W' = W + (α/r)·A·B with A [d_in, r]
(uniform ±1/√d_in, PEFT's default) and B [r, d_out] = 0 at init, so fine-tuning starts
from the sorted model itself. One adapter per Hugging Face linear:

  attention  q (q, q_pass), k (k, k_pass), v, o
  mlp        gate, up, down
  mamba2     in_proj (z, x, B, C, dt), out_proj (out)

A HF linear that the elastic layout splits into several arrays (q_proj -> q and q_pass;
Mamba2 in_proj -> z | x | B | C | dt) gets one shared A and one B block per part: exactly
a LoRA on the packed HF linear, since the packed output is the concatenation of the parts.
Each part's product is reshaped into the part's elastic layout (q: [D, K, G, 2, P];
o: [K, G, R, D] with the K·G·R input rows; out: [H, C, D]), so pruned input rows and
output columns of the update are sliced with the weight.

Dropout. The merged weight is what the masked forward sees, so PEFT's per-token dropout of
the LoRA input cannot be expressed; here dropout drops input *features* of the adapter
(rows of A, rescaled by 1/(1−p)) with one mask per adapter per micro-batch. Same
expectation as input dropout, shared across the tokens of a micro-batch.

Precision. Adapters, their gradients and the AdamW state are float32. With
compute_dtype="bfloat16" the frozen weights, the merged weights and the activations are
bfloat16; an update smaller than bfloat16's spacing at W (≈0.4 % of |W|) is rounded away
in the forward (the gradient still reaches A and B). bfloat16 is meant for accelerators;
on CPU it is no faster (benchmarks/finetune-cpu.json).

Determinism. Every random choice of a step (its rate, its dropout masks) is a function of
(seed, step) (`step_keys`), so the driver (`finetune.train`) can resume a killed run
bit-identically. Nothing here does I/O or logs.

Shapes: B windows per micro-batch, T tokens per window, M micro-batches per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniql_jax.compress import masks as mask_lib
from uniql_jax.config import ModelConfig
from uniql_jax.eval import window_nll, window_nll_core

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
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (static: part of the jitted step's signature)."""

    rank: int = 8  # r
    alpha: float = 16.0  # α; the update is scaled by α / r
    dropout: float = 0.05  # probability of dropping an adapter input feature (module docstring)
    targets: tuple[str, ...] = ALL_TARGETS  # adapter names of LORA_TARGETS to train

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # hashable: a static jit argument
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(ALL_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; expected some of {ALL_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the optimizer steps (static: part of the jitted step's signature).

    The step reads the schedule, the clip and the seed; the driver also takes the batch shape
    (batch_size · grad_accum windows of seq_len tokens per step) and the compute dtype from here.
    """

    steps: int  # optimizer steps in the whole run
    lr: float = 1e-4  # peak learning rate (AdamW)
    warmup_steps: int | None = None  # linear warm-up from 0 (None: min(100, steps // 10)), then cosine decay
    end_lr_ratio: float = 0.0  # the cosine decay ends at lr · end_lr_ratio
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the adapters
    clip_norm: float = 1.0  # global gradient-norm clip (0: none)
    batch_size: int = 8  # windows per micro-batch (B)
    grad_accum: int = 1  # micro-batches per optimizer step (M)
    seq_len: int = 256  # tokens per packed window (T)
    compute_dtype: str = "float32"  # dtype of the frozen weights and activations: one of COMPUTE_DTYPES
    remat: bool = True  # recompute each block's activations in the backward pass (SmolLM2, 8 x 512 tokens: step
    # temporaries 13.4 -> 0.86 GB at about +10 % step time; benchmarks/cpu-finetune-memory-smollm2.json)
    seed: int = 0  # batch order, rates, dropout and the initial A: all functions of (seed, step)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", min(100, self.steps // 10))


# ============================================================================ adapters
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
    return tuple(
        tuple((name, _split_dims(name, bp[parts[0]].shape)[0],
               tuple((p, _split_dims(name, bp[p].shape)[1]) for p in parts))
              for name, parts in _adapter_parts(blk.kind, bp, lora_cfg.targets).items())
        for blk, bp in zip(cfg.blocks, params["blocks"]))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _adapter_A(seed, block, adapter, d_in: int, rank: int):
    """Adapter `adapter` of block `block`: A ~ U(−1/√d_in, 1/√d_in), float32 [d_in, r].

    One small program per (d_in, r), reused by every block and seed: a single program drawing
    every adapter of a 30-layer model compiled to about 200 MiB of resident memory that stayed
    for the whole run (SmolLM2)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), block), adapter)
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, (d_in, rank), F32, -bound, bound)


def init_lora(cfg: ModelConfig, params: dict, lora_cfg: LoraConfig = LoraConfig(), seed: int = 0) -> dict:
    """Adapters {"blocks": [{adapter: {"A": [d_in, r], "B": {part: [r, d_out_part]}}}]}, float32.

    A ~ U(−1/√d_in, 1/√d_in) (PEFT's kaiming-uniform default), B = 0: the merged model
    starts equal to `params`. Only the shapes of `params` are read.
    """
    rank = int(lora_cfg.rank)
    return {"blocks": [{name: {"A": _adapter_A(seed, i, j, d_in, rank),
                               "B": {p: jnp.zeros((rank, d_out), F32) for p, d_out in parts}}
                        for j, (name, d_in, parts) in enumerate(block)}
                       for i, block in enumerate(lora_shapes(cfg, params, lora_cfg))]}


def merge(params: dict, lora: dict, lora_cfg: LoraConfig, dropout_key=None) -> dict:
    """params with every adapted array replaced by W + (α/r)·reshape(A·B) (in W's dtype; LoRA eq. 3).

    With `dropout_key`, rows of A (adapter input features) are dropped with probability
    lora_cfg.dropout and the rest rescaled (module docstring). Pure and differentiable
    in `lora`; the merge is done in float32 and cast back to W's dtype.
    """
    blocks = [merge_block(bp, adapters, i, lora_cfg, dropout_key)
              for i, (bp, adapters) in enumerate(zip(params["blocks"], lora["blocks"]))]
    return {**params, "blocks": blocks}


def merge_block(block_params: dict, adapters: dict, index, lora_cfg: LoraConfig, dropout_key=None) -> dict:
    """`merge` of one block (its position `index` in the model, possibly traced: the dropout key's fold)."""
    bp = dict(block_params)
    for j, (name, ad) in enumerate(sorted(adapters.items())):
        A = ad["A"]  # [d_in, r]
        if dropout_key is not None and lora_cfg.dropout > 0.0:
            k = jax.random.fold_in(jax.random.fold_in(dropout_key, index), j)
            keep_Din = jax.random.bernoulli(k, 1.0 - lora_cfg.dropout, (A.shape[0],))
            A = A * (keep_Din.astype(F32) / (1.0 - lora_cfg.dropout))[:, None]
        for part, B in ad["B"].items():  # B [r, d_out_part]
            W = bp[part]  # the part's elastic layout, d_in · d_out_part elements
            delta = (lora_cfg.scale * (A @ B)).reshape(W.shape)
            bp[part] = (W.astype(F32) + delta).astype(W.dtype)
    return bp


@functools.partial(jax.jit, static_argnums=(0, 1))
def merged_params(cfg: ModelConfig, lora_cfg: LoraConfig, base: dict, lora: dict) -> dict:
    """`merge` without dropout, jitted."""
    del cfg  # part of the cache key only: the structure of `base` follows it
    return merge(base, lora, lora_cfg)


@functools.partial(jax.jit, static_argnums=(0, 1))
def adapted_window_nll(cfg: ModelConfig, lora_cfg: LoraConfig, base: dict, lora: dict, tokens_BxT, masks=None):
    """`window_nll` of the merged model (no dropout) -> float32 [B], without a merged copy of the model.

    Each block's adapters are merged inside its own body of the scanned forward
    (`eval.rematerialized_blocks`), so only one block's merged weights exist at a time; the
    whole-model alternative `window_nll(merged_params(...))` holds a second copy of every
    weight (+538 MB for SmolLM2-135M)."""
    def adapt(index, block_params, adapters):
        return merge_block(block_params, adapters, index, lora_cfg)

    return window_nll_core(cfg, base, tokens_BxT, masks=masks, remat=True, adapt=adapt, adapters=lora["blocks"])


def cast_floats(tree, dtype):
    """Floating leaves cast to `dtype` (int leaves such as RoPE pair indices unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ============================================================================ rates and randomness
def rate_logits(n_rates: int) -> jax.Array:
    """Log-probabilities (unnormalized) of rate indices of `mask_table` (ascending rate) -> [n_rates].

    Index i (ascending rate) is position n−1−i in ascending keep ratio, so the heaviest
    pruning gets exp(0), the lightest exp(−0.1·(n−1)).
    """
    position = (n_rates - 1) - jnp.arange(n_rates, dtype=F32)
    return -RATE_DECAY * position


def rate_probs(n_rates: int) -> np.ndarray:
    """The sampling probabilities of the rate indices, float64 [n_rates]."""
    return np.asarray(jax.nn.softmax(rate_logits(n_rates)), np.float64)


def step_keys(seed: int, step):
    """(rate key, dropout key) of one optimizer step: a function of (seed, step) only."""
    return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), step))


def sample_rate_index(seed: int, step, n_rates: int):
    """The rate index (into `mask_table`'s ascending rates) that optimizer step `step` trains."""
    return jax.random.categorical(step_keys(seed, step)[0], rate_logits(n_rates))


# ============================================================================ loss and step
def loss(lora: dict, base: dict, cfg: ModelConfig, lora_cfg: LoraConfig, tokens_BxT, masks, dropout_key=None,
         remat: bool = False):
    """Mean next-token NLL (float32) of the masked forward of the merged model (tokens 2..T of each window).

    `remat`: recompute block activations in the backward pass (`eval.window_nll_core`),
    merging each block's adapters inside its recomputed body, so neither the merged
    weights nor their gradient exist for the whole model at once; same value and gradient."""
    if remat:
        def adapt(index, block_params, adapters):
            return merge_block(block_params, adapters, index, lora_cfg, dropout_key)

        nll_B = window_nll_core(cfg, base, tokens_BxT, masks=masks, remat=True, adapt=adapt, adapters=lora["blocks"])
    else:
        nll_B = window_nll(cfg, merge(base, lora, lora_cfg, dropout_key), tokens_BxT, masks=masks)
    return jnp.sum(nll_B) / (tokens_BxT.shape[0] * (tokens_BxT.shape[1] - 1))


def _schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to tc.lr, then cosine decay to tc.lr · tc.end_lr_ratio at tc.steps."""
    warmup = min(tc.warmup_steps, max(tc.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                              tc.lr * tc.end_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the schedule of `_schedule` (after a global-norm clip when tc.clip_norm > 0)."""
    chain = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
    return optax.chain(*chain, optax.adamw(_schedule(tc), weight_decay=tc.weight_decay))


def learning_rate(tc: TrainConfig, step) -> float:
    """The learning rate optimizer step `step` (0-based) applies."""
    return float(_schedule(tc)(step))


def accumulated_grads(cfg: ModelConfig, lora_cfg: LoraConfig, lora: dict, base: dict, batch_MxBxT, masks,
                      dropout_key=None, remat: bool = False):
    """(mean loss, mean gradient w.r.t. `lora`) over M micro-batches int32 [M, B, T], scanned.

    Micro-batch m uses dropout key fold_in(dropout_key, m); equal to one batch of M·B
    windows when dropout is off (all windows have the same length).
    """
    grad_fn = jax.value_and_grad(loss)

    def micro(carry, inputs):
        grads_acc, loss_acc = carry
        tokens_BxT, m = inputs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, m)
        value, grads = grad_fn(lora, base, cfg, lora_cfg, tokens_BxT, masks, key, remat)
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
                                     step_keys(tc.seed, step)[1], tc.remat)
    updates, opt = make_optimizer(tc).update(grads, state["opt"], state["lora"])
    lora = optax.apply_updates(state["lora"], updates)
    metrics = {"loss": value, "rate_index": rate_index, "grad_norm": optax.global_norm(grads)}
    return {"lora": lora, "opt": opt}, metrics
