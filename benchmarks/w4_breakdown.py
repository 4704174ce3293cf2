"""Where W4 quality goes on the *sorted* SmolLM2-135M at rate 0: the source grid, per linear type, GPTQ settings.

    python -m benchmarks.w4_breakdown [--model ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--windows 20] [--seq-len 512] [--calib-windows 32] [--gptq-groups 128,64,32]
        [--out benchmarks/cpu-w4-breakdown-smollm2.json]

The model's source is a Q4_1 GGUF: every linear is on an asymmetric 4-bit grid (scale and
minimum per 32 input weights), which an asymmetric round-to-nearest in groups of 32
reproduces. Sorting (``uq.sort``, once, on the calibration windows) permutes the input
channels of ``down`` across those groups and rewrites ``v`` / ``o`` in the V/O SVD basis;
``q`` / ``k`` / ``gate`` / ``up`` only see their output columns permuted (their groups run
along the unchanged input D). Perplexity on WikiText-2 test (first ``--windows`` windows of
``--seq-len``), calibration from WikiText-2 valid, all at rate 0 (full rank, no pruning),
the embedding table float unless a row says otherwise:

1. unsorted vs sorted, asymmetric RTN (``ZeroPointQArray``) of all linears in groups of
   32 and 128 (128 is reduced per matrix to a divisor: v 96, o 64, the rest 128);
2. the sorted model with one linear type at a time asymmetric RTN in groups of 32;
3. the sorted model, GPTQ with zero point of all linears (``uq.quantize``) in each of
   ``--gptq-groups``, then at the best of those group sizes: act-order (static groups)
   and damping 0.1 instead of 0.01;
4. head to toe: the best linear setting of 3 with the tied table quantized as the head
   (GPTQ on the quantized prefix's final hidden states, as ``uq.quantize(...,
   tied_head_gptq=True)`` does) at 4 and at 8 bits, with deployed bytes.

Part 4 reuses part 3's quantized linears and quantizes only the table, with the library's
per-matrix ``quantize_weight`` + ``transposed_table`` on the final hidden states of the
quantized model: the same computation ``uq.quantize`` makes after its last block.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import uniql_jax as uq
from benchmarks.real_model import REPO, add_model_and_data_args
from benchmarks.tied_head import final_hidden
from uniql_jax import data
from uniql_jax.quant.formats import packed
from uniql_jax.quant.plan import group_size_for, linear_contractions
from uniql_jax.quant.quantize import quantize_weight, transposed_table

LINEAR_TYPES = ("q", "k", "v", "o", "gate", "up", "down")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.w4_breakdown", description=__doc__.split("\n")[0])
    add_model_and_data_args(p)
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--gptq-groups", default="128,64,32", help="GPTQ group sizes of part 3 (default 128,64,32)")
    p.add_argument("--no-variants", action="store_true", help="skip act-order / damping rows of part 3")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "cpu-w4-breakdown-smollm2.json"), help="JSON output")
    return p


def rtn_linears(cfg, params, *, group_size, zero_point=True, types=None):
    """Params with the linears of `types` (all if None) RTN-quantized along their last contraction
    axis (``quantize_weight``, the per-matrix step of ``uq.quantize``), the group size reduced per
    matrix to a divisor (``group_size_for``), 4 bits; everything else as it was."""
    blocks = []
    for i, (blk, bp) in enumerate(zip(cfg.blocks, params["blocks"])):
        new = dict(bp)
        for name, n in linear_contractions(cfg, blk, bp).items():
            if types is not None and name not in types:
                continue
            gs = group_size_for([int(bp[name].shape[n - 1])], group_size)
            new[name] = quantize_weight(bp[name], None, method="rtn", bits=4, group_size=gs, n_contract=n,
                                        damp=0.0, act_order=False, zero_point=zero_point)
        blocks.append(new)
    return {**params, "blocks": blocks}


def gptq_head_table(cfg, params_q, calib, *, bits, group_size, zero_point, damp=0.01, act_order=False):
    """The tied table quantized as the head: GPTQ on the final normalized hidden states of `params_q`
    (the quantized prefix), groups along D, stored as the row table (``transposed_table``)."""
    h = final_hidden(cfg, params_q, calib)
    hessian = 2.0 * (h.T @ h) / len(h)
    gs = group_size_for([cfg.hidden_size], group_size)
    head = quantize_weight(jnp.asarray(params_q["embed"], jnp.float32).T, hessian, method="gptq", bits=bits,
                           group_size=gs, n_contract=1, damp=damp, act_order=act_order, zero_point=zero_point)
    return transposed_table(head), gs


def main(argv=None):
    from converters import hf

    args = build_parser().parse_args(argv)
    groups = [int(g) for g in args.gptq_groups.split(",") if g]
    t_all = time.perf_counter()
    cfg, params = hf.load(args.model)
    tok = hf.load_tokenizer(args.model)
    tokens = data.load_tokens(args.eval, tok)[: args.windows * args.seq_len]
    calib = data.calibration_windows(data.load_tokens(args.calib, tok), args.calib_windows, args.seq_len, seed=0)
    rows, timings = [], {}

    def ppl(part, name, p, **extra):
        t0 = time.perf_counter()
        value = uq.perplexity(cfg, p, tokens, seq_len=args.seq_len, batch_size=4, progress=False)
        row = {"part": part, "variant": name, "ppl": value, "eval_s": round(time.perf_counter() - t0, 1), **extra}
        rows.append(row)
        print(f"[{part}] {name:62s} {value:10.4f}  ({row['eval_s']} s, {time.perf_counter() - t_all:.0f} s total)",
              flush=True)
        return value

    dense = ppl(0, "unsorted float32 (dense)", params)
    t0 = time.perf_counter()
    scfg, sparams = uq.sort(cfg, params, calib, progress=False)
    timings["sort_s"] = round(time.perf_counter() - t0, 1)
    print(f"sorted in {timings['sort_s']} s", flush=True)
    ppl(0, "sorted float32", sparams)

    # 1. the source grid: asymmetric RTN of all linears, unsorted vs sorted
    for g in (32, 128):
        ppl(1, f"unsorted, all linears asym RTN g{g}", rtn_linears(cfg, params, group_size=g), group_size=g)
        ppl(1, f"sorted, all linears asym RTN g{g}", rtn_linears(scfg, sparams, group_size=g), group_size=g)
    ppl(1, "sorted, all linears symmetric RTN g32", rtn_linears(scfg, sparams, group_size=32, zero_point=False),
        group_size=32)

    # 2. which linear types leave the grid on the sorted model
    for t in LINEAR_TYPES:
        ppl(2, f"sorted, only {t} asym RTN g32", rtn_linears(scfg, sparams, group_size=32, types={t}),
            group_size=32, types=[t])

    # 3. GPTQ with zero point on the sorted model, linears only
    best = {"ppl": float("inf")}

    def run_gptq(name, **kw):
        t0 = time.perf_counter()
        q = uq.quantize(scfg, sparams, calib, method="gptq", bits=4, quantize_embeddings=False, zero_point=True,
                        progress=False, **kw)
        quant_s = round(time.perf_counter() - t0, 1)
        value = ppl(3, name, q, quantize_s=quant_s, **kw)
        if value < best["ppl"]:
            best.update(ppl=value, name=name, params=q, kw=kw)
        return value

    for g in groups:
        run_gptq(f"sorted, all linears GPTQ zero point g{g}", group_size=g)
    g_best = best["kw"]["group_size"]
    if not args.no_variants:
        run_gptq(f"sorted, all linears GPTQ zero point g{g_best} act-order", group_size=g_best, act_order=True)
        run_gptq(f"sorted, all linears GPTQ zero point g{g_best} damp 0.1", group_size=g_best, damp=0.1)

    # 4. head to toe: the best linears with the tied table as the GPTQ head, at 4 and 8 bits
    quant, kw = best["params"], best["kw"]
    head_bytes = {}
    for bits in (4, 8):
        t0 = time.perf_counter()
        table, gs = gptq_head_table(scfg, quant, calib, bits=bits, group_size=kw["group_size"], zero_point=True,
                                    damp=kw.get("damp", 0.01), act_order=kw.get("act_order", False))
        head_s = round(time.perf_counter() - t0, 1)
        full = {**quant, "embed": table}
        nbytes = packed.deployed_bytes(full)
        head_bytes[bits] = nbytes
        ppl(4, f"head to toe: {best['name'].removeprefix('sorted, all linears ')} + table GPTQ-{bits} head g{gs}",
            full, head_s=head_s, deployed_bytes=nbytes, table_bytes=packed.deployed_bytes({"embed": table}))

    result = {"model": args.model, "windows": args.windows, "seq_len": args.seq_len,
              "calib_windows": args.calib_windows, "rate": 0.0, "dense_ppl": dense,
              "best_linears": {"variant": best["name"], **best["kw"]},
              "bytes_linears_w4_table_fp16": packed.deployed_bytes(quant),
              "dense_bytes_fp16": packed.deployed_bytes(params), **timings,
              "rows": [{**r, "ratio_to_dense": r["ppl"] / dense} for r in rows],
              "host": platform.node(), "jax": jax.__version__, "wall_s": round(time.perf_counter() - t_all, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        print(f"[{r['part']}] {r['variant']:75s} {r['ppl']:9.3f} {r['ratio_to_dense']:6.3f}x")
    print(f"wall {result['wall_s']} s")


if __name__ == "__main__":
    main()
