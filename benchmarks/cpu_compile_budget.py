"""Order of magnitude of the compile cost of whole-model decode at Llama-3.1-8B's shape, on CPU.

    python -m benchmarks.cpu_compile_budget [--out benchmarks/cpu-compile-budget-llama3_8b.json]
        [--rates 0,0.35] [--shape llama3_8b --prompt-len 512 --new-tokens 128]

No array is allocated: the params are abstract (``jax.eval_shape`` of ``uq.init_params`` in
bfloat16, and of ``uniql_jax.quant.quantize.rtn_quantize_model`` for W4), the prompt a
``jax.ShapeDtypeStruct``. For each variant, the two programs ``benchmarks.benchmark`` times
(``decode_programs``: generate 1 token = prefill, generate 128 tokens = prefill + a scan of
cached steps; batch 1, prompt 512) are traced and lowered (``lower_s``), then compiled by XLA
for the CPU (``compile_s``), exactly as ``benchmarks.gpu_suite`` does on the GPU.

The Pallas variant cannot be compiled for the CPU in a meaningful way (its kernels would
become interpret-mode loops), so it is *exported for platform cuda* instead
(``jax.export``, Triton lowering forced with ``common.default_interpret(False)``): this proves
on CPU that the whole 32-layer W4 decode program lowers to Triton kernels with no fallback
(the dispatch counts are recorded) and times that lowering; Triton's and XLA's GPU compile
happen only on a GPU.

These figures size the budget of ``benchmarks.gpu_suite`` (see its docstring). GPU compile
times differ from CPU ones (another backend, a faster host), so they are an order of
magnitude, not a prediction.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "cpu-compile-budget-llama3_8b.json"
PROMPT_LEN, NEW_TOKENS, GROUP_SIZE = 512, 128, 128


def abstract_variants(cfg, rates, group_size: int = GROUP_SIZE):
    """{(name, rate): (cfg, abstract params)}: bf16 and W4 at each rate (uniform table)."""
    import jax
    import jax.numpy as jnp

    import uniql_jax as uq
    from uniql_jax.pipeline import uniform_table
    from uniql_jax.quant.quantize import rtn_quantize_model

    table = uniform_table(cfg, rates, group_size)
    bf16 = jax.eval_shape(lambda: uq.init_params(cfg, 0, jnp.bfloat16))
    w4 = jax.eval_shape(lambda p: rtn_quantize_model(cfg, p, table, bits=4, group_size=group_size)[0], bf16)
    out = {("bf16", 0.0): (cfg, bf16)}
    for r in rates:
        pruned = jax.eval_shape(lambda t, r=r: uq.prune(cfg, t, r, table)[1], w4) if r else w4
        out[("w4", r)] = (cfg.with_blocks(table[r]) if r else cfg, pruned)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--rates", default="0,0.35", help="W4 rates to compile (default 0,0.35)")
    ap.add_argument("--programs", default="prefill,full", help="which decode programs to compile")
    ap.add_argument("--shape", default="llama3_8b", help="a Llama shape of benchmarks.benchmark (default llama3_8b)")
    ap.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = ap.parse_args(argv)

    import jax

    from benchmarks import benchmark
    from pallas_kernels import common

    cfg = benchmark.shape_config("llama", args.shape)
    rates = [float(r) for r in args.rates.split(",")]
    programs = args.programs.split(",")
    prompt = jax.ShapeDtypeStruct((1, args.prompt_len), jax.numpy.int32)
    report = {
        "what": "trace+lower and XLA compile of whole-model decode programs, abstract arrays, CPU backend",
        "shape": args.shape, "layers": sum(b.kind == "attention" for b in cfg.blocks), "batch": 1,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "group_size": GROUP_SIZE,
        "jax_version": jax.__version__, "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": [],
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    t_setup = time.perf_counter()
    variants = abstract_variants(cfg, rates)
    report["abstract_setup_s"] = time.perf_counter() - t_setup
    for (name, rate), (cfg_v, params_v) in variants.items():
        fns = benchmark.decode_programs(cfg_v, args.new_tokens, "xla")
        for program in programs:
            print(f"{name} {rate:.2f} xla {program}: lowering + compiling ...", file=sys.stderr, flush=True)
            compiled, times = benchmark.compile_timed(fns[program], params_v, prompt)
            row = dict(variant=name, rate=rate, impl="xla", program=program, **times,
                       program_bytes=benchmark.program_bytes(compiled), load_average=os.getloadavg()[0])
            del compiled
            report["rows"].append(row)
            print(f"  lower {row['lower_s']:.1f} s, compile {row['compile_s']:.1f} s", file=sys.stderr, flush=True)
            save()
    # the Pallas variant: whole-program export for cuda (Triton lowering), no compile
    for rate in rates:
        cfg_v, params_v = variants[("w4", rate)]
        for program in programs:
            fn = benchmark.decode_programs(cfg_v, args.new_tokens, "pallas")[program]
            print(f"w4 {rate:.2f} pallas {program}: export for cuda ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            with common.default_interpret(False), common.dispatch_log() as log:
                exported = common.export_for_cuda(fn, params_v, prompt)
            text = exported.mlir_module()
            # distinct kernels: the module holds one Triton custom call per kernel function, called per layer
            row = dict(variant="w4", rate=rate, impl="pallas", program=program, export_cuda_s=time.perf_counter() - t0,
                       triton_kernels_in_module=text.count(common.TRITON_CUSTOM_CALL), ran=log.as_dict(),
                       load_average=os.getloadavg()[0])
            del exported, text
            report["rows"].append(row)
            print(f"  export {row['export_cuda_s']:.1f} s, {row['triton_kernels_in_module']} Triton calls, "
                  f"ran {row['ran']['counts']}", file=sys.stderr, flush=True)
            save()
    report["total_s"] = time.perf_counter() - t_setup
    save()
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
