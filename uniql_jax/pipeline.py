"""The compress pipeline as a library function: convert -> sort -> allocate -> [finetune] -> quantize -> evaluate.

    config = CompressConfig(arch="llama", quantizer="gptq", rates=(0.0, 0.15, 0.25, 0.35))
    inputs = load_inputs(config)                       # stage "convert": model, tokenizer, token streams
    cfg, params, table, report = compress(config, inputs)

`compress` runs the stages of UniQL in order, each timed (``report["timings_s"]``, docs/api.md):
sort (stage 1, ``compress.sort``), allocate the rate grid (stage 2; with a quantizer the
rounding steps keep every kept input axis whole quantization groups), masked LoRA fine-tuning
(optional), quantize once with the table, then the perplexity of every rate of the grid
(and lm-eval accuracy per rate when tasks are given). `report` is the dict `report.json`
holds; writing it, the checkpoint and the tokenizer is the caller's (``experiments.compress``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from uniql_jax import checkpoint, data, distributed
from uniql_jax.accuracy import accuracy_report
from uniql_jax.compress.allocate import allocate, default_steps, evaluate_rates, param_count
from uniql_jax.compress.sort import sort
from uniql_jax.elastic import ElasticModel
from uniql_jax.eval import blockwise_nll, perplexity
from uniql_jax.finetune.data import FinetuneData
from uniql_jax.finetune.lora import TrainConfig
from uniql_jax.finetune.train import finetune_stage
from uniql_jax.host_memory import peak_rss_mb
from uniql_jax.inference import generate
from uniql_jax.paths import DEFAULTS, STORIES260K, TINYSTORIES, InputError, user_path
from uniql_jax.quant.formats.packed import deployed_bytes
from uniql_jax.quant.plan import allocation_steps
from uniql_jax.quant.quantize import quantize

log = logging.getLogger(__name__)

# Windows per masked-LoRA step of `compress`, run as FINETUNE_BATCH // finetune_micro_batch accumulated
# micro-batches: the same gradient (up to dropout), activation memory of one micro-batch (SmolLM2, 512
# tokens: step temporaries 819 / 482 / 309 MiB at micro-batches of 8 / 4 / 2; benchmarks/cpu-finetune-memory-smollm2.json)
FINETUNE_BATCH = 8
FINETUNE_MICRO_BATCHES = tuple(m for m in range(1, FINETUNE_BATCH + 1) if FINETUNE_BATCH % m == 0)


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """Options of one compression run (the flags of ``python -m experiments.compress``, docs/api.md).

    Data sources are a text file or a dataset id ``NAME[:CONFIG][@SPLIT]``; None is the default:
    `default_data`'s train / test split when set (the CLI sets WikiText-2 for a user's --model),
    else the shared TinyStories text (training part for calibration, held-out part for evaluation).
    """

    arch: str  # model family; the model must be of this arch
    model: str | None = None  # HF folder, Hub id, .gguf or llama2.c .bin; None: the arch's embedded default
    quantizer: str = "gptq"  # gptq, uniquan, rtn or none
    bits: int = 4  # bits per weight: 2, 3, 4 or 8
    group_size: int = 128  # requested quantization group (reduced per matrix to divide every kept size)
    keep_embeddings_16bit: bool = False  # leave embeddings and lm_head unquantized
    embedding_bits: int | None = None  # bits of the embedding table and an untied head (None: `bits`)
    tied_head: str = "gptq"  # a tied table as output head: GPTQ on the final hidden states, or per-row rtn
    zero_point: bool = False  # uniform grids with a per-group offset (min/max) instead of symmetric ones
    act_order: bool = False  # gptq: columns in order of decreasing Hessian diagonal
    quantizer_options: tuple = ()  # ((key, value), ...) for the quantizer's driver (`quantize.method_options`)
    finetune_steps: int = 0  # masked LoRA steps (0: no fine-tuning)
    finetune_data: str | None = None  # text or JSON-lines (Alpaca) file; None: the calibration stream
    finetune_lr: float = 1e-3  # peak learning rate of the LoRA adapters
    finetune_micro_batch: int = 4  # windows per micro-batch of each FINETUNE_BATCH-window step (divides it)
    calib: str | None = None  # calibration data
    calib_samples: int = 64  # calibration windows
    seq_len: int = 256  # tokens per calibration / evaluation window
    rates: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)  # the grid stored and evaluated
    allocation: str = "block_influence"  # layer-wise allocation of each rate: block_influence or uniform
    eval: str | None = None  # evaluation data
    eval_windows: int = 0  # evaluate on the first N windows only (0: all)
    seed: int = 0  # seed of calibration sampling and fine-tuning
    default_data: str | None = None  # dataset id whose @train / @test stand in for a missing calib / eval
    num_fewshot: int | None = None  # lm-eval few-shot examples (with tasks)
    limit: float | None = None  # lm-eval documents per task (with tasks; < 1: a fraction)

    def __post_init__(self):
        if self.finetune_micro_batch not in FINETUNE_MICRO_BATCHES:
            raise ValueError(f"finetune_micro_batch must divide the {FINETUNE_BATCH} windows of a step, "
                             f"got {self.finetune_micro_batch}")


@dataclasses.dataclass
class Inputs:
    """What the convert stage loads: the model, its tokenizer and the token streams."""

    cfg: object  # ModelConfig
    params: dict
    tokenizer: object
    source: str  # the model file or folder read
    calib_stream: np.ndarray  # 1-D tokens the calibration windows come from (and fine-tuning by default)
    calib: np.ndarray  # int32 [calib_samples, seq_len]
    eval_tokens: np.ndarray  # 1-D evaluation stream (cut to eval_windows)
    calib_spec: str | None  # the calibration / evaluation data read (None: TinyStories)
    eval_spec: str | None
    convert_s: float  # wall time of loading all of the above


class Timer:
    """Wall time per named stage, and the process's peak memory when it ended, logged as it ends."""

    def __init__(self, log=print):
        self.timings, self.peak_mb, self.log = {}, {}, log

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()  # logged when done: a failing first stage prints only its error
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.peak_mb[name] = peak_rss_mb()  # monotone: the stage that raises it is the one that needed it
        self.log(f"[{name}] done in {self.timings[name]:.1f} s (peak host memory so far {self.peak_mb[name]:.0f} MB)")


