"""Tiny models of any arch trained from scratch on a text file (the embedded defaults), as standard HF checkpoints.

``train_tiny(TinyConfig(arch=..., out=...))`` does the work of ``python -m experiments.train_tiny``;
``table()`` is the results table of the embedded defaults (``--table``).

Steps: split the text into documents and hold out the last 10 % (uniql_jax.data);
train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on the training
documents only; build the model from a ModelConfig with uq.init_params; train
with optax AdamW and a warmup + cosine schedule on random windows of the training
stream, the loss computed with uq.forward (one source of truth); write
config.json + model.safetensors (converters.hf.save) and the tokenizer
(PreTrainedTokenizerFast.save_pretrained). Then evaluate on the held-out
documents: perplexity through uq.perplexity and through transformers (PyTorch) on
the same windows, the unigram perplexity of the same tokens, and a greedy
continuation of "Once upon a time"; everything lands in results.json.
Same --seed, same data, same flags: same tokenizer, batches and weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import uniql_jax as uq
from converters import hf, llama2c
from uniql_jax.config import ARCHS, ModelConfig, layout_config
from uniql_jax.data import calibration_windows, holdout, load_documents, read_text, split_documents, token_stream
from uniql_jax.eval import unigram_perplexity, windows
from uniql_jax.paths import DEFAULTS, STORIES260K, TINYSTORIES

SPECIAL = "<|endoftext|>"  # id 0: BOS at the start of every document (also EOS)
PROMPT = "Once upon a time"

# Per-arch geometry of the embedded defaults (every prunable axis has room: several kv
# heads, head_dim >= 16, MLP width >= 256, d_state >= 16). Layout letters: M Mamba2,
# * attention, - MLP (Nemotron-H: one block per layer; Bamba: a mixer per layer, each
# followed by its MLP).
PRESETS = {
    "llama": dict(hidden=128, layers=4, heads=8, kv_heads=4, head_dim=16, mlp=384, tie=False),
    "qwen2": dict(hidden=128, layers=4, heads=8, kv_heads=4, head_dim=16, mlp=384, tie=False),
    "mamba2": dict(hidden=128, layers=8, ssm_heads=8, ssm_head_dim=32, d_state=32, groups=1, tie=True),
    "nemotron_h": dict(hidden=128, pattern="M-M*-M-M-", heads=8, kv_heads=4, head_dim=16, mlp=384,
                       ssm_heads=8, ssm_head_dim=32, d_state=32, groups=1, tie=False),
    "bamba": dict(hidden=128, pattern="MM*M", heads=8, kv_heads=4, head_dim=16, mlp=384,
                  ssm_heads=8, ssm_head_dim=32, d_state=32, groups=1, tie=False),
}


# ----------------------------------------------------------------------------- model config
def tiny_config(arch: str, vocab_size: int, seq_len: int, **overrides) -> ModelConfig:
    """The ModelConfig of a tiny model of `arch` (PRESETS[arch] updated by the non-None `overrides`)."""
    g = dict(PRESETS[arch])
    g.update({k: v for k, v in overrides.items() if v is not None})
    if "pattern" in g:
        letters = set(g["pattern"]) | ({"-"} if arch == "bamba" else set())  # bamba: an MLP after every mixer
    else:
        letters = {"M"} if arch == "mamba2" else {"*", "-"}
    fields = dict(vocab_size=vocab_size, hidden_size=g["hidden"], rms_norm_eps=1e-5, tie_word_embeddings=g["tie"],
                  bos_token_id=0, eos_token_id=0, max_position_embeddings=max(seq_len, 512) if "*" in letters else 2048,
                  intermediate_size=g.get("mlp", 0) if "-" in letters else 0)
    if "*" in letters:
        fields.update(num_heads=g["heads"], num_kv_heads=g["kv_heads"], head_dim=g["head_dim"],
                      attention_bias=arch == "qwen2")
    if "M" in letters:
        fields.update(ssm_heads=g["ssm_heads"], ssm_head_dim=g["ssm_head_dim"], ssm_groups=g["groups"],
                      ssm_state=g["d_state"], conv_kernel=4, ssm_chunk_size=min(64, seq_len))
    return layout_config(arch, layers=g.get("layers"), pattern=g.get("pattern"), **fields)


def count_params(params) -> int:
    """Number of floating-point parameters of a params tree (integer pair indices excluded)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params) if np.issubdtype(np.asarray(x).dtype, np.floating)))


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE (`tokenizers`) trained on `documents`, wrapped for transformers.

    Id 0 is <|endoftext|>; encoding a text adds it in front (the BOS of a
    document, as in training), decoding skips it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A {SPECIAL} $B",
                                                       special_tokens=[(SPECIAL, tok.token_to_id(SPECIAL))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL)


