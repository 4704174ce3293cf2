"""Decode speed and memory of compressed models: bf16 against W4 at several pruning rates.

    python -m benchmarks.benchmark --arch llama --shape llama3_8b          # on a GPU
    python -m benchmarks.benchmark --arch llama --shape tiny --prompt-len 32 --new-tokens 16   # anywhere

Random weights of the real shapes (no download): a W4 model is round-to-nearest
quantized (``rtn_quantize_model``; speed does not depend on the values), pruned through
a uniform rate table rounded to the allocation steps `compress` uses
(``pipeline.uniform_table``). Per variant: prefill time, time per output token and
tokens/s of a fully compiled decode loop (``uq.generate``:
prefill + ``lax.scan`` over cached steps, cache preallocated), trace/lower and compile
time of each program apart from its run time, XLA's memory analysis of the program and
the process's peak device memory where the backend reports it, with the XLA path and
with the Pallas kernels. The card's copy bandwidth and bf16 matmul rate are measured
first. JSON goes to benchmarks/<device>-decode.json. `benchmarks.gpu_suite` calls the
functions of this module (one budgeted GPU run of everything).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.common import timed
from experiments import common

# name -> (arch, ModelConfig keyword arguments, layer pattern for hybrids)
SHAPES = {
    "llama3_8b": ("llama", dict(vocab_size=128256, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                                intermediate_size=14336, rope_theta=500000.0, layers=32)),
    "qwen2_7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128,
                               intermediate_size=18944, rope_theta=1e6, attention_bias=True, layers=28)),
    "mamba2_8b": ("mamba2", dict(vocab_size=256000, hidden_size=4096, ssm_heads=128, ssm_head_dim=64, ssm_groups=8,
                                 ssm_state=128, layers=56)),
    "nemotron_h_8b": ("nemotron_h", dict(vocab_size=131072, hidden_size=4096, num_heads=32, num_kv_heads=8,
                                         head_dim=128, intermediate_size=21504, ssm_heads=128, ssm_head_dim=64,
                                         ssm_groups=8, ssm_state=128, pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-")),
    "tiny": (None, dict(vocab_size=512, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=256, ssm_heads=8, ssm_head_dim=32, ssm_groups=2, ssm_state=16, layers=2,
                        pattern="M*-")),
}


def shape_config(arch: str, shape: str):
    """A full-rank ModelConfig of a named shape (hybrid patterns: M mamba2, * attention, - MLP)."""
    from uniql_jax.config import layout_config

    shape_arch, kw = SHAPES[shape]
    if shape_arch is not None and shape_arch != arch:
        raise common.UsageError(f"--shape {shape} is a {shape_arch} shape, not {arch}")
    kw = dict(kw)
    layers, pattern = kw.pop("layers", None), kw.pop("pattern", None)
    if arch == "bamba":  # a mixer per letter, each followed by its MLP
        pattern = pattern.replace("-", "")
    return layout_config(arch, layers=layers, pattern=pattern, **kw)


def device_probe(size_mb: int, matmul_n: int | None = None):
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) of the default device.

    matmul_n: side of the square bf16 product (default 8192, 2048 on CPU)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((size_mb * (1 << 20) // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    t = timed(copy, x)
    n = matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda u, v: u @ v)
    t_mm = timed(mm, a, a)
    return {"copy_bandwidth_GBps": 2 * x.nbytes / t / 1e9, "bf16_matmul_TFLOPs": 2 * n ** 3 / t_mm / 1e12,
            "copy_MB": size_mb, "matmul_n": n}


def peak_memory():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def decode_programs(cfg, new_tokens: int, impl: str) -> dict:
    """The two whole programs a variant is timed with, as functions of (params, prompt):
    "full" generates `new_tokens` (``uq.generate``: cache preallocated, prefill, then a
    `lax.scan` of cached steps); "prefill" is its first part alone (the same cache, the prompt
    through ``uq.decode_step``, the first greedy token), so that full - prefill is the decode
    steps and the prefill program compiles no decode loop."""
    import jax.numpy as jnp

    import uniql_jax as uq

    def prefill(params, prompt):
        cache = uq.init_cache(cfg, prompt.shape[0], prompt.shape[1] + new_tokens, params["final_norm"].dtype)
        logits, _ = uq.decode_step(cfg, params, prompt, cache, impl=impl)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    return {"prefill": prefill, "full": lambda p, t: uq.generate(cfg, p, t, new_tokens, impl=impl)}


def compile_timed(fn, *args, compiler_options=None):
    """(compiled, {"lower_s", "compile_s"}) of ``jax.jit(fn)`` at `args` (arrays or
    ``jax.ShapeDtypeStruct``s): tracing + lowering to StableHLO, then XLA's compile, timed apart."""
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    return compiled, {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}


