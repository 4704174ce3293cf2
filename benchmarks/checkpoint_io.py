"""Bytes read by ``uq.load`` per pruning rate, and in-process rate switching times.

A Llama-3-shaped random model (embeddings ~11 % of the parameters, as in
Llama-3.1-8B's 13 %), RTN 4-bit head to toe (QArray; o along its rank axis so that
ranks are whole groups), a uniform rate table 0..0.35 (every prunable size scaled
by 1 - rate, rounded to its step: rate = share of each layer's prunable parameters
removed), saved once with ``uq.save``. Bytes
are counted by TensorStore's file-kvstore counter (what Orbax reads, at the read
call: independent of the page cache) and cross-checked with /proc/self/io rchar
(every read syscall of the process, manifest and JSON metadata included).

    python benchmarks/checkpoint_io.py [--layers 12] [--hidden 1024] [--vocab 8192] [--out benchmarks/checkpoint_io-<device>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uniql_jax as uq  # noqa: E402
from uniql_jax import checkpoint as ck  # noqa: E402
from uniql_jax.checkpoint.layout import DEFAULT_CHUNK_BYTES  # noqa: E402
from uniql_jax.compress.prune import abstract_params  # noqa: E402
from benchmarks.common import timed_call  # noqa: E402
from uniql_jax.config import ModelConfig, layout_config  # noqa: E402
from uniql_jax.pipeline import uniform_table  # noqa: E402
from uniql_jax.elastic import ElasticModel  # noqa: E402
from uniql_jax.quant import rtn  # noqa: E402
from uniql_jax.quant.formats import packed  # noqa: E402

RATES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)
# quantized axis and group size per weight name (linears along their input axis)
QUANT_RULES = {"q": (0, 128), "k": (0, 128), "v": (0, 128), "o": (2, 16), "gate": (0, 128), "up": (0, 128),
               "down": (0, 128), "embed": (1, 128), "lm_head": (0, 128)}
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
STEPS = {"qk_pairs": 8, "vo_rank": 16, "width": 128}  # head_dim in multiples of 16, MLP width of 128 (uniform table)


def llama_shape(layers: int, hidden: int, vocab: int, head_dim: int = 128) -> ModelConfig:
    """Llama-3 proportions: head_dim 128, 4 query heads per kv head, MLP width ~8/3 hidden."""
    heads = hidden // head_dim
    return layout_config("llama", layers=layers, vocab_size=vocab, hidden_size=hidden, num_heads=heads,
                         num_kv_heads=max(1, heads // 4), head_dim=head_dim,
                         intermediate_size=128 * round(hidden * 8 / 3 / 128))


def random_params(cfg: ModelConfig, seed: int):
    """Gaussian weights (std 0.02), unit norms, identity pair indices: shapes from the model itself."""
    rng = np.random.default_rng(seed)

    def leaf(path, sds):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if jnp.issubdtype(sds.dtype, jnp.integer):
            return jnp.asarray(np.broadcast_to(np.arange(sds.shape[-1], dtype=sds.dtype), sds.shape))
        if "norm" in name:
            return jnp.ones(sds.shape, sds.dtype)
        return jnp.asarray((0.02 * rng.standard_normal(sds.shape)).astype(sds.dtype))

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def quantize(params):
    quantize_rtn = jax.jit(rtn.quantize_rtn, static_argnames=("bits", "group_size", "axis"))

    def leaf(path, w):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name not in QUANT_RULES:
            return w
        axis, group = QUANT_RULES[name]
        return quantize_rtn(w, bits=4, group_size=group, axis=axis)

    return jax.tree_util.tree_map_with_path(leaf, params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    out_path = Path(args.out or Path(__file__).parent / f"checkpoint_io-{device.platform}.json")

    t0 = time.perf_counter()
    cfg = llama_shape(args.layers, args.hidden, args.vocab)
    params = quantize(random_params(cfg, seed=0))
    table = uniform_table(cfg, RATES, steps=STEPS)
    print(f"model: {packed.nbytes(params) / 2**20:.1f} MiB packed, built in {time.perf_counter() - t0:.1f}s", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="uniql-ckpt-bench-"))
    try:
        path = workdir / "ckpt"
        _, save_s = timed_call(ck.save, path, cfg, params, table=table,
                          meta={"model": "random llama-shaped", "quantizer": "rtn", "bits": 4, "seed": 0})
        disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        info = ck.read_info(path)
        print(f"save {save_s:.1f}s, {disk / 2**20:.1f} MiB on disk", flush=True)

        rows = []
        for rate in RATES:
            _, first_s = timed_call(uq.load, path, rate=rate)  # includes tracing the rate's abstract target
            with ck.ReadCounter() as counter:
                (cfg_r, params_r), load_s = timed_call(uq.load, path, rate=rate)
            rows.append({"rate": rate, "kept_param_bytes": info.rate_bytes[rate],
                         "bytes_read_tensorstore": counter.tensorstore, "bytes_read_rchar": counter.rchar,
                         "load_s": round(load_s, 4), "first_load_s": round(first_s, 4)})
            print(f"rate {rate:.2f}: kept {info.rate_bytes[rate] / info.param_bytes:.3f}, "
                  f"read {counter.tensorstore / 2**20:.2f} MiB (rchar {counter.rchar / 2**20:.2f}), {load_s:.2f}s",
                  flush=True)
        full = rows[0]
        for row in rows:
            row["kept_fraction"] = round(row["kept_param_bytes"] / full["kept_param_bytes"], 4)
            row["read_fraction_tensorstore"] = round(row["bytes_read_tensorstore"] / full["bytes_read_tensorstore"], 4)
            row["read_fraction_rchar"] = round(row["bytes_read_rchar"] / full["bytes_read_rchar"], 4)

        # In-process switching: the full-rank model read once, rates sliced from memory.
        tokens = jnp.zeros((1, 16), jnp.int32)
        model, from_ckpt_s = timed_call(ElasticModel.from_checkpoint, path, rate=0.0)
        switching = {"from_checkpoint_s": round(from_ckpt_s, 4)}
        compiles = []
        listener = lambda event, duration, **kw: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
        jax.monitoring.register_event_duration_secs_listener(listener)
        for label, rate in (("first_0.0", 0.0), ("first_0.35", 0.35), ("back_to_0.0", 0.0), ("back_to_0.35", 0.35)):
            compiles.clear()
            _, set_s = timed_call(model.set_rate, rate)
            _, fwd_s = timed_call(model.forward, tokens)
            n_compiles = len(compiles)
            _, steady_s = timed_call(model.forward, tokens)  # the same call again: compute only
            switching[label] = {"set_rate_s": round(set_s, 4), "forward_s": round(fwd_s, 4),
                                "xla_compiles": n_compiles, "forward_again_s": round(steady_s, 4)}
            print(f"switch {label}: {switching[label]}", flush=True)
        jax.monitoring.unregister_event_duration_listener(listener)
        switching["traces_per_rate"] = {str(k): v for k, v in model.traces.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    at35 = next(r for r in rows if r["rate"] == 0.35)
    result = {
        "benchmark": "checkpoint_io",
        "device": str(device.device_kind), "platform": device.platform, "host": platform.node(),
        "host_cpus": os.cpu_count(), "host_load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # timings are shared-CPU
        "versions": info.provenance["versions"],
        "model": {"arch": cfg.arch, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                  "intermediate": cfg.intermediate_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                  "quantizer": "rtn 4-bit (QArray)", "param_bytes": info.param_bytes},
        "chunk_bytes": DEFAULT_CHUNK_BYTES, "save_s": round(save_s, 3), "disk_bytes": disk,
        "method": "bytes counted by TensorStore's /tensorstore/kvstore/file/bytes_read around uq.load "
                  "(page-cache independent); rchar = /proc/self/io of the whole process",
        "rates": rows,
        "read_fraction_at_0.35": {"tensorstore": at35["read_fraction_tensorstore"], "rchar": at35["read_fraction_rchar"],
                                  "kept_param_fraction": at35["kept_fraction"]},
        "switching": switching,
    }
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["read_fraction_at_0.35"]), "->", out_path)


if __name__ == "__main__":
    main()
