"""Prefill and per-token decode time of ~10M-parameter Mamba2, Nemotron-H and Bamba models.

A benchmark, not a test: random weights (``uq.init_params``), float32, batch 1, on the
default JAX device. For each arch:

* prefill: ``uq.forward`` over T tokens (compiled once per T, then the median of repeats);
* decode, two ways: a Python loop of ``uq.decode_step`` with one token (what a serving loop
  does: includes dispatch), and ``uq.generate``'s compiled ``lax.scan`` of steps, per token
  = (time(1 + n new tokens) - time(1 new token)) / n, so the prefill cancels out.

    python -m benchmarks.bench_models [--archs mamba2,nemotron_h,bamba] [--prefill 128,512,2048]
        [--decode-steps 64] [--repeats 5] [--out benchmarks/cpu-ssm-models.json]

`run(...)` returns the same dict it writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import uniql_jax as uq
from benchmarks.common import timed_call
from uniql_jax.config import ModelConfig, layout_config

HIDDEN, VOCAB = 256, 4096
# Mamba2 geometry shared by the three: 8 heads x 64 (expand 2), 1 group, d_state 64, chunk 128
SSM = dict(ssm_heads=8, ssm_head_dim=64, ssm_groups=1, ssm_state=64, ssm_chunk_size=128, conv_kernel=4)
NEMOTRON_PATTERN = "M-M-M*-M-M-M*-M-M-"  # Nemotron-H-8B's M:*:- proportions (24:4:24), shortened


def ssm_config(arch: str) -> ModelConfig:
    """The ~10M-parameter benchmark model of an arch (hidden 256, vocab 4096)."""
    if arch == "mamba2":
        return layout_config("mamba2", layers=18, vocab_size=VOCAB, hidden_size=HIDDEN, **SSM)
    if arch == "nemotron_h":
        return layout_config("nemotron_h", pattern=NEMOTRON_PATTERN, vocab_size=VOCAB, hidden_size=HIDDEN,
                             num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=1024,
                             time_step_limit=(0.001, math.inf), **SSM)
    if arch == "bamba":  # attention in one layer of eight (Bamba-9B: 3 of 32), partial rotary 0.5
        return layout_config("bamba", pattern="MMM*MMMM", vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=4,
                             num_kv_heads=2, head_dim=64, intermediate_size=768, **SSM)
    raise ValueError(f"no benchmark model for arch {arch!r}")


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call incl. compile, the following `repeats` calls) in seconds."""
    return timed_call(fn)[1], [timed_call(fn)[1] for _ in range(repeats)]


def bench_arch(arch: str, prefill_lengths, decode_steps: int, repeats: int, prompt_len: int = 128) -> dict:
    cfg = ssm_config(arch)
    t0 = time.perf_counter()
    params = uq.init_params(cfg, 0)
    init_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
    rng = np.random.default_rng(0)
    out = {"arch": arch, "params": n_params, "blocks": "".join({"mamba2": "M", "attention": "*", "mlp": "-"}[b.kind]
                                                               for b in cfg.blocks),
           "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "init_s": round(init_s, 2), "prefill": []}

    for T in prefill_lengths:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        first, times = _timed(lambda: uq.forward(cfg, params, tokens), repeats)
        med = statistics.median(times)
        out["prefill"].append({"tokens": T, "compile_and_first_s": round(first, 3), "median_ms": round(1e3 * med, 2),
                               "min_ms": round(1e3 * min(times), 2), "tokens_per_s": round(T / med, 1)})
        print(f"  {arch} prefill T={T}: {1e3 * med:.1f} ms ({T / med:.0f} tok/s)", flush=True)

    # decode loop: prefill the prompt into the cache, then single-token steps
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    cache = uq.init_cache(cfg, 1, prompt_len + decode_steps + 1)
    logits, cache = uq.decode_step(cfg, params, prompt, cache)
    token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(uq.decode_step(cfg, params, token, cache))
    step_compile = time.perf_counter() - t0
    steps = []
    for _ in range(decode_steps):
        token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        t0 = time.perf_counter()
        logits, cache = jax.block_until_ready(uq.decode_step(cfg, params, token, cache))
        steps.append(time.perf_counter() - t0)
    loop_ms = 1e3 * statistics.median(steps)

    # compiled generation loop: the per-token cost with the prefill cancelled out
    _, one = _timed(lambda: uq.generate(cfg, params, prompt, 1), repeats)
    _, many = _timed(lambda: uq.generate(cfg, params, prompt, 1 + decode_steps), repeats)
    scan_ms = 1e3 * (statistics.median(many) - statistics.median(one)) / decode_steps
    out["decode"] = {"prompt_tokens": prompt_len, "steps": decode_steps, "step_compile_s": round(step_compile, 3),
                     "loop_median_ms_per_token": round(loop_ms, 3), "loop_min_ms_per_token": round(1e3 * min(steps), 3),
                     "generate_scan_ms_per_token": round(scan_ms, 3)}
    print(f"  {arch} decode: {loop_ms:.2f} ms/token (decode_step loop), {scan_ms:.2f} ms/token (generate scan)",
          flush=True)
    return out


def run(archs=("mamba2", "nemotron_h", "bamba"), prefill_lengths=(128, 512, 2048), decode_steps: int = 64,
        repeats: int = 5) -> dict:
    dev = jax.devices()[0]
    result = {
        "benchmark": "ssm_models", "device": dev.device_kind, "platform": dev.platform, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "dtype": "float32", "batch": 1,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "method": "median of `repeats` warm calls; decode loop = uq.decode_step per token incl. dispatch; "
                  "generate scan = (t(1+n) - t(1)) / n of uq.generate",
        "models": [],
    }
    for arch in archs:
        print(f"{arch}:", flush=True)
        result["models"].append(bench_arch(arch, prefill_lengths, decode_steps, repeats))
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mamba2,nemotron_h,bamba")
    ap.add_argument("--prefill", default="128,512,2048", help="comma-separated prefill lengths")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: benchmarks/<platform>-ssm-models.json")
    args = ap.parse_args(argv)
    res = run(tuple(args.archs.split(",")), tuple(int(t) for t in args.prefill.split(",")), args.decode_steps,
              args.repeats)
    out = Path(args.out or f"benchmarks/{res['platform']}-ssm-models.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