# ----------------------------------------------------------------------------- convert
def default_model(arch: str) -> Path:
    """The embedded default checkpoint of an arch (stories260K stands in for llama until it exists)."""
    folder = DEFAULTS / arch
    if (folder / "config.json").is_file():
        return folder
    if arch == "llama":
        if not (STORIES260K / "stories260K.bin").is_file():
            raise InputError(f"no embedded default for llama and {STORIES260K} is absent; pass --model")
        return STORIES260K / "stories260K.bin"
    raise InputError(f"no embedded default model for arch {arch!r} yet; pass --model")


def load_model(arch: str, model: str | None):
    """(cfg, params, tokenizer, source) of `model` (None: the arch's embedded default); another arch is an error."""
    from converters import hf, llama2c

    source = Path(model) if model else default_model(arch)
    if str(source).endswith(".bin") and Path(source).is_file():
        cfg, params = llama2c.load(source)
        tok_file = Path(source).parent / "tok512.bin"
        tokenizer = llama2c.load_tokenizer(tok_file) if tok_file.is_file() else None
    else:
        cfg, params = hf.load(source)
        tokenizer = hf.load_tokenizer(source)
    if cfg.arch != arch:
        raise InputError(f"--model {source} is a {cfg.arch} checkpoint, not {arch}")
    return cfg, params, tokenizer, str(source)


def load_named_model(name: str):
    """(cfg, params, tokenizer, source) of "stories260K" (the real llama2.c model) or an arch's embedded
    default: the models the benchmarks and tests compare on."""
    if name == "stories260K":
        return load_model("llama", str(STORIES260K / "stories260K.bin"))
    return load_model(name, None)


