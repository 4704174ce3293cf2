"""Stage 4 evidence (issue 6): perplexity of FP / RTN-W4 / GPTQ-W4 at every pruning rate, and memory.

A benchmark, not a test. For every model available (the real stories260K and each trained
default under ``experiments/defaults/<arch>/``):

1. sort (stage 1) and allocate the rate grid (stage 2, block influence) with the
   quantization-compatible steps of ``quant.plan.allocation_steps`` (every pruned input
   axis a multiple of 8, so that every rate slices whole quantization groups);
2. perplexity of the sorted float model at every rate (``evaluate_rates``);
3. the same model quantized once with RTN and once with GPTQ (4 bits, group 128 reduced
   per weight to divide every kept size), then sliced to every rate and evaluated;
4. deployed parameter bytes (``packed.deployed_bytes``: packed weights as stored, float
   arrays at 16 bits; embeddings and head included) of the float and GPTQ models at 0 %
   and at the largest rate, from the actual (pruned) arrays.

Memory at Llama-3.1-8B's shape: the same byte count over *abstract* arrays
(``jax.eval_shape``): the float params of the real config, and the layout
``uq.quantize`` produces for it (``quant.layout.quantized_layout``: the driver's choice of weights,
quantized axes and group sizes, checked against real ``uq.quantize`` outputs in
tests/quant/test_quantized_pruning.py), pruned with a uniform allocation.

    python -m benchmarks.bench_quantization [--models stories260K,llama,qwen2,mamba2,nemotron_h,bamba]
        [--calib-samples 32] [--seq-len 256] [--rates 0,0.05,...,0.35] [--out benchmarks/cpu-quantization.json]

Tokenized text is cached under /tmp (``benchmarks.common.cached_tokens``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import jax

import uniql_jax as uq
from benchmarks.common import cached_tokens
from experiments import common
from experiments.compress import DEFAULT_RATES
from uniql_jax import data
from uniql_jax.compress.allocate import default_steps, evaluate_rates, param_count
from uniql_jax.compress.prune import abstract_params
from uniql_jax.config import ModelConfig
from uniql_jax.paths import DEFAULTS, STORIES260K, TINYSTORIES
from uniql_jax.pipeline import load_named_model
from uniql_jax.quant.formats import packed, qarray
from uniql_jax.quant.layout import quantized_layout
from uniql_jax.quant.plan import allocation_steps

log = logging.getLogger("bench_quantization")
MODELS = ("stories260K",) + uq.ARCHS

# Llama-3.1-8B's config.json (the fields that shape its arrays), read by the strict HF converter.
LLAMA_31_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
PAPER_8B_GB = {"fp16": 16.0, "w4_0": 4.1, "w4_35": 2.8}


# ----------------------------------------------------------------------------- abstract quantized layout


def group_sizes(tree) -> dict[str, list[int]]:
    """{weight name: sorted distinct group sizes} of the packed weights of a params tree."""
    out: dict[str, set] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=qarray.is_qarray)[0]:
        if qarray.is_qarray(leaf):
            out.setdefault(str(getattr(path[-1], "key", path[-1])), set()).add(leaf.group_size)
    return {k: sorted(v) for k, v in sorted(out.items())}


def float_weights(tree) -> list[str]:
    """Names of float arrays of >= 2 dims that are not convolutions (linear weights left unquantized)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=qarray.is_qarray)[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        if not qarray.is_qarray(leaf) and len(leaf.shape) >= 2 and not name.startswith("conv_") \
                and name != "pair_index" and not name.endswith("_bias") and name != "gnorm":
            out.append("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
    return out


def memory_row(name: str, cfg: ModelConfig, float_params, w4_params, table, rate: float) -> dict:
    """Deployed bytes of the float (16-bit) and W4 models at 0 % and at `rate`."""
    row = {"model": name, "params": param_count(cfg)}
    for label, tree in (("fp16", float_params), ("w4", w4_params)):
        row[f"{label}_0"] = packed.deployed_bytes(tree)
        cfg_p = cfg.with_blocks(table[rate])
        if isinstance(jax.tree.leaves(tree)[0], jax.ShapeDtypeStruct):  # abstract arrays: shapes only
            pruned = jax.eval_shape(lambda t: uq.prune(cfg, t, rate, table)[1], tree)
        else:
            cfg_p, pruned = uq.prune(cfg, tree, rate, table)
        row[f"{label}_{int(round(rate * 100))}"] = packed.deployed_bytes(pruned)
        row["params_pruned"] = param_count(cfg_p)
    pct = int(round(rate * 100))
    row["ratio_w4_0"] = row["fp16_0"] / row["w4_0"]
    row[f"ratio_w4_{pct}"] = row["fp16_0"] / row[f"w4_{pct}"]
    row["rate"] = rate
    return row


def llama_31_8b_memory(rates) -> dict:
    """Bytes of Llama-3.1-8B's shape, float vs W4 (the layout uq.quantize gives it), uniform allocation."""
    from converters import hf

    cfg = hf.config_from_hf(LLAMA_31_8B, "Llama-3.1-8B config.json")
    steps = allocation_steps(cfg, 128, default_steps(cfg))
    table = uq.allocate(cfg, None, None, rates, method="uniform", steps=steps)
    float_params = abstract_params(cfg)
    w4 = quantized_layout(cfg, table, bits=4, group_size=128)
    row = memory_row("Llama-3.1-8B shape (abstract)", cfg, float_params, w4, table, max(rates))
    row.update(steps=steps, group_sizes=group_sizes(w4), unquantized_linear=float_weights(w4),
               kept_at_max_rate=_sizes_summary(table[max(rates)]), paper_gb=PAPER_8B_GB)
    return row


def _sizes_summary(blocks) -> dict:
    """{field: sorted distinct kept sizes} over the blocks of one rate."""
    out: dict[str, set] = {}
    for b in blocks:
        for k, v in vars(b).items():
            if k not in ("layer", "kind"):
                out.setdefault(f"{b.kind}.{k}", set()).add(v)
    return {k: sorted(v) for k, v in sorted(out.items())}


# ----------------------------------------------------------------------------- models and data


def available_models(names) -> list[str]:
    """The requested models whose weights exist (stories260K in ../shared/data, defaults in experiments/)."""
    found = []
    for name in names:
        path = STORIES260K / "stories260K.bin" if name == "stories260K" else DEFAULTS / name / "config.json"
        if path.is_file():
            found.append(name)
        else:
            log.warning("skipping %s: %s is absent", name, path)
    return found


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, rates, *, calib_samples: int, seq_len: int, seed: int, group_size: int = 128) -> dict:
    timings = {}
    t0 = time.perf_counter()
    cfg, params, tok, source = load_named_model(name)
    train = cached_tokens(source, tok, "train")
    heldout = cached_tokens(source, tok, "heldout")
    calib = data.calibration_windows(train, calib_samples, seq_len, seed=seed)
    timings["load"] = time.perf_counter() - t0
    log.info("%s: %s, %d params, %d eval tokens", name, cfg.arch, param_count(cfg), len(heldout))

    t = time.perf_counter()
    base_ppl = uq.perplexity(cfg, params, heldout, seq_len=seq_len)
    cfg, params = uq.sort(cfg, params, calib, progress=False)
    steps = allocation_steps(cfg, group_size, default_steps(cfg))
    table = uq.allocate(cfg, params, calib, rates, steps=steps)
    timings["sort_allocate"] = time.perf_counter() - t

    t = time.perf_counter()
    tables = {"fp": evaluate_rates(cfg, params, table, heldout, seq_len=seq_len)}
    timings["eval_fp"] = time.perf_counter() - t
    quantized = {}
    for method in ("rtn", "gptq"):
        t = time.perf_counter()
        quantized[method] = uq.quantize(cfg, params, calib, method=method, bits=4, group_size=group_size,
                                        table=table, progress=False)
        timings[f"quantize_{method}"] = time.perf_counter() - t
        t = time.perf_counter()
        tables[method] = evaluate_rates(cfg, quantized[method], table, heldout, seq_len=seq_len)
        timings[f"eval_{method}"] = time.perf_counter() - t
        log.info("%s %s done (%.1f s)", name, method, timings[f"quantize_{method}"])

    # the abstract layout used for the 8B figure must be what the driver produced here
    layout = quantized_layout(cfg, table, bits=4, group_size=group_size)
    same_layout = jax.tree.structure(layout) == jax.tree.structure(quantized["gptq"]) and all(
        a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(layout),
                                                                     jax.tree.leaves(quantized["gptq"])))
    memory = memory_row(name, cfg, params, quantized["gptq"], table, max(rates))
    per_rate = []
    for fp, r, g in zip(tables["fp"], tables["rtn"], tables["gptq"]):
        per_rate.append({"rate": fp["rate"], "ppl_fp": fp["ppl"], "ppl_rtn_w4": r["ppl"], "ppl_gptq_w4": g["ppl"],
                         "params": fp["params"], "bytes_fp16": fp["param_bytes"], "bytes_w4": g["param_bytes"]})
    return {
        "model": name, "arch": cfg.arch, "params": param_count(cfg), "ppl_unsorted_fp": base_ppl,
        "eval_tokens": int(len(heldout)), "calibration": f"{calib_samples} x {seq_len} (TinyStories train part)",
        "allocation_steps": steps, "group_sizes_gptq": group_sizes(quantized["gptq"]),
        "unquantized_linear": float_weights(quantized["gptq"]), "abstract_layout_matches_driver": bool(same_layout),
        "kept_at_max_rate": _sizes_summary(table[max(rates)]),
        "rates": per_rate,
        "gptq_le_rtn": [row["ppl_gptq_w4"] <= row["ppl_rtn_w4"] for row in per_rate],
        "memory": memory, "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = []
    for m in result["models"]:
        lines += [f"\n### {m['model']} ({m['arch']}, {m['params']:,} params; eval {m['eval_tokens']:,} tokens)\n",
                  "| rate | FP | RTN-W4 | GPTQ-W4 | params | MB FP16 | MB W4 |", "|---|---|---|---|---|---|---|"]
        for r in m["rates"]:
            lines.append(f"| {r['rate']:.2f} | {r['ppl_fp']:.3f} | {r['ppl_rtn_w4']:.3f} | {r['ppl_gptq_w4']:.3f} | "
                         f"{r['params']:,} | {r['bytes_fp16'] / 1e6:.3f} | {r['bytes_w4'] / 1e6:.3f} |")
    rows = [m["memory"] for m in result["models"]] + [result["llama_3_1_8b"]]
    pct = int(round(result["max_rate"] * 100))
    lines += ["\n### Deployed parameter bytes (embeddings and head included)\n",
              f"| model | FP16 0 % | FP16 {pct} % | W4 0 % | W4 {pct} % | FP16 / W4 0 % | FP16 / W4 {pct} % |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        unit, div = ("GB", 1e9) if r["fp16_0"] > 1e9 else ("MB", 1e6)
        lines.append(f"| {r['model']} | {r['fp16_0'] / div:.3f} {unit} | {r[f'fp16_{pct}'] / div:.3f} {unit} | "
                     f"{r['w4_0'] / div:.3f} {unit} | {r[f'w4_{pct}'] / div:.3f} {unit} | "
                     f"{r['ratio_w4_0']:.2f}x | {r[f'ratio_w4_{pct}']:.2f}x |")
    paper = result["llama_3_1_8b"]["paper_gb"]
    lines.append(f"| Llama-3.1-8B, paper (35 %) | {paper['fp16']} GB | | {paper['w4_0']} GB | {paper['w4_35']} GB | "
                 f"{paper['fp16'] / paper['w4_0']:.1f}x | {paper['fp16'] / paper['w4_35']:.1f}x |")
    return "\n".join(lines)


def run(models=MODELS, rates=None, *, calib_samples=32, seq_len=256, seed=0, out=None, merge=False) -> dict:
    """Benchmark `models`; with `merge`, the entries of other models already in `out` are kept
    (for defaults that appear later; each entry records its own settings and timings)."""
    rates = rates or common.parse_rates(DEFAULT_RATES)
    t0 = time.perf_counter()
    kept = []
    if merge and out and Path(out).is_file():
        previous = json.loads(Path(out).read_text())
        if previous.get("rates") != list(rates):
            raise SystemExit(f"--merge: {out} was run with rates {previous.get('rates')}, not {list(rates)}")
        kept = [m for m in previous["models"] if m["model"] not in models]
    result = {
        "device": f"{jax.devices()[0].platform} x{jax.device_count()} ({platform.processor() or platform.machine()})",
        "jax": jax.__version__, "bits": 4, "group_size": 128, "rates": list(rates), "max_rate": max(rates),
        "eval": f"{TINYSTORIES.name} (held-out part), windows of {seq_len}",
        "fp_note": "FP = the sorted unquantized model (float32 arithmetic); its bytes are counted at 16 bits",
        "models": kept, "missing_models": [n for n in MODELS if n not in available_models(MODELS)],
    }
    for name in available_models(models):
        result["models"].append(bench_model(name, rates, calib_samples=calib_samples, seq_len=seq_len, seed=seed))
        result["models"].sort(key=lambda m: MODELS.index(m["model"]))
        if out:  # partial results survive an interrupted run
            Path(out).write_text(json.dumps({**result, "partial": True}, indent=2) + "\n")
    result["llama_3_1_8b"] = llama_31_8b_memory(rates)
    result["wall_s_last_run"] = round(time.perf_counter() - t0, 1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list out of {', '.join(MODELS)}")
    p.add_argument("--rates", default=DEFAULT_RATES)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/cpu-quantization.json")
    p.add_argument("--merge", action="store_true", help="keep the other models' entries already in --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; expected some of {MODELS}")
    result = run(models, common.parse_rates(args.rates), calib_samples=args.calib_samples, seq_len=args.seq_len,
                 seed=args.seed, out=args.out, merge=args.merge)
    print(markdown(result))


if __name__ == "__main__":
    main()
