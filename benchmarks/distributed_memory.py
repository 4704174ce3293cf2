"""Memory per device of compressing / evaluating Llama-3.1-70B over 1, 8 and 64 devices (no allocation).

    python -m benchmarks.distributed_memory [--out benchmarks/distributed-memory-llama3_70b.json]

Every array is abstract: the model is ``jax.eval_shape`` of ``uq.init_params`` on the published
Llama-3.1-70B config.json (through ``converters.hf.config_from_hf``); a block's calibration
statistics are ``jax.eval_shape`` of the collectors the drivers use (``compress.sort.SORTERS`` for
sorting, ``quant.plan.linear_inputs`` for GPTQ Hessians). Each array's bytes on one device follow
from its PartitionSpec on the mesh (``distributed.bytes_per_device``), as the library lays it
out: block weights float32 (``calibration.as_float32``) sharded over "model" by
``distributed.weight_spec``, statistics sharded over "model" by rows (``distributed.stat_spec``),
the batch of windows split over "data". The mesh per device count: "model" = min(n, 8) (one
8-GPU host holds a weight's shards), "data" = n / model.

Counted: the arguments and results of one calibration step (block weights, the step's windows in
and out, the running statistics and the step's own), and the evaluation weights (bfloat16, whole
model, `put_params`). Not counted: XLA temporaries inside a step (activations of the block, e.g.
[b, T, 28672] MLP intermediates), the host copy of the model each process keeps (the calibration
driver streams block by block from host memory), and the GPTQ solve of one weight (on one device:
its Hessian + weight, e.g. down_proj 3.3 GB + 0.9 GB float32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "distributed-memory-llama3_70b.json"
LLAMA31_70B = {  # meta-llama/Llama-3.1-70B config.json (the fields that set shapes and the forward)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "hidden_act": "silu", "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
GIB = 2**30


def block_state(cfg, blk, block_params, collect, *, windows: int, seq_len: int, n_data: int, n_model: int) -> dict:
    """Bytes per device of one calibration step of block `blk` (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from uniql_jax import distributed
    from uniql_jax.compress import calibration

    sizes = {"data": n_data, "model": n_model}
    f32 = jax.eval_shape(calibration.as_float32, block_params)
    x = jax.ShapeDtypeStruct((windows, seq_len, cfg.hidden_size), jnp.float32)
    w = jax.ShapeDtypeStruct((windows,), jnp.float32)

    def stats_of(p, x_BxTxD, w_B):
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), x_BxTxD.shape[:2])
        return collect(cfg, blk, calibration.bind_block(cfg, blk, p), x_BxTxD, positions, w_B)

    stats = jax.eval_shape(stats_of, f32, x, w)
    stat_specs = jax.tree.map(lambda a: distributed.stat_spec(a.shape, n_model), stats)
    weights = distributed.bytes_per_device(f32, distributed.param_specs(f32, n_model), sizes)
    batch = distributed.bytes_per_device([x, w], P("data"), sizes)
    stat_bytes = distributed.bytes_per_device(stats, stat_specs, sizes)
    return {"weights_f32": weights, "windows_in_out": 2 * batch, "stats_running_and_step": 2 * stat_bytes,
            "total": weights + 2 * batch + 2 * stat_bytes,
            "stats_full": {k: list(v.shape) for k, v in stats.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--devices", default="1,8,64")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows per step (default 8, the drivers')")
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import uniql_jax as uq
    from converters import hf
    from uniql_jax import distributed
    from uniql_jax.compress.sort import SORTERS
    from uniql_jax.quant.plan import linear_inputs

    cfg = hf.config_from_hf(LLAMA31_70B)
    abstract = jax.eval_shape(lambda: uq.init_params(cfg, 0, jnp.bfloat16))
    total_params = sum(a.size for a in jax.tree.leaves(abstract))
    rows = []
    for n in map(int, args.devices.split(",")):
        n_model = min(n, 8)
        n_data = n // n_model
        sizes = {"data": n_data, "model": n_model}
        row = {"devices": n, "data": n_data, "model": n_model,
               "eval_weights_bf16": distributed.bytes_per_device(abstract, distributed.param_specs(abstract, n_model),
                                                                 sizes)}
        for kind, index in (("attention", 0), ("mlp", 1)):
            blk, bp = cfg.blocks[index], abstract["blocks"][index]
            assert blk.kind == kind
            for stage, collect in (("sort", SORTERS[kind].collect), ("gptq", linear_inputs)):
                row[f"{stage}_{kind}"] = block_state(cfg, blk, bp, collect, windows=args.windows,
                                                     seq_len=args.seq_len, n_data=n_data, n_model=n_model)
        rows.append(row)
        print(f"{n} devices done", file=sys.stderr)
    result = {"benchmark": "distributed_memory", "model": "Llama-3.1-70B (shape)", "params": int(total_params),
              "windows_per_step": args.windows, "seq_len": args.seq_len, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result) -> str:
    lines = ["| devices (data x model) | eval weights bf16 | sort: attention / MLP step | "
             "GPTQ: attention / MLP step |", "|---|---|---|---|"]
    for r in result["rows"]:
        g = lambda key: f"{r[key]['total'] / GIB:.1f}"  # noqa: E731
        lines.append(f"| {r['devices']} ({r['data']} x {r['model']}) | {r['eval_weights_bf16'] / GIB:.1f} | "
                     f"{g('sort_attention')} / {g('sort_mlp')} | {g('gptq_attention')} / {g('gptq_mlp')} |")
    return "\n".join(lines) + "\n(GiB per device)"


if __name__ == "__main__":
    main(sys.argv[1:])