def _text_tokens(spec, default, flag: str, tokenizer, split: str, part: str):
    """(token stream, the source read) of --calib / --eval: `spec`, else `default`@`split` (a one-line
    error asking for the flag when it cannot be loaded, never silently TinyStories), else TinyStories."""

    if spec is None and default is not None:
        spec = f"{default}@{split}"
        try:
            return data.token_source(spec, tokenizer, part), spec
        except data.DataError as e:
            raise InputError(f"no --{flag} given and its default {spec} cannot be loaded ({e}); "
                             f"pass --{flag} TEXT_FILE_OR_DATASET") from e
    return data.token_source(spec, tokenizer, part), spec


def load_inputs(config: CompressConfig) -> Inputs:
    """Stage "convert": the model and tokenizer, calibration windows and the evaluation stream."""

    start = time.perf_counter()
    cfg, params, tokenizer, source = load_model(config.arch, config.model)
    calib_stream, calib_spec = _text_tokens(config.calib, config.default_data, "calib", tokenizer, "train", "train")
    eval_tokens, eval_spec = _text_tokens(config.eval, config.default_data, "eval", tokenizer, "test", "heldout")
    if config.eval_windows:
        eval_tokens = eval_tokens[: config.eval_windows * config.seq_len]
    calib = data.calibration_windows(calib_stream, config.calib_samples, config.seq_len, seed=config.seed)
    return Inputs(cfg, params, tokenizer, source, calib_stream, calib, eval_tokens, calib_spec, eval_spec,
                  convert_s=time.perf_counter() - start)


# ----------------------------------------------------------------------------- the stages
def allocation_steps_for(cfg, quantizer: str | None, group_size: int) -> dict:
    """Rounding steps of the allocation: `default_steps`, and with a quantizer multiples that keep
    every kept input axis whole quantization groups (``quant.plan.allocation_steps``)."""

    steps = default_steps(cfg)
    return allocation_steps(cfg, group_size, steps) if quantizer not in (None, "none") else steps


def uniform_table(cfg, rates, group_size: int | None = 128, steps: dict | None = None) -> dict:
    """{rate: per-block sizes} keeping (1 - rate) of every prunable dim (uniform allocation, no
    calibration), rounded to `steps`, by default the steps `compress` allocates with for a quantizer
    of `group_size` (None: unquantized), so that a layout built from it is one `compress` produces."""

    steps = steps or allocation_steps_for(cfg, None if group_size is None else "rtn", group_size)
    return allocate(cfg, None, None, rates, method="uniform", steps=steps)


