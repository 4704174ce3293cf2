"""Stage 4 with UniQuan: block-by-block UniQuanF reconstruction, folded to plain BCQ (docs/method.md,
"UniQuan: UniQuanF").

The pure cores are ``uniquan`` (unified init, fake quantization, ``reconstruct_block``)
and ``bcq`` (the packed ``BCQArray``, slicing, nested planes); this driver walks the
model, in the same frame as the GPTQ driver (``quantize.py``):

* which weights, along which axis, with which groups: every weight product a block
  makes (``plan.linear_contractions``), quantized along its last contraction axis
  in groups that divide every size the rate table keeps of that axis
  (``plan.kept_sizes`` / ``group_size_for``), so a pruned slice of a BCQ weight is
  a whole number of groups and pruning never re-quantizes;
* two residual streams run side by side over the calibration windows: the
  full-precision model (block inputs ``x_fp``, block outputs ``y_fp``) and the
  already-quantized prefix (``x_q``, starting from the quantized embedding). Each
  block is trained to map an element-wise mix of ``x_fp`` / ``x_q`` onto ``y_fp``
  (docs/method.md, "UniQuan: UniQuanF", objective), folded to ``BCQArray``, and ``x_q`` is pushed through the
  folded block;
* embeddings: per-row round-to-nearest (``rtn.rtn_quantize_embedding``, as for GPTQ;
  a tied head reads them); an untied lm_head: BCQ reconstructed on its logits like a
  block (``head_steps``), or the unified-init BCQ fit alone (``head_steps=0``).

``nested_planes`` gives the second elastic axis: a k-bit BCQ model evaluated with its
first k' planes, alpha and offset refit by least squares on calibration inputs of the
k'-bit prefix (``bcq_fit.refit_alpha`` with the input correlation of each weight).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.compress import calibration
from uniql_jax.config import ModelConfig
from uniql_jax.eval import data_mesh
from uniql_jax.models.layers import rms_norm
from uniql_jax.quant import bcq_fit, rtn, uniquan
from uniql_jax.quant.formats import bcq
from uniql_jax.quant.plan import group_size_for, kept_sizes, linear_contractions, linear_inputs

log = logging.getLogger(__name__)
F32 = jnp.float32
BLOCK_KINDS = ("attention", "mlp", "mamba2")
HEAD_LOGITS_BUDGET = 1 << 30  # bytes of float32 fp logits [W, T, V] the lm_head reconstruction may hold


# ---------------------------------------------------------------------------
# What to quantize in a block
# ---------------------------------------------------------------------------


def block_plan(cfg: ModelConfig, table: dict | None, i: int, block_params: dict, group_size: int):
    """({name: quantized axis}, {name: group size}, [names left in 16 bits]) for block i.

    The quantized axis is a weight's last contraction axis: D for q/k/v/gate/up/in_proj
    (0), R for o [K, G, R, D] (2), F for down (0), C for Mamba out [H, C, D] (1).
    """
    axes, groups, skipped = {}, {}, []
    for name, n in sorted(linear_contractions(cfg, cfg.blocks[i], block_params).items()):
        axis = n - 1
        gs = group_size_for(kept_sizes(cfg, table, i, name, axis), group_size)
        if gs is None:
            skipped.append(name)
            continue
        axes[name], groups[name] = axis, gs
    return axes, groups, skipped


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------


def _shared_blk(blk):
    # modules never read the layer index: one compiled step serves all blocks of equal sizes
    return dataclasses.replace(blk, layer=0)


def propagate(cfg: ModelConfig, blk, block_params: dict, x_WxTxD: np.ndarray, *, batch_size: int, mesh) -> np.ndarray:
    """Block outputs x + update for every window (host float32 [W, T, D]), data-parallel over `mesh`
    (across processes too: every process gets every window's outputs)."""
    return calibration.propagate_all(cfg, blk, block_params, x_WxTxD, batch_size=batch_size, mesh=mesh)


@functools.lru_cache(maxsize=64)
def block_apply(cfg: ModelConfig, blk):
    """The pure block map (params, x [B, T, D]) -> x + update, positions 0..T-1."""
    blk = _shared_blk(blk)

    def apply_fn(block_params, x_BxTxD):
        B, T = x_BxTxD.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        update, _ = calibration.bind_block(cfg, blk, block_params)(x_BxTxD, positions, None, None, "xla")
        return x_BxTxD + update.astype(x_BxTxD.dtype)

    return apply_fn


def _head_logits(p, h_BxTxD):
    return jnp.einsum("btd,dv->btv", h_BxTxD, p["lm_head"], preferred_element_type=F32)


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def quantize(cfg: ModelConfig, params: dict, calib, *, bits: int = 4, group_size: int = 128, table: dict | None = None,
             quantize_embeddings: bool = True, embedding_bits: int | None = None, steps: int = 200, lr: float = 5e-3, alpha_lr_ratio: float = 0.1,
             windows_per_step: int = 1, mix_prob: float = 0.5, period: int = 2, head_steps: int | None = None,
             seed: int = 0, batch_size: int = 8, mesh=None, progress: bool = True) -> dict:
    """Params with every linear weight a ``BCQArray`` (``uq.quantize(..., method="uniquan")``).

    calib: int32 [W, T] windows. Per block, UniQuanF reconstruction
    (``uniquan.reconstruct_block``): ``steps`` Adam steps with cosine decay (``lr`` for
    the deltas, ``lr * alpha_lr_ratio`` for alpha; paper: 2560 steps, 5e-3 / 5e-4),
    ``windows_per_step`` calibration windows per step (paper: 1), quantized-prefix
    inputs mixed in with probability ``mix_prob``, local remapping every ``period``
    steps. ``table`` (from ``uq.allocate``) fixes group sizes so that every stored rate
    slices whole groups; weights whose kept sizes share no multiple of 8 stay in 16 bits
    (logged), exactly the weights the GPTQ driver leaves. An untied lm_head is
    reconstructed on its logits for ``head_steps`` steps (default: ``steps`` when the fp
    logits of all windows, float32 [W, T, V], fit in ``HEAD_LOGITS_BUDGET``, else 0);
    0 steps is the unified-init BCQ fit alone (weight error, no data).
    The embedding table is per-row RTN at `embedding_bits` (default `bits`), as in the GPTQ driver.
    Norms, biases, convs, A, D, dt stay float.
    """
    t0 = time.perf_counter()
    mesh = mesh or data_mesh()
    D = cfg.hidden_size
    out = dict(params)
    if quantize_embeddings:  # the GPTQ driver's embedding quantizer, so both methods share it
        out["embed"] = rtn.rtn_quantize_embedding(jnp.asarray(params["embed"], F32),
                                                  bits=bits if embedding_bits is None else embedding_bits,
                                                  group_size=group_size_for([D], group_size))
    x_fp = calibration.embed_windows(cfg, params, calib)
    x_q = calibration.embed_windows(cfg, out, calib)  # the quantized model starts from its quantized table
    train = dict(lr=lr, alpha_lr_ratio=alpha_lr_ratio, period=period, batch_size=windows_per_step, mix_prob=mix_prob,
                 bits=bits)
    blocks, skipped = [], []
    items = list(enumerate(cfg.blocks))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"uniquan {bits}-bit", unit="block")
    for i, blk in items:
        fp_block = calibration.as_float32(params["blocks"][i])
        y_fp = propagate(cfg, blk, fp_block, x_fp, batch_size=batch_size, mesh=mesh)
        axes, groups, left = block_plan(cfg, table, i, fp_block, group_size)
        skipped += [f"block {i} {name}" for name in left]
        new = dict(params["blocks"][i])
        if axes:
            losses = []
            folded = uniquan.reconstruct_block(
                block_apply(cfg, blk), fp_block, list(axes), jnp.asarray(x_fp), jnp.asarray(x_q), jnp.asarray(y_fp),
                steps=steps, seed=seed + i, group_size=group_size, axes=axes, group_sizes=groups,
                progress=lambda step, loss: losses.append(loss), log_every=max(steps // 4, 1), **train)
            new.update(folded)
            if losses:
                log.info("block %d (%s): reconstruction loss %.3e -> %.3e over %d steps", i, blk.kind, losses[0],
                         losses[-1], steps)
        blocks.append(new)
        x_q = propagate(cfg, blk, new, x_q, batch_size=batch_size, mesh=mesh)
        x_fp = y_fp
    out["blocks"] = blocks
    if quantize_embeddings and not cfg.tie_word_embeddings:
        if head_steps is None:
            head_steps = steps if 4 * x_fp.shape[0] * x_fp.shape[1] * cfg.vocab_size <= HEAD_LOGITS_BUDGET else 0
            if head_steps == 0 and steps:
                log.warning("lm_head: %d x %d x %d float32 logits exceed the %d MiB reconstruction budget; the head "
                            "is BCQ-quantized with the unified initialization only (no reconstruction steps)",
                            x_fp.shape[0], x_fp.shape[1], cfg.vocab_size, HEAD_LOGITS_BUDGET >> 20)
        out["lm_head"] = _quantize_head(cfg, params, x_fp, x_q, group_size=group_size_for([D], group_size),
                                        steps=head_steps, seed=seed + len(blocks), **train)
    if skipped:
        log.warning("kept in 16 bits (no group size divides their kept sizes): %s", ", ".join(skipped))
    log.info("uniquan %d-bit quantization of %d blocks (%d steps each) in %.1f s", bits, len(blocks), steps,
             time.perf_counter() - t0)
    return out


def _quantize_head(cfg, params, x_fp, x_q, *, bits, group_size, steps, **train):
    """BCQ lm_head [D, V] grouped along D: unified init (steps = 0) or reconstruction of the logits
    from the final normalized hidden states (fp / quantized-model mix, as for a block)."""
    W = jnp.asarray(params["lm_head"], F32)
    if steps == 0:
        qp, qb = uniquan.unified_init(W, bits=bits, group_size=group_size)
        return uniquan.fold_to_bcq(W, qp, qb)
    norm = jnp.asarray(params["final_norm"], F32)
    h_fp = rms_norm(jnp.asarray(x_fp), norm, cfg.rms_norm_eps)
    h_q = rms_norm(jnp.asarray(x_q), norm, cfg.rms_norm_eps)
    head = {"lm_head": W}
    return uniquan.reconstruct_block(_head_logits, head, ["lm_head"], h_fp, h_q, _head_logits(head, h_fp), steps=steps,
                                     bits=bits, group_size=group_size, **train)["lm_head"]


# ---------------------------------------------------------------------------
# Nested bit-planes
# ---------------------------------------------------------------------------


def axis_correlation(corr, shape: tuple[int, ...], n_contract: int) -> jax.Array:
    """H [n, n] of a weight's quantized axis from the correlation of all its contraction axes.

    ``corr`` is Σ xᵀx over the flattened contraction axes ``shape[:n_contract]`` (the
    quantized one last); the leading contraction axes (o's heads, Mamba out's heads)
    each see their own inputs, and ``refit_alpha`` takes one H per weight, so their
    diagonal blocks are averaged.
    """
    n = shape[n_contract - 1]
    lead = math.prod(shape[:n_contract - 1])
    blocks = jnp.asarray(corr, F32).reshape(lead, n, lead, n)
    return jnp.mean(blocks[jnp.arange(lead), :, jnp.arange(lead), :], axis=0)


def nested_planes(cfg: ModelConfig, params_q: dict, params_ref: dict, calib, bits: int, *, refit: bool = True,
                  damp: float = 0.01, batch_size: int = 8, mesh=None, progress: bool = False) -> dict:
    """The ``bits``-plane model of a BCQ model: every ``BCQArray`` keeps its first ``bits`` planes.

    ``refit=False`` keeps the stored scales of those planes (AnyBCQ truncation).
    ``refit=True`` solves alpha and offset per precision by least squares against the
    full-precision weights ``params_ref`` (the same sorted model before quantization),
    weighted by the input correlation H of each weight (``bcq_fit.refit_alpha``) measured
    block by block on ``calib`` in the already-refit prefix (the sequential order of
    GPTQ); the lm_head uses the final normalized hidden states. Codes never change.
    """
    def drop(w, ref, H):
        if not refit:
            return bcq.drop_planes(w, bits)
        alpha, offset = bcq_fit.refit_alpha(w, jnp.asarray(ref, F32), bits, H=H, damp=damp)
        return bcq.drop_planes(w, bits, alpha, offset)

    blocks = list(params_q["blocks"])
    lm_head = params_q.get("lm_head")
    if not refit:
        out = {**params_q, "blocks": [{k: drop(v, None, None) if bcq.is_bcq(v) else v for k, v in b.items()}
                                      for b in blocks]}
        if bcq.is_bcq(lm_head):
            out["lm_head"] = drop(lm_head, None, None)
        return out

    def dense(block):
        # the calibration pass runs on dequantized copies (same values): the collector names
        # weights by array identity, which a packed weight rebuilt by NNX does not keep
        return {k: v.dequantize(F32) if bcq.is_bcq(v) else v for k, v in block.items()}

    def on_block(i, blk, stats):
        packed = {k: v for k, v in blocks[i].items() if bcq.is_bcq(v)}
        if not packed:
            return None
        contract = linear_contractions(cfg, blk, dense(blocks[i]))
        new = dict(blocks[i])
        for name, w in packed.items():
            H = axis_correlation(stats[name], w.shape, contract[name]) / stats["tokens"]
            new[name] = drop(w, params_ref["blocks"][i][name], H)
        blocks[i] = new
        return dense(new)

    run = calibration.run_blocks(cfg, {**params_q, "blocks": [dense(b) for b in blocks]}, calib,
                                 {k: linear_inputs for k in BLOCK_KINDS}, on_block, batch_size=batch_size, mesh=mesh,
                                 progress=progress, desc=f"refit {bits} planes", return_final=True)
    out = {**params_q, "blocks": blocks}
    if bcq.is_bcq(lm_head):
        h = rms_norm(jnp.asarray(run["final"]), jnp.asarray(params_q["final_norm"], F32), cfg.rms_norm_eps)
        h = h.reshape(-1, cfg.hidden_size)
        H = jnp.einsum("ni,nj->ij", h, h, preferred_element_type=F32) / len(h)
        out["lm_head"] = drop(lm_head, params_ref["lm_head"], H)
    return out
