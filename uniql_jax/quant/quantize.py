"""Stage 4 driver: quantize every linear weight of a sorted model, block by block (docs/method.md,
"Stage 4: quantization").

The pure cores live beside this file (``gptq.gptq_quantize``, ``rtn``); this driver
only walks the model (``method="uniquan"`` hands over to ``uniquan_driver``; both drivers
share the calibration plan of ``plan.py``, re-exported here):

* the calibration windows run block by block (``calibration.run_blocks``); the
  inputs of every weight product of a block are captured through the model's own
  ``wdot`` calls (``layers.record_weight_inputs``) and summed into Hessians
  ``H = 2/N Σ x xᵀ`` over the flattened contraction axes;
* the block is quantized and its outputs recomputed with the quantized weights, so
  the next block's Hessians come from the already-quantized prefix (GPTQ's
  sequential mode; within a block all weights see full-precision block inputs);
* embeddings: per-row round-to-nearest; an untied lm_head: GPTQ on the final
  normalized hidden states.

Elastic slicing never re-quantizes: a weight is quantized along its *last
contraction axis* (D for q/k/v/gate/up/in_proj, R for o, F for down, C for Mamba
out) in groups that divide every size the rate table keeps of that axis, so each
kept slice is a whole number of groups (``group_size_for``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time

import jax.numpy as jnp
import numpy as np

from uniql_jax.compress import calibration
from uniql_jax.config import ModelConfig
from uniql_jax.models.layers import rms_norm
from uniql_jax.quant import gptq, rtn, uniquan_driver
from uniql_jax.quant.formats import qarray
from uniql_jax.quant.plan import group_size_for, kept_sizes, linear_contractions, linear_inputs

log = logging.getLogger(__name__)
METHODS = ("gptq", "rtn")
F32 = jnp.float32


def to_qarray_nd(q2: qarray.QArray, shape: tuple[int, ...], n_contract: int) -> qarray.QArray:
    """A QArray of the 2-D view [prod(contraction), prod(rest)] back in the weight's own shape.

    Groups of the flattened input never straddle the last contraction axis (the
    group size divides it), so the packed bytes and scales reshape in place."""
    axis = n_contract - 1
    codes_shape = shape[:axis] + (shape[axis] * q2.bits // 8,) + shape[n_contract:]
    groups_shape = shape[:axis] + (shape[axis] // q2.group_size,) + shape[n_contract:]
    return qarray.rebuild(q2, q2.codes.reshape(codes_shape), lambda g: g.reshape(groups_shape), axis=axis, shape=shape)


def quantize_weight(w, hessian, *, method, bits, group_size, n_contract, damp, act_order, zero_point=False):
    shape = tuple(w.shape)
    w2 = jnp.asarray(w, F32).reshape(math.prod(shape[:n_contract]), -1)
    if method == "gptq":
        q2 = gptq.gptq_quantize(w2, jnp.asarray(hessian, F32), bits=bits, group_size=group_size, damp=damp,
                                act_order=act_order, zero_point=zero_point)
    else:
        q2 = rtn.rtn_quantize(w2, bits=bits, group_size=group_size, zero_point=zero_point)
    return to_qarray_nd(q2, shape, n_contract)


# keywords of `uniquan_driver.quantize` that `quantize` sets itself (the rest are its method options)
_UNIQUAN_SHARED = {"cfg", "params", "calib", "bits", "group_size", "table", "quantize_embeddings", "embedding_bits",
                   "batch_size", "mesh", "progress"}


def method_options(method: str) -> dict:
    """{name: default} of the settings `options` may pass to `method`'s driver.

    UniQuan: the reconstruction settings of ``uniquan_driver.quantize`` (steps, lr,
    alpha_lr_ratio, windows_per_step, mix_prob, period, head_steps, seed), read from its
    signature; GPTQ and RTN take theirs as named keywords of `quantize` (none via `options`).
    """
    if method != "uniquan":
        return {}
    params = inspect.signature(uniquan_driver.quantize).parameters
    return {k: p.default for k, p in params.items() if k not in _UNIQUAN_SHARED}


def _check_options(method: str, options) -> dict:
    if options is None:
        return {}
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = dataclasses.asdict(options)
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict or a dataclass instance, got {type(options).__name__}")
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {method} option(s) {unknown}; {method} takes "
                         f"{sorted(allowed) if allowed else 'no options (use the named keywords of quantize)'}")
    return dict(options)


def quantize(cfg: ModelConfig, params: dict, calib, *, method: str = "gptq", bits: int = 4, group_size: int = 128,
             table: dict | None = None, quantize_embeddings: bool = True, embedding_bits: int | None = None,
             tied_head_gptq: bool = False, damp: float = 0.01, act_order: bool = False,
             batch_size: int = 8, mesh=None, progress: bool = True, options: dict | None = None,
             zero_point: bool = False, consume: bool = False) -> dict:
    """Params with every linear weight packed (``uq.quantize``, docs/api.md); norms, biases, convs, A, D stay float.

    `table` (from ``uq.allocate``) fixes the group size of weights whose input axis is
    pruned so that every stored rate slices whole groups; weights of an axis whose
    kept sizes share no multiple of 8 stay in 16 bits (logged).
    `embedding_bits` (default: `bits`) quantizes the embedding table (and an untied
    head) at another width, e.g. 8. `tied_head_gptq` (GPTQ only): a tied table is also
    the output head, a linear over the final hidden states; quantize it with GPTQ on
    those inputs (groups along D, the same packed layout) instead of per-row RTN.
    `options` (a dict or a dataclass instance): settings forwarded to the method's driver,
    e.g. ``options={"steps": 2560, "lr": 5e-3}`` for UniQuan (``method_options(method)``
    lists them with their defaults); an unknown key raises. Unset keys keep the driver's
    defaults.
    `zero_point` (gptq, rtn): asymmetric groups, ``w = scale * code + offset`` on the min/max
    grid (``ZeroPointQArray``; 16 more bits per group) for every packed weight and the
    embedding table, instead of the symmetric absmax grid. Weights already on such a grid
    (GGUF Q4_1: 4 bits, groups of 32) are reproduced exactly by ``method="rtn"``.
    `consume=True` (gptq, rtn) hands `params` over: each float block is dropped from it once
    quantized (``params["blocks"]`` left with None entries), so the float model and the packed
    one never coexist whole.
    """
    if method not in METHODS + ("uniquan",):
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS + ('uniquan',)}")
    if zero_point and method == "uniquan":
        raise ValueError("zero_point applies to the uniform methods (gptq, rtn); UniQuan's BCQ weights carry "
                         "their own per-group offset")
    options = _check_options(method, options)
    if embedding_bits is None:
        embedding_bits = bits
    if method == "uniquan":
        return uniquan_driver.quantize(cfg, params, calib, bits=bits, group_size=group_size, table=table,
                                       quantize_embeddings=quantize_embeddings, embedding_bits=embedding_bits,
                                       batch_size=batch_size, mesh=mesh, progress=progress, **options)
    t0 = time.perf_counter()
    if method == "rtn":  # no Hessian: no calibration pass (`calib` is not read)
        out, skipped = rtn_quantize_model(cfg, params, table, bits=bits, group_size=group_size,
                                          quantize_embeddings=quantize_embeddings, embedding_bits=embedding_bits,
                                          zero_point=zero_point, consume=consume)
        _log_done(method, bits, cfg, skipped, t0)
        return out
    if consume:
        params["blocks"] = list(params["blocks"])
    blocks = list(params["blocks"])

    skipped = []

    def on_block(i, blk, stats):
        new = dict(blocks[i])
        for name, n in sorted(linear_contractions(cfg, blk, blocks[i]).items()):
            if name not in stats:
                continue
            w = blocks[i][name]
            gs = group_size_for(kept_sizes(cfg, table, i, name, n - 1), group_size)
            if gs is None:
                skipped.append(f"block {i} {name}")
                continue
            hessian = 2.0 * np.asarray(stats[name]) / stats["tokens"]
            new[name] = quantize_weight(w, hessian, method=method, bits=bits, group_size=gs, n_contract=n,
                                        damp=damp, act_order=act_order, zero_point=zero_point)
        blocks[i] = new
        return new

    run = calibration.run_blocks(cfg, params, calib, {k: linear_inputs for k in ("attention", "mlp", "mamba2")},
                                 on_block, batch_size=batch_size, mesh=mesh, progress=progress,
                                 desc=f"{method} {bits}-bit", return_final=True, release_blocks=consume)
    out = {**params, "blocks": blocks}
    if quantize_embeddings:
        D = cfg.hidden_size
        gs = group_size_for([D], group_size)
        h = rms_norm(jnp.asarray(run["final"]), jnp.asarray(params["final_norm"], F32), cfg.rms_norm_eps)
        h = np.asarray(h, np.float32).reshape(-1, D)
        head_hessian = 2.0 * (h.T @ h) / len(h)  # the head's inputs: the final normalized hidden states
        if cfg.tie_word_embeddings and tied_head_gptq and method == "gptq":
            head = quantize_weight(jnp.asarray(params["embed"], F32).T, head_hessian, method=method,
                                   bits=embedding_bits, group_size=gs, n_contract=1, damp=damp, act_order=act_order,
                                   zero_point=zero_point)
            out["embed"] = transposed_table(head)
        else:
            out["embed"] = rtn.rtn_quantize_embedding(jnp.asarray(params["embed"], F32), bits=embedding_bits,
                                                      group_size=gs, zero_point=zero_point)
        if not cfg.tie_word_embeddings:
            out["lm_head"] = quantize_weight(params["lm_head"], head_hessian, method=method, bits=embedding_bits,
                                             group_size=gs, n_contract=1, damp=damp, act_order=act_order,
                                             zero_point=zero_point)
    _log_done(method, bits, cfg, skipped, t0)
    return out


def _log_done(method, bits, cfg, skipped, t0):
    if skipped:
        log.warning("kept in 16 bits (no group size divides their kept sizes): %s", ", ".join(skipped))
    log.info("%s %d-bit quantization of %d blocks in %.1f s", method, bits, len(cfg.blocks), time.perf_counter() - t0)


def transposed_table(head_DxV: qarray.QArray) -> qarray.QArray:
    """A head ``[D, V]`` quantized along D (axis 0) as the row table ``[V, D]`` along D (axis 1) that
    embedding lookups read: the same codes and scales (and offsets), transposed (packing runs along D
    either way)."""
    if head_DxV.ndim != 2 or head_DxV.axis != 0:
        raise ValueError(f"expected a [D, V] head quantized along axis 0, got {head_DxV!r}")
    D, V = head_DxV.shape
    return qarray.rebuild(head_DxV, head_DxV.codes.T, lambda g: g.T, axis=1, shape=(V, D))


def rtn_quantize_model(cfg: ModelConfig, params: dict, table: dict | None, *, bits: int = 4, group_size: int = 128,
                       quantize_embeddings: bool = True, embedding_bits: int | None = None,
                       zero_point: bool = False, consume: bool = False) -> tuple[dict, list[str]]:
    """(params, weights left in 16 bits): round-to-nearest needs no activations, so no calibration pass.

    Every weight with a recorded product is packed along its last contraction axis, in
    the group size ``group_size_for`` picks from the table's kept sizes (weights with
    none stay float and are listed), embeddings per-row RTN, an untied head like a
    linear. The same packed layout as GPTQ's. `params` may be abstract (traced under
    ``jax.eval_shape``: the layout of a model too large to materialize). `consume`: each float
    block is dropped from ``params["blocks"]`` once packed.
    """
    blocks, skipped = [], []
    if consume:
        params["blocks"] = list(params["blocks"])
    for i, blk in enumerate(cfg.blocks):
        bp = params["blocks"][i]
        if consume:
            params["blocks"][i] = None
        new = dict(bp)
        for name, n in sorted(linear_contractions(cfg, blk, bp).items()):
            gs = group_size_for(kept_sizes(cfg, table, i, name, n - 1), group_size)
            if gs is None:
                skipped.append(f"block {i} {name}")
                continue
            new[name] = quantize_weight(bp[name], None, method="rtn", bits=bits, group_size=gs, n_contract=n,
                                        damp=0.0, act_order=False, zero_point=zero_point)
        blocks.append(new)
    out = {**params, "blocks": blocks}
    if quantize_embeddings:
        gs = group_size_for([cfg.hidden_size], group_size)
        embedding_bits = bits if embedding_bits is None else embedding_bits
        out["embed"] = rtn.rtn_quantize_embedding(jnp.asarray(params["embed"], F32), bits=embedding_bits,
                                                  group_size=gs, zero_point=zero_point)
        if not cfg.tie_word_embeddings:
            out["lm_head"] = quantize_weight(params["lm_head"], None, method="rtn", bits=embedding_bits,
                                             group_size=gs, n_contract=1, damp=0.0, act_order=False,
                                             zero_point=zero_point)
    return out, skipped
