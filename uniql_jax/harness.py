"""The lm-evaluation-harness backend: zero-shot / few-shot accuracy of any (cfg, params).

Importing this module registers the lm-eval model ``uniql``. lm-eval's command line has no plugin
hook, so this module is its thin wrapper: the same arguments, with the backend registered::

    python -m uniql_jax.harness --model uniql --model_args ckpt=runs/llama-x,rate=0.25 --tasks hellaswag
    python -m uniql_jax.harness --model uniql --model_args pretrained=HF_DIR_OR_GGUF,batch_size=8 --tasks piqa

(a bare ``lm_eval --model uniql`` does not know the backend; from Python, ``import uniql_jax.harness``
before ``lm_eval.simple_evaluate(model="uniql", ...)``; ``python -m experiments.evaluate --tasks ...``
does it for every rate of a checkpoint). ``ckpt=DIR`` is an ``experiments.compress`` output folder (or its
``checkpoint/``): the full-rank model is read once into an ``ElasticModel`` and ``set_rate`` switches
the pruning rate in-process. ``pretrained=`` is an uncompressed Hugging Face folder or GGUF file
converted on the fly, spelled as lm-eval's own ``hf`` backend spells it. ``UniQLM(cfg=..., params=...,
tokenizer=...)`` wraps any model in memory.

Semantics follow lm-eval's ``hf`` backend (``lm_eval/models/huggingface.py``, HFLM) request by
request: context / continuation tokenization (``TemplateLM._encode_pair``, the prefix token for an
empty context), ``(context + continuation)[-(max_length + 1):][:-1]`` as the model input (left
truncation), the continuation scored on the last ``len(continuation)`` positions, the greedy flag
as "every continuation token is the argmax", rolling windows from
``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window`` with ``context_len=1``, and
greedy ``generate_until`` with the context left-truncated to ``max_length - max_gen_toks`` tokens and
the text cut at the first stop sequence (EOS included).

Shapes: requests are sorted by length and packed into buckets of a fixed batch (``batch_size`` rows
per device) and a sequence length that is a power of two (at least ``min_bucket``, capped at
``max_length``), right-padded (the model is causal, so padding never changes a scored position). A
bucket's program is compiled once per model shape and reused for every later batch, task and call;
``compiles`` counts the compilations seen per bucket length. The batch is split over the "data" axis
of the default mesh (``uniql_jax.eval.data_mesh``: every device of every process), the parameters
replicated over it. Across processes every process runs the same requests (lm-eval's own rank and
world size stay 0 and 1), feeds only its rows of each batch, and gets every row's scores back
(all-gathered, in request order); a caller writes results on process 0 only. Only the
per-position log-probability of the target token and the greedy flag [B, T] leave the device, never
the [B, T, V] logits.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from uniql_jax import distributed
from uniql_jax.eval import data_mesh
from uniql_jax.inference import forward

log = logging.getLogger("uniql_jax.harness")


@functools.partial(jax.jit, static_argnums=0)
def token_scores(cfg, params, inputs_BxT, targets_BxT):
    """(log p(target_t | inputs_<=t) float32 [B, T], target_t == argmax bool [B, T]) of one padded batch."""
    logits = forward(cfg, params, inputs_BxT).astype(jnp.float32)  # [B, T, V]
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
    return logp, jnp.argmax(logits, axis=-1) == targets_BxT


@functools.partial(jax.jit, static_argnums=0)
def next_tokens(cfg, params, inputs_BxT, lengths_B):
    """Greedy next token int32 [B] after the first `lengths_B` tokens of each right-padded row."""
    logits = forward(cfg, params, inputs_BxT)  # [B, T, V]
    last = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    return jnp.argmax(last, axis=-1).astype(jnp.int32)


def bucket_length(n: int, *, min_bucket: int, max_length: int) -> int:
    """The padded length of a sequence of n tokens: the next power of two >= max(n, min_bucket), at most max_length."""
    return min(max(min_bucket, 1 << max(0, math.ceil(math.log2(max(n, 1))))), max_length)


def run_folder_tokenizer(ckpt: Path):
    """The tokenizer `experiments.compress` stores beside a checkpoint (DIR/tokenizer or ../tokenizer)."""
    from converters import hf

    for folder in (ckpt / "tokenizer", ckpt.parent / "tokenizer"):
        if (folder / "tokenizer.bin").is_file():
            raise ValueError(f"{folder}: a llama2.c tokenizer; the lm-eval backend needs a transformers tokenizer")
        if folder.is_dir():
            return hf.load_tokenizer(folder)
    raise ValueError(f"{ckpt}: no tokenizer/ folder beside the checkpoint")


@register_model("uniql")
class UniQLM(TemplateLM):
    """lm-eval LM over a uniql-jax model (see the module docstring for the model_args)."""

    backend = "causal"

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """As lm-eval's, except that a model_args entry wins over the same key from the CLI's own flags
        (lm-eval's CLI always passes its --batch_size, default 1: with batch_size in model_args the
        base method fails with "got multiple values")."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def __init__(self, ckpt=None, rate=None, pretrained=None, batch_size=8, max_length=None, max_gen_toks=256,
                 min_bucket=16, add_bos_token=None, prefix_token_id=None, *, cfg=None, params=None, tokenizer=None,
                 elastic=None, mesh=None, **unused):
        super().__init__()
        if unused:
            log.warning("uniql backend: ignoring model_args %s", sorted(unused))
        sources = [x is not None for x in (ckpt, pretrained, params if elastic is None else elastic)]
        if sum(sources) != 1:
            raise ValueError("give exactly one of ckpt=DIR, pretrained=HF_DIR_OR_GGUF, or cfg/params (or elastic)")
        self.elastic = elastic
        if ckpt is not None:
            from uniql_jax.elastic import ElasticModel

            path = Path(ckpt).expanduser()
            ckpt_dir = path / "checkpoint" if (path / "checkpoint").is_dir() else path
            self.elastic = ElasticModel.from_checkpoint(ckpt_dir)
            tokenizer = tokenizer or run_folder_tokenizer(path if ckpt_dir != path else path.parent)
        elif pretrained is not None:
            from converters import hf

            cfg, params = hf.load(pretrained)
            tokenizer = tokenizer or hf.load_tokenizer(pretrained)
        if tokenizer is None:
            raise ValueError("the uniql backend needs the model's tokenizer")
        self.tokenizer = tokenizer
        self.mesh = mesh or data_mesh()
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8  # fixed shapes: no search for the largest batch
        self.batch_per_device = int(batch_size)
        self.batch_rows = self.batch_per_device * self.mesh.shape["data"]
        self.min_bucket = int(min_bucket)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("1", "true")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.compiles: collections.Counter = collections.Counter()  # bucket length T -> programs compiled
        self.batches: collections.Counter = collections.Counter()  # bucket length T -> batches run
        if self.elastic is not None:
            self.set_rate(None if rate is None else float(rate))
        else:
            if rate not in (None, 0, "0", 0.0):
                raise ValueError("rate= needs ckpt=DIR (a checkpoint with a rate table)")
            self._set_model(cfg, params)
        self._max_length = int(max_length) if max_length else int(self.cfg.max_position_embeddings)

    # ----- model -----------------------------------------------------------------------------
    def _set_model(self, cfg, params):
        self.cfg = cfg
        self.params = distributed.put_params(params, self.mesh)  # replicated over "data"

    def set_rate(self, rate):
        """Switch the checkpoint's model to a stored rate in-process (ckpt= / elastic= only)."""
        if self.elastic is None:
            raise ValueError("set_rate needs a model loaded from a checkpoint (ckpt=DIR)")
        self.rate = rate
        self._set_model(*self.elastic.set_rate(rate))

    def compile_count(self) -> int:
        return sum(self.compiles.values())

    def _run(self, fn, T: int, *arrays):
        """fn(cfg, params, *arrays) with the rows split over the mesh; compilations counted per bucket."""
        before = fn._cache_size()
        out = fn(self.cfg, self.params, *(distributed.put(a, self._rows) for a in arrays))
        out = distributed.to_host(out)  # across processes: an all-gather, every process gets every row
        self.compiles[T] += fn._cache_size() - before
        self.batches[T] += 1
        return out

    # ----- lm-eval properties (as HFLM) ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_per_device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "uniql")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ----- scoring ---------------------------------------------------------------------------
    def _score_sequences(self, seqs: list[list[int]], desc: str, disable_tqdm: bool):
        """Per sequence s (len >= 2): (log p [len(s) - 1], greedy [len(s) - 1]) of s[1:] given its prefixes,
        batched by bucket; the order of `seqs` is kept."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        by_bucket: dict[int, list[int]] = collections.defaultdict(list)
        for i in order:
            by_bucket[bucket_length(len(seqs[i]) - 1, min_bucket=self.min_bucket, max_length=self.max_length)].append(i)
        out: list = [None] * len(seqs)
        pbar = tqdm(total=len(seqs), desc=desc, disable=disable_tqdm or len(seqs) < 2 * self.batch_rows, leave=False)
        for T, idx in sorted(by_bucket.items(), reverse=True):
            for s in range(0, len(idx), self.batch_rows):
                rows = idx[s:s + self.batch_rows]
                inputs = np.zeros((self.batch_rows, T), np.int32)  # unused rows / padding: token 0, discarded
                targets = np.zeros((self.batch_rows, T), np.int32)
                for r, i in enumerate(rows):
                    seq = seqs[i]
                    inputs[r, :len(seq) - 1] = seq[:-1]
                    targets[r, :len(seq) - 1] = seq[1:]
                logp, greedy = self._run(token_scores, T, inputs, targets)
                logp, greedy = np.asarray(logp), np.asarray(greedy)
                for r, i in enumerate(rows):
                    n = len(seqs[i]) - 1
                    out[i] = (logp[r, :n], greedy[r, :n])
                pbar.update(len(rows))
        pbar.close()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) | None, context_enc, continuation_enc) -> [(log p, is_greedy)]."""
        seqs, conts = [], []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError("empty context or continuation encoding")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens exceeds max_length {self.max_length}")
            # HFLM: the input is (ctx + cont)[-(max_length + 1):][:-1]; its targets are the same window shifted
            seqs.append((context_enc + continuation_enc)[-(self.max_length + 1):])
            conts.append(len(continuation_enc))
        res = []
        for (request_str, _, _), n_cont, (logp, greedy) in zip(
                requests, conts, self._score_sequences(seqs, "loglikelihood", disable_tqdm), strict=True):
            answer = (float(logp[-n_cont:].astype(np.float64).sum()), bool(greedy[-n_cont:].all()))
            res.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True):
            totals[k] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ----- generation ------------------------------------------------------------------------
    def _encode_context(self, context: str, max_ctx_len: int) -> list[int]:
        """HFLM.tok_batch_encode for one string: its special-token rule, then left truncation."""
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        return self.tokenizer(context, **special)["input_ids"][-max_ctx_len:]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, each step a forward of the right-padded bucket (exact for any causal model,
        one program per bucket; no cache, so it costs a full forward per new token)."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        jobs = []  # (index, context tokens, stop strings, max new tokens)
        for k, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0.0:
                raise ValueError(f"the uniql backend generates greedily; got {gen_kwargs}")
            max_ctx_len = self.max_length - max_gen
            if max_ctx_len <= 0:
                raise ValueError(f"max_gen_toks {max_gen} must be below max_length {self.max_length}")
            jobs.append((k, self._encode_context(context, max_ctx_len), until, max_gen))
        results: list = [None] * len(requests)
        by_bucket: dict[int, list] = collections.defaultdict(list)
        for job in sorted(jobs, key=lambda j: -len(j[1])):
            T = bucket_length(len(job[1]) + job[3], min_bucket=self.min_bucket, max_length=self.max_length)
            by_bucket[T].append(job)
        pbar = tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm, leave=False)
        for T, group in sorted(by_bucket.items(), reverse=True):
            for s in range(0, len(group), self.batch_rows):
                batch = group[s:s + self.batch_rows]
                for (k, _, until, _), text in zip(batch, self._generate_batch(batch, T), strict=True):
                    results[k] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[k].args, results[k])
                pbar.update(len(batch))
        pbar.close()
        return results

    def _generate_batch(self, batch, T: int) -> list[str]:
        tokens = np.zeros((self.batch_rows, T), np.int32)
        lengths = np.ones(self.batch_rows, np.int32)
        for r, (_, ctx, _, _) in enumerate(batch):
            tokens[r, :len(ctx)] = ctx
            lengths[r] = len(ctx)
        new = [[] for _ in batch]
        active = [True] * len(batch)
        while any(active):
            nxt = np.asarray(self._run(next_tokens, T, tokens, lengths))
            for r, (_, _, until, max_gen) in enumerate(batch):
                if not active[r]:
                    continue
                tok = int(nxt[r])
                if tok == self.eot_token_id:  # HF generate stops a row at EOS
                    active[r] = False
                    continue
                new[r].append(tok)
                tokens[r, lengths[r]] = tok
                lengths[r] += 1
                text = self.tok_decode(new[r], skip_special_tokens=False)
                if len(new[r]) >= max_gen or any(u and u in text for u in until):
                    active[r] = False
        return [self.tok_decode(toks) for toks in new]

    def get_model_info(self) -> dict:
        return {"arch": self.cfg.arch, "rate": getattr(self, "rate", None), "max_length": self.max_length}


if __name__ == "__main__":  # lm-eval's own CLI with the `uniql` backend registered (see the docstring)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