def program_bytes(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program (arguments, outputs, temporaries), or None
    where the backend gives none. arguments + outputs + temporaries - aliased is the program's
    own peak: a per-variant figure, unlike the process-wide `peak_memory`."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional backend feature
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "temp", "alias", "generated_code")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def bench_variant(cfg, params, prompt, new_tokens, impl, *, repeats: int = 3, compiler_options=None):
    """Prefill = the compiled prefill program; per-token decode time from the difference to a
    compiled generate of `new_tokens` (both whole programs, see `decode_programs`).
    Compilation is timed apart from running (``lower_s`` / ``compile_s`` per program, then the
    first run as warm-up), the full program's memory analysis is reported, and `generated` holds
    its greedy tokens (batch row 0) so that implementations can be compared
    (`prefill_token_matches`: the prefill program's token is the full program's first)."""
    import jax
    import numpy as np

    result = {}
    for name, fn in decode_programs(cfg, new_tokens, impl).items():
        compiled, times = compile_timed(fn, params, prompt, compiler_options=compiler_options)
        first = jax.block_until_ready(compiled(params, prompt))  # the warm-up run; its output is kept
        result[name] = dict(times, run_s=timed(compiled, params, prompt, repeats=repeats, warmup=False),
                            program_bytes=program_bytes(compiled), output=first)
    one, full = result["prefill"]["run_s"], result["full"]["run_s"]
    generated = np.asarray(result["full"]["output"])[0, prompt.shape[1]:].tolist()
    per_token = max(full - one, 1e-9) / (new_tokens - 1)
    return {"prefill_s": one, "total_s": full, "ms_per_output_token": 1e3 * per_token,
            "tokens_per_s": 1.0 / per_token, "peak_bytes": peak_memory(),
            "generated": generated,
            "prefill_token_matches": int(np.asarray(result["prefill"]["output"])[0]) == generated[0],
            "lower_s": {k: v["lower_s"] for k, v in result.items()},
            "compile_s": {k: v["compile_s"] for k, v in result.items()},
            "program_bytes": result["full"]["program_bytes"]}


def build_parser():
    import uniql_jax as uq

    p = common.Parser(prog="python -m benchmarks.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, choices=uq.ARCHS, help="model family (block layout of --shape)")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                   help="model shape, random weights (default tiny; the others are real 7-8 B shapes)")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens of the prefill (default 1024)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded after the prompt, >= 2 (default 256)")
    p.add_argument("--rates", default="0,0.15,0.25,0.35", help="W4 pruning rates (default 0,0.15,0.25,0.35)")
    p.add_argument("--impls", default="xla,pallas", help="comma-separated: xla, pallas (default both)")
    p.add_argument("--group-size", type=int, default=128, help="W4 quantization group size (default 128)")
    p.add_argument("--probe-mb", type=int, default=1024, help="size of the bandwidth probe copy (default 1024 MB)")
    p.add_argument("--out", help="JSON path (default benchmarks/<device>-decode.json)")
    return p


def run(argv=None):
    import uniql_jax as uq

    args = build_parser().parse_args(argv)
    rates = common.parse_rates(args.rates)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or any(i not in ("xla", "pallas") for i in impls):
        raise common.UsageError(f"--impls must list xla and/or pallas, got {args.impls!r}")
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise common.UsageError("--prompt-len must be >= 1 and --new-tokens >= 2")
    common.setup_logging()

    import jax
    import jax.numpy as jnp

    from uniql_jax.compress.prune import prune
    from uniql_jax.pipeline import uniform_table
    from uniql_jax.quant.formats.packed import deployed_bytes
    from uniql_jax.quant.quantize import rtn_quantize_model

    device = jax.devices()[0]
    device_name = device.device_kind.lower().replace(" ", "-")
    cfg = shape_config(args.arch, args.shape)
    print(f"{args.arch} {args.shape} on {device.device_kind}: probing the device ...", file=sys.stderr)
    result = {"arch": args.arch, "shape": args.shape, "device": device.device_kind, "backend": jax.default_backend(),
              "date": time.strftime("%Y-%m-%d"), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "probe": device_probe(args.probe_mb), "variants": []}
    params = jax.jit(lambda: uq.init_params(cfg, 0, jnp.bfloat16))()
    prompt = jnp.asarray(jax.random.randint(jax.random.PRNGKey(0), (1, args.prompt_len), 0, cfg.vocab_size), jnp.int32)
    table = uniform_table(cfg, rates, args.group_size)
    variants = [("bf16", 0.0, cfg, params)]
    w4 = jax.block_until_ready(rtn_quantize_model(cfg, params, table, bits=4, group_size=args.group_size)[0])
    for r in rates:
        cfg_r, params_r = prune(cfg, w4, r, table) if r else (cfg, w4)
        variants.append(("w4", r, cfg_r, params_r))
    del params
    for name, rate, cfg_v, params_v in variants:
        for impl in impls:
            if name == "bf16" and impl == "pallas":
                continue  # kernels serve packed weights; bf16 has none
            print(f"  {name} rate {rate:.2f} {impl} ...", file=sys.stderr)
            row = {"variant": name, "rate": rate, "impl": impl,
                   "param_bytes": deployed_bytes(params_v)}
            row.update(bench_variant(cfg_v, params_v, prompt, args.new_tokens, impl))
            result["variants"].append(row)
    base = next(v for v in result["variants"] if v["variant"] == "bf16")
    for v in result["variants"]:
        v["speedup_vs_bf16"] = v["tokens_per_s"] / base["tokens_per_s"]
    out = Path(args.out or f"benchmarks/{device_name}-decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':>8} {'rate':>5} {'impl':>6} {'prefill s':>10} {'ms/token':>9} {'tok/s':>8} {'x bf16':>7}")
    for v in result["variants"]:
        print(f"{v['variant']:>8} {v['rate']:>5.2f} {v['impl']:>6} {v['prefill_s']:>10.4f} "
              f"{v['ms_per_output_token']:>9.3f} {v['tokens_per_s']:>8.1f} {v['speedup_vs_bf16']:>7.2f}")
    print(f"wrote {out}", file=sys.stderr)
    return result


def main(argv=None):
    common.main_guard(lambda: run(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
