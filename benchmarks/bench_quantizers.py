"""RTN vs GPTQ vs UniQuan (BCQ) at 3 and 4 bits, on a dense model and through the UniQL pipeline.

For every model (the trained defaults under ``experiments/defaults/<arch>/`` that exist,
and stories260K):

* dense: the original (unsorted) model quantized alone, no rate table;
* uniql: sorted, rates allocated (the grid of ``experiments.compress``, rounding steps
  that keep quantization groups whole), quantized once with the table, then sliced to
  each evaluated rate (no re-quantization) and evaluated;
* nested planes: each k-bit UniQuan model evaluated with its first k' < k planes,
  scales truncated or refit by least squares on calibration data (``nested_planes``);
  the 4-bit GPTQ model, whose codes are BCQ planes too (``bcq.from_uniform``), likewise.

Perplexity on the held-out TinyStories part (``uq.perplexity``), calibration windows from
the training part, as ``experiments.compress`` does. Storage bits per weight are measured
from the arrays (``packed.bits_per_weight``, ``packed.deployed_bytes``).

    python -m benchmarks.bench_quantizers [--models default-llama,stories260K] [--bits 3,4]
        [--steps 200] [--out benchmarks/cpu-quantizers.json]

Writes the JSON and a markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

from benchmarks.common import cached_tokens
from experiments import common
from uniql_jax.paths import DEFAULTS, STORIES260K

log = logging.getLogger("bench_quantizers")
METHODS = ("rtn", "gptq", "uniquan")


def available_models() -> dict[str, tuple[str, str]]:
    """{name: (arch, source)}: every trained default that exists, then stories260K."""
    models = {}
    for folder in sorted(DEFAULTS.glob("*/config.json")):
        models[f"default-{folder.parent.name}"] = (folder.parent.name, str(folder.parent))
    if (STORIES260K / "stories260K.bin").is_file():
        models["stories260K"] = ("llama", str(STORIES260K / "stories260K.bin"))
    return models


def storage(cfg, params) -> dict:
    """Bits per weight measured from the arrays: linear weights (16-bit-kept ones at 16), packed ones, whole model."""
    import jax
    import jax.numpy as jnp

    from uniql_jax.quant.formats.packed import dense as weight
    from uniql_jax.quant.formats import packed as formats, qarray
    from uniql_jax.quant.plan import linear_contractions

    is_packed = formats.is_packed

    def bits(leaf):
        if is_packed(leaf):
            return 8 * leaf.nbytes, math.prod(leaf.shape)
        return 16 * math.prod(leaf.shape), math.prod(leaf.shape)

    linear = []
    for blk, block in zip(cfg.blocks, params["blocks"]):
        dense = {k: weight(v, jnp.float32) if is_packed(v) else v for k, v in block.items()}
        for name in linear_contractions(cfg, blk, dense):
            linear.append(block[name])
    if "lm_head" in params:
        linear.append(params["lm_head"])
    packed = [w for w in linear if is_packed(w)]
    lin_bits, lin_n = map(sum, zip(*map(bits, linear)))
    total_n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params, is_leaf=is_packed))
    return {"bpw_linear": lin_bits / lin_n,
            "bpw_packed": formats.bits_per_weight(packed) if packed else 16.0,
            "packed_share": sum(math.prod(w.shape) for w in packed) / lin_n,
            "bpw_model": 8 * formats.deployed_bytes(params) / total_n,
            "embed_bpw": formats.bits_per_weight([params["embed"]]) if qarray.is_qarray(params["embed"]) else 16.0}


def bench_model(name, arch, source, args) -> dict:
    import jax

    import uniql_jax as uq
    from uniql_jax import data
    from uniql_jax.compress.allocate import default_steps, param_count
    from uniql_jax.pipeline import load_model
    from uniql_jax.quant.layout import array_layout, to_bcq_planes
    from uniql_jax.quant.plan import allocation_steps
    from uniql_jax.quant.uniquan_driver import nested_planes

    t_model = time.perf_counter()
    cfg, params, tokenizer, _ = load_model(arch, source)
    calib_stream = cached_tokens(source, tokenizer, "train")
    eval_tokens = cached_tokens(source, tokenizer, "heldout")
    calib = data.calibration_windows(calib_stream, args.calib_samples, args.seq_len, seed=args.seed)
    ppl = lambda c, p: uq.perplexity(c, p, eval_tokens, seq_len=args.seq_len)  # noqa: E731
    out = {"name": name, "arch": arch, "source": source, "params": param_count(cfg),
           "eval_tokens": int(len(eval_tokens)), "fp_ppl": ppl(cfg, params), "dense": [], "uniql": [], "nested": []}
    log.info("%s: %d params, fp ppl %.4f", name, out["params"], out["fp_ppl"])
    uq_kw = dict(steps=args.steps, windows_per_step=args.windows_per_step, head_steps=args.head_steps)
    trained = lambda method: {"steps": args.steps} if method.partition("@")[0] == "uniquan" else {}  # noqa: E731

    def quantize(cfg, params, spec, bits, table):
        """spec: a method name, or "name@g" for another requested group size (e.g. gptq@32: storage near BCQ's)."""
        t0 = time.perf_counter()
        method, _, group = spec.partition("@")
        kw = dict(group_size=int(group) if group else args.group_size, progress=False)
        if method == "uniquan":
            from uniql_jax.quant import uniquan_driver

            q = uniquan_driver.quantize(cfg, params, calib, bits=bits, table=table, **kw, **uq_kw)
        else:
            q = uq.quantize(cfg, params, calib, method=method, bits=bits, table=table, **kw)
        jax.block_until_ready(q)
        return q, time.perf_counter() - t0

    if not args.skip_dense:
        for bits in args.bits:
            for method in args.methods:
                q, secs = quantize(cfg, params, method, bits, None)
                row = {"method": method, "bits": bits, "ppl": ppl(cfg, q), "quantize_s": round(secs, 1),
                       **trained(method), **storage(cfg, q)}
                out["dense"].append(row)
                log.info("%s dense %s %d-bit: ppl %.4f (%.1f s)", name, method, bits, row["ppl"], secs)

    cfg_s, params_s = uq.sort(cfg, params, calib, progress=False)
    steps = allocation_steps(cfg_s, args.group_size, default_steps(cfg_s))
    table = uq.allocate(cfg_s, params_s, calib, args.table_rates, steps=steps)
    out["table_rates"] = args.table_rates
    out["sorted_fp"] = []
    for rate in args.rates:
        c, p = uq.prune(cfg_s, params_s, rate, table)
        out["sorted_fp"].append({"rate": rate, "ppl": ppl(c, p), "params": param_count(c)})
    quantized = {}
    for bits in args.bits:
        for method in args.methods:
            q, secs = quantize(cfg_s, params_s, method, bits, table)
            quantized[method, bits] = q
            for rate in args.rates:
                c, p = uq.prune(cfg_s, q, rate, table)
                row = {"method": method, "bits": bits, "rate": rate, "ppl": ppl(c, p), "quantize_s": round(secs, 1),
                       **trained(method), **storage(c, p)}
                out["uniql"].append(row)
                log.info("%s uniql %s %d-bit rate %.2f: ppl %.4f", name, method, bits, rate, row["ppl"])

    for bits in args.bits:  # the Llama-3.1-8B BCQ bytes rest on this: UniQuan's layout is the uniform one as planes
        if ("uniquan", bits) in quantized and ("gptq", bits) in quantized:
            if array_layout(quantized["uniquan", bits]) != array_layout(to_bcq_planes(quantized["gptq", bits])):
                raise RuntimeError(f"{name}: the UniQuan layout differs from the GPTQ layout read as BCQ planes")

    if args.nested:
        sources = [("uniquan", b, quantized.get(("uniquan", b))) for b in args.bits]
        if ("gptq", max(args.bits)) in quantized:
            try:
                sources.append(("gptq", max(args.bits), to_bcq_planes(quantized["gptq", max(args.bits)])))
            except ValueError as e:  # a scale * 2**j outside float16's normal range
                log.warning("GPTQ planes skipped: %s", e)
        for method, bits, q in sources:
            if q is None:
                continue
            for planes in range(bits - 1, 1, -1):  # k' >= 2: one plane is far off on these models
                for alpha in ("truncated", "refit"):
                    n = nested_planes(cfg_s, q, params_s, calib, planes, refit=alpha == "refit")
                    for rate in args.rates:
                        c, p = uq.prune(cfg_s, n, rate, table)
                        row = {"method": method, "bits": bits, "planes": planes, "alpha": alpha, "rate": rate,
                               "ppl": ppl(c, p), **trained(method), **storage(c, p)}
                        out["nested"].append(row)
                        log.info("%s nested %s %d->%d planes (%s) rate %.2f: ppl %.4f", name, method, bits, planes,
                                 alpha, rate, row["ppl"])
    out["wall_s"] = round(time.perf_counter() - t_model, 1)
    return out


def llama_31_8b_storage(bits_list, table_rates) -> dict:
    """Deployed bytes of Llama-3.1-8B's shape (abstract arrays, uniform allocation) as uniform
    W-k (the layout ``uq.quantize`` gives it) and as BCQ-k with the same groups (the layout
    UniQuan gives it: k planes, float16 alpha [G, k] and offset [G]), at 0 % and the largest rate."""
    import jax

    import uniql_jax as uq
    from benchmarks.bench_quantization import LLAMA_31_8B
    from converters import hf
    from uniql_jax.compress.allocate import default_steps
    from uniql_jax.compress.prune import abstract_params
    from uniql_jax.quant.formats import packed
    from uniql_jax.quant.layout import quantized_layout, to_bcq_planes
    from uniql_jax.quant.plan import allocation_steps

    cfg = hf.config_from_hf(LLAMA_31_8B, "Llama-3.1-8B config.json")
    table = uq.allocate(cfg, None, None, table_rates, method="uniform",
                        steps=allocation_steps(cfg, 128, default_steps(cfg)))
    top = max(table_rates)
    row = {"rate": top, "fp16_0": packed.deployed_bytes(abstract_params(cfg)), "formats": []}
    for bits in sorted(bits_list, reverse=True):
        uniform = quantized_layout(cfg, table, bits=bits, group_size=128)
        for name, tree in (("uniform", uniform), ("bcq", jax.eval_shape(to_bcq_planes, uniform))):
            pruned = jax.eval_shape(lambda t: uq.prune(cfg, t, top, table)[1], tree)
            row["formats"].append({"format": name, "bits": bits, "bytes_0": packed.deployed_bytes(tree),
                                   "bytes_top": packed.deployed_bytes(pruned)})
    return row


def methods_in(model: dict) -> list[str]:
    """Method specs of a model's rows: rtn, gptq, gptq@g..., uniquan (base order, then group)."""
    specs = {r["method"] for r in model["uniql"] + model["dense"]}
    order = lambda s: (METHODS.index(s.partition("@")[0]), int(s.partition("@")[2] or 0))  # noqa: E731
    return sorted(specs, key=order)


def uniquan_steps(result: dict) -> str:
    """The reconstruction step counts of the UniQuan rows (rows of older runs lack them: the first run's)."""
    steps = {r.get("steps", result["settings"]["steps"]) for m in result["models"]
             for r in m["dense"] + m["uniql"] + m["nested"] if r["method"] == "uniquan"}
    return " / ".join(map(str, sorted(steps))) or str(result["settings"]["steps"])


MODEL_ORDER = ("llama", "qwen2", "mamba2", "nemotron_h", "bamba")


def markdown(result: dict) -> str:
    """The comparison tables of a result (one section per model)."""
    s = result["settings"]
    lines = ["# Quantizers: RTN / GPTQ (uniform, symmetric) vs UniQuan (BCQ)\n",
             f"Device {result['device']}; calibration {s['calib_samples']} x {s['seq_len']} TinyStories train tokens; "
             f"UniQuan {uniquan_steps(result)} steps per block, {s['windows_per_step']} window(s) per step; requested group "
             f"{s['group_size']} (reduced per weight so every stored rate slices whole groups). Perplexity on held-out "
             f"TinyStories (windows of {s['seq_len']}). Bits per weight measured from the arrays at rate 0: packed = "
             f"over the quantized linear weights; linear = over all linear weights (16-bit-kept ones at 16); model = "
             f"the whole deployed model incl. embeddings and norms (16-bit floats). Bold: best at that bit width "
             f"and rate.\n"]
    defaults = [f"default-{arch}" for arch in MODEL_ORDER]
    order = lambda m: (defaults.index(m["name"]) if m["name"] in defaults else len(defaults), m["name"])  # noqa: E731
    for m in sorted(result["models"], key=order):
        rates = [r["rate"] for r in m["sorted_fp"]]
        lines.append(f"## {m['name']} ({m['arch']}, {m['params']:,} params, fp ppl {m['fp_ppl']:.3f})\n")
        head = "| method | bits | dense (unsorted) | " + " | ".join(f"UniQL {100 * r:.0f} %" for r in rates)
        lines.append(head + " | bpw packed | bpw linear | bpw model |")
        lines.append("|" + "---|" * (4 + len(rates) + 2))
        fp = " | ".join(f"{r['ppl']:.3f}" for r in m["sorted_fp"])
        lines.append(f"| 16-bit | 16 | {m['fp_ppl']:.3f} | {fp} | - | 16 | 16 |")
        bits_list = sorted({r["bits"] for r in m["uniql"]}, reverse=True)
        for bits in bits_list:
            for method in methods_in(m):
                rows = [r for r in m["uniql"] if r["bits"] == bits and r["method"] == method]
                if not rows:
                    continue
                dense = [r for r in m["dense"] if r["bits"] == bits and r["method"] == method]
                best = {rate: min(r["ppl"] for r in m["uniql"] if r["bits"] == bits and r["rate"] == rate)
                        for rate in rates}
                cells = []
                for rate in rates:
                    r = next(r for r in rows if r["rate"] == rate)
                    cells.append(f"**{r['ppl']:.3f}**" if r["ppl"] == best[rate] else f"{r['ppl']:.3f}")
                d = f"{dense[0]['ppl']:.3f}" if dense else "-"
                full = next(r for r in rows if r["rate"] == 0.0) if any(r["rate"] == 0.0 for r in rows) else rows[0]
                lines.append(f"| {method} | {bits} | {d} | " + " | ".join(cells)
                             + f" | {full['bpw_packed']:.3f} | {full['bpw_linear']:.3f} | {full['bpw_model']:.3f} |")
        lines.append("")
        if m["nested"]:
            lines.append(f"Nested bit-planes of {m['name']} (UniQL-sorted; ppl at each rate; k-bit model read with "
                         "its first k' planes; alpha truncated = the stored scales, refit = least squares on calibration "
                         "inputs; gptq = the GPTQ codes' binary digits as planes):\n")
            lines.append("| source | k -> k' | alpha | " + " | ".join(f"{100 * r:.0f} %" for r in rates)
                         + " | bpw packed |")
            lines.append("|" + "---|" * (4 + len(rates)))
            keys = sorted({(r["method"], r["bits"], r["planes"], r["alpha"]) for r in m["nested"]},
                          key=lambda k: (k[0] != "uniquan", -k[1], -k[2], k[3] != "truncated"))
            for method, bits, planes, alpha in keys:
                rows = {r["rate"]: r for r in m["nested"] if (r["method"], r["bits"], r["planes"], r["alpha"])
                        == (method, bits, planes, alpha)}
                lines.append(f"| {method} | {bits} -> {planes} | {alpha} | "
                             + " | ".join(f"{rows[rate]['ppl']:.3f}" for rate in rates)
                             + f" | {rows[rates[0]]['bpw_packed']:.3f} |")
            lines.append("")
    if "llama_3_1_8b" in result:
        row = result["llama_3_1_8b"]
        pct = f"{100 * row['rate']:.0f} %"
        lines += ["## Llama-3.1-8B shape: deployed bytes (abstract arrays, uniform allocation)\n",
                  f"| format | bits | 0 % | {pct} |", "|---|---|---|---|",
                  f"| 16-bit | 16 | {row['fp16_0'] / 1e9:.3f} GB | |"]
        lines += [f"| {f['format']} | {f['bits']} | {f['bytes_0'] / 1e9:.3f} GB | {f['bytes_top'] / 1e9:.3f} GB |"
                  for f in row["formats"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    from experiments.compress import DEFAULT_RATES

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quantizers", description=__doc__.split("\n")[0])
    p.add_argument("--models", help="comma-separated names (default: all of " + ", ".join(available_models()) + ")")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="rtn, gptq, uniquan; name@G requests group G (e.g. gptq@32: about BCQ's storage at g=128)")
    p.add_argument("--append", action="store_true",
                   help="add these methods' rows to the models already in --out (same data, same table)")
    p.add_argument("--bits", default="3,4")
    p.add_argument("--rates", default="0,0.15,0.25", help="rates evaluated")
    p.add_argument("--table-rates", default=DEFAULT_RATES, help="rates stored in the table (fix the group sizes)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200, help="UniQuan reconstruction steps per block")
    p.add_argument("--windows-per-step", type=int, default=1)
    p.add_argument("--head-steps", type=int, help="UniQuan steps for an untied lm_head (default: --steps; 0: BCQ fit)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-nested", dest="nested", action="store_false")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--out", default="benchmarks/cpu-quantizers.json")
    p.add_argument("--jax-cache", default="/tmp/uniql_jax_cache",
                   help="persistent compilation cache (blocks of equal shapes compile once); '' to disable")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    for spec in args.methods:
        method, at, group = spec.partition("@")
        if method not in METHODS or (at and not (group.isdigit() and int(group) >= 8 and int(group) % 8 == 0)):
            raise common.UsageError(f"--methods: {spec!r} is not one of {METHODS}, optionally @G (G a multiple of 8)")
    args.bits = [int(b) for b in args.bits.split(",")]
    args.rates = common.parse_rates(args.rates)
    args.table_rates = sorted(set(common.parse_rates(args.table_rates)) | set(args.rates))
    return args


def save(result: dict, out: Path):
    """The JSON at `out` and its markdown tables beside it."""
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def run(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import jax

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    models = available_models()
    names = args.models.split(",") if args.models else list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        raise common.UsageError(f"unknown models {unknown}; available: {list(models)}")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "jax_cache", "models")}
    result = {"benchmark": "quantizers", "device": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
              "load_average_before": list(os.getloadavg()),
              "versions": {"python": platform.python_version(), "jax": jax.__version__}, "settings": settings,
              "missing_defaults": [a for a in ("llama", "qwen2", "mamba2", "nemotron_h", "bamba")
                                   if f"default-{a}" not in models],
              "models": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append:
        if not out.exists():
            raise common.UsageError(f"--append: {out} does not exist (run once without --append first)")
        result = json.loads(out.read_text())
        result.setdefault("appended", []).append(settings)
    for name in names:
        new = bench_model(name, *models[name], args)
        old = next((m for m in result["models"] if m["name"] == name), None)
        if old is None:
            result["models"].append(new)
        else:  # rows of the methods run now replace their earlier rows (a re-run never duplicates)
            for key in ("dense", "uniql", "nested"):
                old[key] = [r for r in old[key] if r["method"] not in args.methods] + new[key]
        save(result, out)  # partial results survive a long run
    result["llama_3_1_8b"] = llama_31_8b_storage(args.bits, args.table_rates)
    save(result, out)
    log.info("wrote %s and %s", out, out.with_suffix(".md"))
    return result


if __name__ == "__main__":
    common.main_guard(run)