# ----------------------------------------------------------------------------- training


# Float parameters that the HF architectures do not have: held at their initial value (zero).
NOT_IN_HF = {"o_bias"}  # attention output bias, a slot for the v bias folded in by sorting


def split_trainable(params):
    """(trained leaves, fixed leaves, structure): integer leaves (pair indices) and NOT_IN_HF stay fixed."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    is_trained = tuple(bool(np.issubdtype(np.asarray(x).dtype, np.floating))
                       and getattr(path[-1], "key", None) not in NOT_IN_HF for path, x in leaves_with_path)
    leaves = [x for _, x in leaves_with_path]
    trainable = [x for x, t in zip(leaves, is_trained) if t]
    frozen = [x for x, t in zip(leaves, is_trained) if not t]
    return trainable, frozen, (treedef, is_trained)


def merge_trainable(trainable, frozen, structure):
    treedef, is_trained = structure
    it_t, it_f = iter(trainable), iter(frozen)
    return treedef.unflatten([next(it_t) if t else next(it_f) for t in is_trained])


@functools.lru_cache(maxsize=16)
def optimizer(lr: float, warmup: int, steps: int, weight_decay: float, decay_mask: tuple[bool, ...]):
    """(optax AdamW with global-norm clipping, its warmup + cosine schedule); cached so jit reuses it."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=list(decay_mask)))
    return opt, schedule


def next_token_loss(cfg, params, batch):
    """Mean next-token cross entropy (float32) of tokens 2..T of each window int32 [B, T], from uq.forward."""
    logits = uq.forward(cfg, params, batch)[:, :-1]  # [B, T-1, V]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]
    return jnp.mean(nll)