def compress(config: CompressConfig, inputs: Inputs | None = None, *, tasks=None, consume_inputs: bool = False) -> tuple:
    """Run the pipeline -> (cfg, params, table, report): the sorted (fine-tuned, quantized) full-rank
    model, its rate table and the report of docs/api.md.

    inputs: what `load_inputs(config)` returns (loaded here when None; its time is stage "convert").
    consume_inputs: hand ``inputs.params`` over (None afterwards; always so for inputs loaded
    here): sorting and quantizing then free each block they replace, so the float model is
    never held twice.
    tasks: (task names, lm_eval TaskManager) for lm-eval accuracy at every rate (report["accuracy"]).
    """

    timer = Timer(log.info)
    if inputs is None:
        with timer.stage("convert"):
            inputs = load_inputs(config)
        consume_inputs = True
    else:  # loaded by the caller: its time, logged as the stage would have been
        timer.timings["convert"] = round(inputs.convert_s, 3)
        timer.peak_mb["convert"] = peak_rss_mb()
        log.info(f"[convert] done in {timer.timings['convert']:.1f} s")
    cfg, params, calib, eval_tokens = inputs.cfg, inputs.params, inputs.calib, inputs.eval_tokens
    if consume_inputs:
        inputs.params = None
    else:  # the stages below free blocks of this copy of the containers only (the arrays are shared)
        params = {**params, "blocks": list(params["blocks"])}
    seq_len = config.seq_len
    log.info("%s: %s, %d parameters; %d calibration windows x %d tokens; %d evaluation tokens",
             inputs.source, cfg.arch, param_count(cfg), len(calib), seq_len, len(eval_tokens))
    report = {"arch": cfg.arch, "model": inputs.source, "quantizer": config.quantizer, "bits": config.bits,
              "group_size": config.group_size, "zero_point": config.zero_point, "act_order": config.act_order,
              "quantizer_options": dict(config.quantizer_options), "seed": config.seed,
              "seq_len": seq_len,
              "eval_windows": config.eval_windows, "embedding_bits": config.embedding_bits or config.bits,
              "tied_head": config.tied_head if cfg.tie_word_embeddings else None,
              "calib": inputs.calib_spec or str(TINYSTORIES) + " (train part)",
              "eval": inputs.eval_spec or str(TINYSTORIES) + " (held-out part)", "timings_s": timer.timings,
              "peak_host_mb": timer.peak_mb}
    base_ppl = perplexity(cfg, params, eval_tokens, seq_len=seq_len)
    report["baseline"] = {"ppl": base_ppl, "param_bytes": 2 * param_count(cfg), "params": param_count(cfg)}
    log.info("baseline perplexity %.4f", base_ppl)

    with timer.stage("sort"):
        cfg, params = sort(cfg, params, calib, consume=True)
    with timer.stage("allocate"):
        steps = allocation_steps_for(cfg, config.quantizer, config.group_size)
        table = allocate(cfg, params, calib, list(config.rates), method=config.allocation, steps=steps)
    if config.finetune_steps:
        report["rates_before_finetune"] = evaluate_rates(cfg, params, table, eval_tokens, seq_len=seq_len)
        with timer.stage("finetune"):
            text = FinetuneData(source=config.finetune_data,
                                tokens=None if config.finetune_data else inputs.calib_stream, tokenizer=inputs.tokenizer)
            train = TrainConfig(steps=config.finetune_steps, lr=config.finetune_lr, seq_len=seq_len, seed=config.seed,
                                batch_size=config.finetune_micro_batch,
                                grad_accum=FINETUNE_BATCH // config.finetune_micro_batch)
            params, report["finetune"] = finetune_stage(cfg, params, table, text, train)
    if config.quantizer != "none":
        report["rates_16bit"] = evaluate_rates(cfg, params, table, eval_tokens, seq_len=seq_len)
        with timer.stage("quantize"):
            params = quantize(cfg, params, calib, method=config.quantizer, bits=config.bits,
                              group_size=config.group_size, table=table,
                              quantize_embeddings=not config.keep_embeddings_16bit,
                              embedding_bits=config.embedding_bits, tied_head_gptq=config.tied_head == "gptq",
                              zero_point=config.zero_point, act_order=config.act_order,
                              options=dict(config.quantizer_options) or None,
                              consume=config.quantizer != "uniquan")
    with timer.stage("evaluate"):
        report["rates"] = evaluate_rates(cfg, params, table, eval_tokens, seq_len=seq_len)
    if tasks:

        with timer.stage("accuracy"):
            report["accuracy"] = accuracy_report(ElasticModel(cfg, params, table), inputs.tokenizer,
                                                 list(config.rates), *tasks, num_fewshot=config.num_fewshot,
                                                 limit=config.limit, log=log.info)
    return cfg, params, table, report


def checkpoint_meta(report: dict, eval_spec: str | None) -> dict:
    """The run settings stored in the checkpoint's manifest (`evaluate` reads seq_len, eval_windows and
    eval_source back; eval_source None: the held-out TinyStories default)."""
    meta = {k: report[k] for k in ("arch", "model", "quantizer", "bits", "group_size", "seed", "seq_len",
                                    "eval_windows", "calib", "eval")}
    meta["eval_source"] = eval_spec
    return meta


def save_checkpoint(folder: Path, cfg, params, table: dict, report: dict, eval_spec: str | None) -> Path:
    """``checkpoint.save`` of a compression result with its run settings (`checkpoint_meta`).

    Across processes a collective (every process calls it, on the same folder): the params are
    first placed on the default mesh (``distributed.put_params``: weights sharded over its
    "model" axis), so each process writes the shards its devices own; one process saves
    exactly as before."""
    if distributed.runtime().process_count > 1:
        params = distributed.put_params(params, distributed.default_mesh())
    return checkpoint.save(folder, cfg, params, table=table, meta=checkpoint_meta(report, eval_spec))


# ----------------------------------------------------------------------------- the run folder
# What `experiments.compress` writes into --out: checkpoint/ (uq.save), tokenizer/, report.json, report.png.
def checkpoint_dir(path) -> tuple[Path, Path]:
    """(run folder with the tokenizer, checkpoint folder) of a run folder or its checkpoint/, absolute."""

    path = user_path(path)
    if (path / "checkpoint").is_dir():
        return path, path / "checkpoint"
    if (path.parent / "tokenizer").exists():
        return path.parent, path
    if not path.exists():
        raise InputError(f"--ckpt {path}: no such directory")
    return path, path


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Store the model's tokenizer beside a checkpoint so evaluate / generate need no source model."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "pieces"):  # llama2.c: its own binary format
        import struct

        blob = struct.pack("<i", max(len(p) for p in tokenizer.pieces))
        for piece, score in zip(tokenizer.pieces, tokenizer.scores):
            blob += struct.pack("<fi", score, len(piece)) + piece
        (folder / "tokenizer.bin").write_bytes(blob)
    else:
        tokenizer.save_pretrained(folder)


def load_saved_tokenizer(run_dir):
    """The tokenizer `save_tokenizer` stored in `run_dir`/tokenizer."""
    from converters import hf, llama2c

    folder = Path(run_dir) / "tokenizer"
    if (folder / "tokenizer.bin").is_file():
        return llama2c.load_tokenizer(folder / "tokenizer.bin")
    if folder.is_dir():
        return hf.load_tokenizer(folder)
    raise InputError(f"{run_dir}: no tokenizer stored beside the checkpoint")


def checkpoint_perplexity(ckpt, rates, tokens, *, seq_len: int, batch_size: int = 8,
                          mesh=None) -> tuple[list[dict], int]:
    """([{"rate", "ppl", "params", "param_bytes"}] per rate, evaluation programs compiled) of a checkpoint.

    The full-rank model is read once (``ElasticModel``; with `mesh`, sharded over it, each process
    reading only its own shards: ``checkpoint.load(mesh=)``); each rate is sliced in memory and
    evaluated block by block, one compiled program per distinct block shape shared by all rates."""

    model = ElasticModel.from_checkpoint(ckpt, mesh=mesh)
    before = blockwise_nll.compiles()
    rows = []
    for r in rates:
        cfg, params = model.set_rate(r)
        ppl = perplexity(cfg, params, tokens, seq_len=seq_len, batch_size=batch_size)
        rows.append({"rate": r, "ppl": ppl, "params": param_count(cfg), "param_bytes": deployed_bytes(params)})
        log.info("rate %.2f: perplexity %.4f", r, ppl)
    return rows, blockwise_nll.compiles() - before


def generate_text(run_dir, ckpt, rate: float, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                  seed: int = 0, impl: str = "xla") -> str:
    """The prompt and its continuation, decoded, from the checkpoint sliced to `rate`."""
    cfg, params = checkpoint.load(ckpt, rate=rate)
    tokenizer = load_saved_tokenizer(run_dir)
    ids = data.encode_documents([prompt], tokenizer)[0]
    out = generate(cfg, params, jnp.asarray([ids], jnp.int32), max_new_tokens, temperature=temperature, seed=seed,
                   impl=impl)
    llama2c = hasattr(tokenizer, "pieces")
    return tokenizer.decode([int(t) for t in out[0]], **({} if llama2c else {"skip_special_tokens": True}))
