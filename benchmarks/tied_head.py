"""Where 4-bit quality goes on a real model with a tied embedding: the table, the head, the linears.

    python -m benchmarks.tied_head [--model ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--windows 20] [--seq-len 512] [--calib-windows 32] [--out benchmarks/cpu-tied-head-smollm2.json]

SmolLM2-135M ties its 49 k x 576 embedding to the output head, so one table is both the
input lookup and the last linear of the model. Perplexity on WikiText-2 test (first
`--windows` windows of `--seq-len`), calibration from WikiText-2 valid, of:

* the table alone quantized (linears float): per-row RTN-4 (one scale per row), RTN-4
  in groups of 96 and 32, RTN-8 in groups of 96, and GPTQ-4 (groups of 96) of the table
  as the head it also is, on the final hidden states of the float model;
* the linears alone quantized with GPTQ-4 (group 128, reduced per matrix to a divisor)
  and the table float: what the linears cost;
* head to toe: GPTQ linears with each table variant (the GPTQ head variant uses the
  quantized prefix's hidden states, as ``uq.quantize(..., tied_head_gptq=True)`` does).

The model is not sorted or pruned: this isolates the quantizer. Ratios to the dense
perplexity are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import uniql_jax as uq
from benchmarks.real_model import REPO, add_model_and_data_args
from uniql_jax import data
from uniql_jax.models.stacks import bind
from uniql_jax.quant import gptq, rtn
from uniql_jax.quant.formats import packed
from uniql_jax.quant.quantize import transposed_table



def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.tied_head", description=__doc__.split("\n")[0])
    add_model_and_data_args(p)
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "cpu-tied-head-smollm2.json"), help="JSON output")
    return p


def final_hidden(cfg, params, calib, batch: int = 4) -> np.ndarray:
    """The head's inputs: final normalized hidden states [N*T, D] (float32) of the calibration windows."""
    @jax.jit
    def hidden(p, tokens_BxT):
        positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
        return bind(cfg, p).hidden(tokens_BxT, positions)[0]

    calib = np.asarray(calib)
    rows = [np.asarray(hidden(params, jnp.asarray(calib[s:s + batch]))) for s in range(0, len(calib), batch)]
    return np.concatenate(rows).reshape(-1, cfg.hidden_size)


def gptq_table(table_VxD, h_NxD, *, bits, group_size):
    hessian = 2.0 * (h_NxD.T @ h_NxD) / len(h_NxD)
    head = gptq.gptq_quantize(jnp.asarray(table_VxD, jnp.float32).T, jnp.asarray(hessian), bits=bits,
                              group_size=group_size)
    return transposed_table(head)


def main(argv=None):
    from converters import hf

    args = build_parser().parse_args(argv)
    cfg, params = hf.load(args.model)
    if not cfg.tie_word_embeddings:
        raise SystemExit(f"{args.model}: not a tied-embedding model")
    tok = hf.load_tokenizer(args.model)
    tokens = data.load_tokens(args.eval, tok)[: args.windows * args.seq_len]
    calib = data.calibration_windows(data.load_tokens(args.calib, tok), args.calib_windows, args.seq_len, seed=0)
    table = np.asarray(params["embed"], np.float32)
    rows, t_all = [], time.perf_counter()

    def ppl(name, p):
        t0 = time.perf_counter()
        value = uq.perplexity(cfg, p, tokens, seq_len=args.seq_len, batch_size=4)
        rows.append({"variant": name, "ppl": value, "eval_s": round(time.perf_counter() - t0, 1)})
        print(f"{name:55s} {value:10.4f}", flush=True)
        return value

    dense = ppl("dense (float32)", params)
    t0 = time.perf_counter()
    h_fp = final_hidden(cfg, params, calib)
    tables = {
        "RTN-4 per row": rtn.rtn_quantize_embedding(jnp.asarray(table), bits=4),
        "RTN-4 g96": rtn.rtn_quantize_embedding(jnp.asarray(table), bits=4, group_size=96),
        "RTN-4 g32": rtn.rtn_quantize_embedding(jnp.asarray(table), bits=4, group_size=32),
        "RTN-8 g96": rtn.rtn_quantize_embedding(jnp.asarray(table), bits=8, group_size=96),
        "GPTQ-4 g96 as the head (float hidden states)": gptq_table(table, h_fp, bits=4, group_size=96),
    }
    print(f"tables in {time.perf_counter() - t0:.1f} s", flush=True)
    for name, q in tables.items():
        ppl(f"table only: {name}", {**params, "embed": q})

    t0 = time.perf_counter()
    quant = uq.quantize(cfg, params, calib, method="gptq", bits=4, group_size=128, quantize_embeddings=False)
    gptq_s = time.perf_counter() - t0
    ppl("linears only: GPTQ-4 (table float)", quant)
    h_q = final_hidden(cfg, quant, calib)
    tables_q = {k: v for k, v in tables.items() if "GPTQ" not in k}
    tables_q["GPTQ-4 g96 as the head (quantized-prefix hidden states)"] = gptq_table(table, h_q, bits=4, group_size=96)
    for name, q in tables_q.items():
        ppl(f"head to toe: GPTQ-4 linears + {name}", {**quant, "embed": q})
    bytes_ = {name: packed.deployed_bytes({"embed": q}) for name, q in tables_q.items()}
    result = {"model": args.model, "windows": args.windows, "seq_len": args.seq_len,
              "calib_windows": args.calib_windows, "dense_ppl": dense, "gptq_linears_s": round(gptq_s, 1),
              "rows": [{**r, "ratio_to_dense": r["ppl"] / dense} for r in rows], "table_bytes": bytes_,
              "table_bytes_fp16": 2 * table.size, "host": platform.node(), "jax": jax.__version__,
              "wall_s": round(time.perf_counter() - t_all, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        print(f"{r['variant']:75s} {r['ppl']:9.3f} {r['ratio_to_dense']:6.3f}x")


if __name__ == "__main__":
    main()