@functools.partial(jax.jit, static_argnames=("cfg", "structure", "hparams"))
def train_step(trainable, frozen, opt_state, batch, *, cfg, structure, hparams):
    """One AdamW step; returns (trainable, opt_state, loss). Static: config, tree structure, optimizer settings."""
    opt, _ = optimizer(*hparams)
    loss, grads = jax.value_and_grad(lambda t: next_token_loss(cfg, merge_trainable(t, frozen, structure), batch))(
        trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def train(cfg, stream: np.ndarray, *, steps: int, batch_size: int, seq_len: int, lr: float, warmup: int,
          weight_decay: float, seed: int, log_every: int = 10):
    """AdamW + warmup/cosine on random non-overlapping windows of `stream`; returns (params, history).

    Initial weights: uq.init_params(cfg, seed); the batch of step i: calibration_windows
    with seed (seed, i). No decay on 1-D weights (norms, biases, A_log, D, dt_bias).
    """
    trainable, frozen, structure = split_trainable(uq.init_params(cfg, seed))
    hparams = (float(lr), int(warmup), int(steps), float(weight_decay), tuple(x.ndim >= 2 for x in trainable))
    opt, schedule = optimizer(*hparams)
    opt_state = opt.init(trainable)
    history, recent = [], []
    bar = tqdm(range(steps), desc=f"train {cfg.arch}", unit="step", mininterval=2.0, file=sys.stdout)
    for i in bar:
        batch = jnp.asarray(calibration_windows(stream, batch_size, seq_len, seed=seed * 1_000_003 + i))
        trainable, opt_state, loss = train_step(trainable, frozen, opt_state, batch, cfg=cfg, structure=structure,
                                                hparams=hparams)
        recent.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            mean = float(np.mean([float(x) for x in recent]))
            recent = []
            history.append({"step": i + 1, "loss": round(mean, 4), "lr": float(schedule(i))})
            bar.set_postfix(loss=f"{mean:.3f}")
    return jax.tree.map(np.asarray, merge_trainable(trainable, frozen, structure)), history


# ----------------------------------------------------------------------------- evaluation


def transformers_perplexity(folder, tokens: np.ndarray, seq_len: int, batch_size: int = 16) -> float:
    """The perplexity of uq.perplexity, computed by transformers (PyTorch, float32) on the same windows."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    total, count = 0.0, 0
    wins = torch.from_numpy(windows(tokens, seq_len).astype(np.int64))
    with torch.no_grad():
        for s in range(0, len(wins), batch_size):
            batch = wins[s:s + batch_size]
            logits = model(batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def greedy_sample(cfg, params, tokenizer, prompt: str = PROMPT, max_new_tokens: int = 48) -> str:
    ids = tokenizer(prompt)["input_ids"]
    out = uq.generate(cfg, params, jnp.asarray([ids], jnp.int32), max_new_tokens)
    return tokenizer.decode(np.asarray(out[0]), skip_special_tokens=True)


def evaluate(folder, heldout_docs: list[str], seq_len: int) -> dict:
    """Held-out metrics of a saved checkpoint, loaded back through converters.hf."""
    cfg, params = hf.load(folder)
    tok = hf.load_tokenizer(folder)
    tokens = token_stream(heldout_docs, tok)
    t0 = time.perf_counter()
    ppl = uq.perplexity(cfg, params, tokens, seq_len=seq_len)
    eval_s = time.perf_counter() - t0
    return {"documents": len(heldout_docs), "tokens": int(len(tokens)), "seq_len": seq_len,
            "windows": len(tokens) // seq_len, "ppl": ppl, "ppl_transformers": transformers_perplexity(folder, tokens, seq_len),
            "unigram_ppl": unigram_perplexity(tokens, seq_len=seq_len), "eval_s": round(eval_s, 2),
            "greedy": greedy_sample(cfg, params, tok)}


# ----------------------------------------------------------------------------- main


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Settings of one tiny model's training (the flags of ``python -m experiments.train_tiny``)."""

    arch: str
    out: str  # output folder: config.json, model.safetensors, the tokenizer, results.json
    text: str = str(TINYSTORIES)  # training text file
    holdout: float = 0.1  # fraction of documents held out (the last ones)
    vocab_size: int = 1024
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 180
    lr: float = 5e-3
    warmup: int = 15
    weight_decay: float = 0.1
    seed: int = 0
    # overrides of the arch preset (None: the preset's)
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    mlp: int | None = None
    ssm_heads: int | None = None
    ssm_head_dim: int | None = None
    d_state: int | None = None
    groups: int | None = None
    pattern: str | None = None  # hybrid layout, letters M (Mamba2), * (attention), - (MLP; nemotron_h only)


def train_tiny(config: TinyConfig) -> dict:
    """Train, save and evaluate one tiny model (the module docstring's steps) -> the results.json dict."""
    out = Path(config.out)
    text_path = Path(config.text)
    docs = split_documents(read_text(text_path))
    train_docs, held_docs = holdout(docs, config.holdout)
    print(f"{text_path.name}: {len(docs)} documents, training on {len(train_docs)}, holding out {len(held_docs)}")

    t0 = time.perf_counter()
    tok = train_tokenizer(train_docs, config.vocab_size)
    stream = token_stream(train_docs, tok)
    print(f"tokenizer: vocab {len(tok)}, {len(stream)} training tokens ({time.perf_counter() - t0:.1f} s)")

    overrides = {k: getattr(config, k) for k in ("hidden", "layers", "pattern", "heads", "kv_heads", "head_dim", "mlp",
                                               "ssm_heads", "ssm_head_dim", "d_state", "groups")}
    cfg = tiny_config(config.arch, len(tok), config.seq_len, **overrides)
    hf.mapping_for(cfg.arch).config_to_hf(cfg)  # fail now, not after training, if HF cannot express it
    t0, cpu0 = time.perf_counter(), time.process_time()
    params, history = train(cfg, stream, steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len,
                            lr=config.lr, warmup=config.warmup, weight_decay=config.weight_decay, seed=config.seed)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    n_params = count_params(params)
    print(f"trained {n_params:,} parameters in {train_s:.0f} s (CPU time {train_cpu_s:.0f} s); final loss {history[-1]['loss']:.4f}")

    out.mkdir(parents=True, exist_ok=True)
    hf.save(cfg, params, out)
    tok.save_pretrained(str(out))
    results = {
        "arch": config.arch, "params": n_params, "train_time_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1), "final_loss": history[-1]["loss"],
        "train_tokens": int(len(stream)), "tokens_seen": config.steps * config.batch_size * config.seq_len,
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "args": {k: v for k, v in dataclasses.asdict(config).items() if k != "out"} | {"text": text_path.name},
        "history": history,
    }
    results["heldout"] = evaluate(out, held_docs, config.seq_len)
    h = results["heldout"]
    print(f"held-out ppl {h['ppl']:.4f} (transformers {h['ppl_transformers']:.4f}, unigram {h['unigram_ppl']:.2f})")
    print(f"greedy: {h['greedy']!r}")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def stories260k_heldout(text=TINYSTORIES, seq_len: int = 256) -> dict:
    """The real stories260K (llama2.c) on the same held-out stories, through uq.perplexity."""
    cfg, params = llama2c.load(STORIES260K / "stories260K.bin")
    tok = llama2c.load_tokenizer(STORIES260K / "tok512.bin")
    tokens = token_stream(load_documents(text, part="heldout"), tok)
    return {"params": count_params(params), "tokens": int(len(tokens)), "seq_len": seq_len,
            "ppl": uq.perplexity(cfg, params, tokens, seq_len=seq_len),
            "unigram_ppl": unigram_perplexity(tokens, seq_len=seq_len)}


def table(defaults=DEFAULTS, with_stories260k: bool = True) -> str:
    """The markdown results table of the embedded defaults (from their results.json)."""
    rows = ["| arch | params | train time | final train loss | held-out ppl (uq) | held-out ppl (transformers) "
            "| unigram ppl | greedy continuation of \"Once upon a time\" |", "|" + "---|" * 8]

    for arch in ARCHS:
        f = Path(defaults) / arch / "results.json"
        if not f.is_file():
            rows.append(f"| {arch} | (not trained yet) |||||||")
            continue
        r = json.loads(f.read_text())
        h = r["heldout"]
        sample = h["greedy"].replace("\n", "⏎").replace("|", "\\|")
        rows.append(f"| {arch} | {r['params'] / 1e6:.2f} M | {r['train_time_s'] / 60:.1f} min | {r['final_loss']:.3f} "
                    f"| {h['ppl']:.4f} | {h['ppl_transformers']:.4f} | {h['unigram_ppl']:.1f} | {sample} |")
    if with_stories260k and (STORIES260K / "stories260K.bin").is_file():
        s = stories260k_heldout()
        rows.append(f"| stories260K (llama2.c, vocab 512) | {s['params'] / 1e6:.2f} M | (pretrained) | | "
                    f"{s['ppl']:.4f} | | {s['unigram_ppl']:.1f} | |")
    return "\n".join(rows)
