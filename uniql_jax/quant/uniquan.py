"""UniQuanF: binary-coding quantization trained like uniform quantization (pure core).

Implements docs/method.md, "UniQuan: UniQuanF", for one linear weight, ``W [Din, Dout]`` (``y = x @ W``)
with groups of ``group_size`` along ``Din`` (``axis=0``) or any weight grouped along its
quantized ``axis``, and a generic block-reconstruction driver. Everything is a pure
function of arrays; the model walk lives elsewhere.

Row layout (``bcq_fit.to_rows``): ``R = (Din / g) * Dout`` rows of ``g`` weights, one row
per (group, output column) (in general: per group and position of the other axes).
Per row, with ``c = (2^k - 1) / 2``:

* trainable ``UniQuanParams``: ``delta1 [R]`` (log UQ step, ``s = exp(delta1)``),
  ``delta2 [R, g]`` (element-wise FlexRound divisor, init 0), ``delta3 [R]`` (init 0),
  ``alpha [R, k]`` (BCQ scales in the normalized domain);
* fixed ``UniQuanBuffers``: ``zero [R]`` (UQ zero point ``z``), ``shift [R]`` (BCQ
  offset ``z_b`` of the normalized fit) and ``patterns int32 [R, g]`` (the current
  assignment: each weight's sign pattern, ``bcq_fit.sign_table``).

Name suffixes follow docs/method.md ("Notation and shape letters"): ``_RxE`` is the row
layout, E = g elements per row; ``_RxK`` holds K = k bits per row.

Forward (``fake_quant``), with ``Delta = exp(delta1 + delta2 + delta3)``:

1. transform   ``w~ = w / Delta + z``;  ``u = w~ - z_b - c``
2. map         ``q = sum_i alpha_i b_i`` of the assigned pattern (``remap``: local
   search among value-sorted neighbours, every ``period`` steps)
3. de-transform ``w^ = (q + z_b + c - z) * s``

Unification theorem (``fold_to_bcq``): ``w^ = sum_i (s alpha_i) b_i + s (z_b + c - z)``,
a plain ``BCQArray`` with ``alpha* = s alpha`` and ``o* = s (z_b + c - z)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import optax

from uniql_jax.quant import bcq_fit
from uniql_jax.quant.formats import bcq

DEFAULT_CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(10))  # 1.00 .. 0.55
MIN_STEP = 1e-8  # floor of the UQ step for constant groups


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UniQuanParams:
    """Trainable quantizer parameters of one linear (row layout, see module docstring)."""

    delta1: jax.Array  # [R]     log s
    delta2: jax.Array  # [R, g]  element-wise
    delta3: jax.Array  # [R]     per group
    alpha: jax.Array  # [R, k]  normalized-domain BCQ scales


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UniQuanBuffers:
    """Fixed state of one linear's quantizer; ``patterns`` changes only by remapping."""

    zero: jax.Array  # [R]     z, UQ zero point (continuous)
    shift: jax.Array  # [R]     z_b, BCQ offset in the normalized domain
    patterns: jax.Array  # int32 [R, g] current assignment (sign pattern per weight)
    group_size: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True), default=0)  # quantized (input) axis of W


def _half_range(bits: int) -> float:
    return (2**bits - 1) / 2  # c


# ---------------------------------------------------------------------------
# Unified initialization
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "axis", "rounds", "clip_ratios"))
def unified_init(W: jax.Array, *, bits: int, group_size: int, axis: int = 0, rounds: int = 15,
                 clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS):
    """Unified initialization (docs/method.md, "UniQuan: UniQuanF") for ``W [Din, Dout]`` (groups along ``axis``).

    For each clipping ratio r: UQ min-max step ``s = r (max - min) / (2^k - 1)`` and a
    zero point centring the range, normalize ``x' = w / s + z - c``, run the
    alternating BCQ fit on ``x'`` from two starts (greedy; the UQ levels themselves,
    ``alpha_i = 2^(k-2-i)``), and keep per row the candidate with the least weight error
    ``s^2 ||x' - x^'||^2``. Because the UQ start is among the candidates, the init is
    never worse than min-max UQ at the same ratio.

    Returns ``(UniQuanParams, UniQuanBuffers)`` with ``delta2 = delta3 = 0``.
    """
    axis = axis % W.ndim
    bcq.check_layout(bits, group_size, W.shape[axis])
    c = _half_range(bits)
    # Every candidate x' = (w - center) / s is increasing in w, so one sort of each row serves
    # all ratios and both starts: the fit runs on ascending rows (bcq_fit.alternating_fit_sorted)
    # and the codes are permuted back once at the end.
    w, perm = bcq_fit.sort_rows(bcq_fit.to_rows(W.astype(jnp.float32), group_size, axis))  # [R, g] ascending
    w_min, w_max = w[:, 0], w[:, -1]
    center = 0.5 * (w_max + w_min)
    R = w.shape[0]
    uq_alpha, _ = bcq.uniform_as_bcq(jnp.ones((R,)), c, bits)  # alpha_i = 2^(k-2-i), offset 0

    def normalized(s):
        return (w - center[:, None]) / s[:, None]  # = w/s + z - c, [R, g]

    def candidate(best, ratio):
        s = jnp.maximum(ratio * (w_max - w_min) / (2**bits - 1), MIN_STEP)  # [R]
        z = c - center / s
        x = normalized(s)
        # both starts in one fit over stacked rows [2R, g]: first the greedy start, then the UQ levels
        greedy = bcq_fit.greedy_fit_rows(x, bits)
        uq = (uq_alpha, jnp.zeros((R,), jnp.float32), bcq_fit.nearest_patterns(x, uq_alpha))
        start = tuple(jnp.concatenate([g_, u_]) for g_, u_ in zip(greedy, uq))
        alpha, shift, errors, at_start = bcq_fit.alternating_fit_sorted(jnp.concatenate([x, x]), bits=bits,
                                                                        rounds=rounds, start=start)
        err = jnp.min(errors, axis=0) * jnp.concatenate([s, s]) ** 2  # weight-domain error of the best iterate
        # codes are the nearest levels of (alpha, shift) except for a greedy start kept as is
        greedy_codes = jnp.concatenate([at_start[:R], jnp.zeros((R,), bool)])
        for half in (slice(0, R), slice(R, 2 * R)):
            better = err[half] < best[0]
            new = (err[half], s, z, alpha[half], shift[half], greedy_codes[half])
            best = tuple(jnp.where(better.reshape((-1,) + (1,) * (n.ndim - 1)), n, o) for n, o in zip(new, best))
        return best, None

    empty = (jnp.full((R,), jnp.inf), jnp.ones((R,)), jnp.zeros((R,)), jnp.zeros((R, bits)), jnp.zeros((R,)),
             jnp.zeros((R,), bool))
    (_, s, z, alpha, shift, greedy_codes), _ = jax.lax.scan(candidate, empty, jnp.asarray(clip_ratios, jnp.float32))
    x = normalized(s)  # the chosen ratio's rows, bit for bit as in its candidate
    patterns = jnp.where(greedy_codes[:, None], bcq_fit.greedy_fit_rows(x, bits)[2],
                         bcq_fit.nearest_patterns(x - shift[:, None], alpha))
    patterns = bcq_fit.unsort_rows(patterns, perm)
    g = group_size
    params = UniQuanParams(jnp.log(s), jnp.zeros((R, g), jnp.float32), jnp.zeros((R,), jnp.float32), alpha)
    return params, UniQuanBuffers(z, shift, patterns, group_size, axis)


# ---------------------------------------------------------------------------
# Transform, mapping, fake quantization
# ---------------------------------------------------------------------------


def transform_rows(w_RxE: jax.Array, qp: UniQuanParams, qb: UniQuanBuffers):
    """Step 1: ``w~ = w / exp(d1 + d2 + d3) + z`` and ``u = w~ - z_b - c`` (both [R, g])."""
    c = _half_range(qp.alpha.shape[-1])
    delta = jnp.exp(qp.delta1[:, None] + qp.delta2 + qp.delta3[:, None])
    w_tilde = w_RxE / delta + qb.zero[:, None]
    return w_tilde, w_tilde - qb.shift[:, None] - c


def local_patterns(u_RxE: jax.Array, alpha_RxK: jax.Array, prev_patterns_RxE: jax.Array) -> jax.Array:
    """Local mapping (docs/method.md, "UniQuan: UniQuanF", step 2): search only the previous level and its
    two neighbours *in value order*.

    Uses the same decision boundaries as ``bcq_fit.nearest_patterns``, so whenever the nearest
    level's rank moved by at most one since ``prev_patterns`` (u and the levels moved
    little), the result equals the full search exactly.
    """
    _, pattern_at_rank, rank_of_pattern, mids = bcq_fit.sorted_levels(alpha_RxK)
    R = mids.shape[0]
    inf = jnp.full((R, 1), jnp.inf, mids.dtype)
    bounds = jnp.concatenate([-inf, mids, inf], axis=-1)  # [R, L+1]; rank r spans (bounds[r], bounds[r+1]]
    rank = jnp.take_along_axis(rank_of_pattern, prev_patterns_RxE, axis=-1)  # [R, E]
    up = u_RxE > jnp.take_along_axis(bounds, rank + 1, axis=-1)
    down = u_RxE <= jnp.take_along_axis(bounds, rank, axis=-1)
    rank = rank + up.astype(jnp.int32) - down.astype(jnp.int32)
    return jnp.take_along_axis(pattern_at_rank, rank, axis=-1)


@functools.partial(jax.jit, static_argnames=("period",))
def remap(W: jax.Array, qp: UniQuanParams, qb: UniQuanBuffers, step, *, period: int = 2) -> UniQuanBuffers:
    """Periodic mapping: every ``period`` steps (``step % period == 0``) a local remap of the
    assignment under the current parameters, otherwise the assignment is reused."""

    def local(_):
        _, u = transform_rows(bcq_fit.to_rows(W.astype(jnp.float32), qb.group_size, qb.axis), qp, qb)
        return local_patterns(jax.lax.stop_gradient(u), jax.lax.stop_gradient(qp.alpha), qb.patterns)

    patterns = jax.lax.cond(step % period == 0, local, lambda _: qb.patterns, None)
    return dataclasses.replace(qb, patterns=patterns)


@jax.jit
def full_assignment(W: jax.Array, qp: UniQuanParams, qb: UniQuanBuffers) -> UniQuanBuffers:
    """The assignment recomputed by full search over all 2^k levels (the final mapping)."""
    _, u = transform_rows(bcq_fit.to_rows(W.astype(jnp.float32), qb.group_size, qb.axis), qp, qb)
    return dataclasses.replace(qb, patterns=bcq_fit.nearest_patterns(u, qp.alpha))


@functools.partial(jax.jit, static_argnames=("gradient_filtering",))
def fake_quant(W: jax.Array, qp: UniQuanParams, qb: UniQuanBuffers, *, gradient_filtering: bool = True) -> jax.Array:
    """Transform -> map (fixed assignment ``qb.patterns``) -> de-transform; float32, shape of W.

    Gradients (docs/method.md, "UniQuan: UniQuanF", gradients): straight-through from the mapped level to ``w~``
    (reaching delta1, delta2, delta3), ``s`` directly, and ``dq/dalpha_i = b_i`` exactly
    (q is linear in alpha). Gradient filtering: where ``|u - q| > min_i |alpha_i|`` both
    the straight-through and the alpha path are cut for that element.
    """
    c = _half_range(qp.alpha.shape[-1])
    w = bcq_fit.to_rows(W.astype(jnp.float32), qb.group_size, qb.axis)  # [R, g]
    w_tilde, u = transform_rows(w, qp, qb)
    q = bcq_fit.level_values(qb.patterns, qp.alpha)  # [R, g]
    if gradient_filtering:
        threshold = jnp.min(jnp.abs(qp.alpha), axis=-1, keepdims=True)
        keep = jax.lax.stop_gradient(jnp.abs(u - q) <= threshold)
        q = jnp.where(keep, q, jax.lax.stop_gradient(q))
        w_tilde = jnp.where(keep, w_tilde, jax.lax.stop_gradient(w_tilde))
    w_int = q + qb.shift[:, None] + c + (w_tilde - jax.lax.stop_gradient(w_tilde))  # value q + z_b + c
    w_hat = (w_int - qb.zero[:, None]) * jnp.exp(qp.delta1)[:, None]
    return bcq_fit.from_rows(w_hat, W.shape, qb.group_size, qb.axis)


@functools.partial(jax.jit, static_argnames=("scale_dtype",))
def fold_to_bcq(W: jax.Array, qp: UniQuanParams, qb: UniQuanBuffers, *, scale_dtype=bcq.SCALE_DTYPE) -> bcq.BCQArray:
    """Unification theorem: the trained quantizer as plain BCQ (delta2, delta3 dropped).

    Codes are the final assignment (full search, ``full_assignment``) under the trained
    parameters; ``alpha* = s alpha``, ``o* = s (z_b + c - z)``, canonicalized to
    ``alpha* >= 0`` descending (``bcq_fit.canonical_rows``, same levels). Dequantizing the
    result equals ``fake_quant(W, qp, full_assignment(W, qp, qb))`` up to float rounding
    (float32 ``scale_dtype``) or float16 rounding of the stored scales (the default).
    """
    c = _half_range(qp.alpha.shape[-1])
    qb = full_assignment(W, qp, qb)
    s = jnp.exp(qp.delta1)
    alpha, patterns = bcq_fit.canonical_rows(s[:, None] * qp.alpha, qb.patterns)
    offset = s * (qb.shift + c - qb.zero)
    return bcq_fit.pack_rows(patterns, alpha, offset, shape=W.shape, group_size=qb.group_size, axis=qb.axis,
                         scale_dtype=scale_dtype)


# ---------------------------------------------------------------------------
# Block reconstruction
# ---------------------------------------------------------------------------

Path = tuple[Hashable, ...]


def _as_path(path) -> Path:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def tree_get(tree, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree, path: Path, value):
    """A copy of nested dict ``tree`` with ``value`` at ``path`` (copies only along the path)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = tree_set(tree[path[0]], path[1:], value)
    return out


def reconstruct_block(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    block_params,
    linear_paths: Sequence,
    x_fp_in: jax.Array,
    x_q_in: jax.Array,
    y_fp_out: jax.Array,
    *,
    steps: int,
    lr: float,
    seed: int,
    bits: int,
    group_size: int,
    alpha_lr_ratio: float = 0.1,
    period: int = 2,
    batch_size: int = 1,
    mix_prob: float = 0.5,
    rounds: int = 15,
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
    axes: dict | None = None,
    group_sizes: dict | None = None,
    gradient_filtering: bool = True,
    progress: Callable[[int, float], None] | None = None,
    log_every: int = 100,
) -> dict:
    """UniQuanF block-by-block reconstruction (docs/method.md, "UniQuan: UniQuanF", objective), folded to BCQ.

    ``apply_fn(params, x)`` is the block's pure forward; ``linear_paths`` name weights
    ``[Din, Dout]`` inside the nested-dict ``block_params`` (tuples of keys or "a/b/c"),
    quantized along axis 0, or along ``axes[path]`` for other layouts (e.g. an o_proj
    ``[heads, rank, D]`` along its rank axis); ``group_sizes[path]`` overrides ``group_size``
    per weight (weights of one block may need different groups to stay sliceable).
    Calibration: ``x_fp_in`` / ``x_q_in`` [N, ...] the block inputs in the full-precision
    and the already-quantized model, ``y_fp_out`` [N, ...] the full-precision block output.

    Each step draws ``batch_size`` samples, mixes the two inputs element-wise (quantized
    with probability ``mix_prob``), and minimizes the MSE to ``y_fp_out`` through the
    fake-quantized weights; the other parameters stay fixed. Adam with cosine decay to 0:
    ``lr`` for delta1..3, ``lr * alpha_lr_ratio`` for alpha (paper: 5e-3 / 5e-4).
    Assignments: unified init, then local remapping every ``period`` steps, then a final
    full search. ``progress(step, loss)`` is called every ``log_every`` steps.

    Returns ``{path: BCQArray}`` keyed as given in ``linear_paths``.
    """
    paths = [_as_path(p) for p in linear_paths]
    axes = {_as_path(p): a for p, a in (axes or {}).items()}
    group_sizes = {_as_path(p): g for p, g in (group_sizes or {}).items()}
    weights = {p: tree_get(block_params, p) for p in paths}
    qparams, qbuffers = {}, {}
    for p in paths:
        qparams[p], qbuffers[p] = unified_init(weights[p], bits=bits, group_size=group_sizes.get(p, group_size),
                                               axis=axes.get(p, 0),
                                               rounds=rounds, clip_ratios=clip_ratios)

    labels = UniQuanParams("delta", "delta", "delta", "alpha")  # the optax partition of one quantizer
    tx = optax.multi_transform(
        {"delta": optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1))),
         "alpha": optax.adam(optax.cosine_decay_schedule(lr * alpha_lr_ratio, max(steps, 1)))},
        {p: labels for p in paths},
    )
    opt_state = jax.jit(tx.init)(qparams)  # one compilation instead of one per eager op
    n_samples = x_fp_in.shape[0]

    @jax.jit
    def train_step(qparams, opt_state, qbuffers, block_params, data, step, key):
        x_fp, x_q, y_fp = data
        qbuffers = {p: remap(tree_get(block_params, p), qparams[p], qbuffers[p], step, period=period) for p in paths}
        k_idx, k_mix = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, n_samples)
        xf, xq, y = x_fp[idx], x_q[idx], y_fp[idx]
        x_in = jnp.where(jax.random.bernoulli(k_mix, mix_prob, xf.shape), xq, xf)

        def loss_fn(qparams):
            params = block_params
            for p in paths:
                w_hat = fake_quant(tree_get(block_params, p), qparams[p], qbuffers[p],
                                   gradient_filtering=gradient_filtering)
                params = tree_set(params, p, w_hat.astype(tree_get(block_params, p).dtype))
            out = apply_fn(params, x_in)
            return jnp.mean((out.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(qparams)
        updates, opt_state = tx.update(grads, opt_state, qparams)
        return optax.apply_updates(qparams, updates), opt_state, qbuffers, loss

    data = (x_fp_in, x_q_in, y_fp_out)
    step_keys = jax.random.split(jax.random.PRNGKey(seed), max(steps, 1))
    for step in range(steps):
        qparams, opt_state, qbuffers, loss = train_step(qparams, opt_state, qbuffers, block_params, data,
                                                        jnp.int32(step), step_keys[step])
        if progress is not None and (step % log_every == 0 or step == steps - 1):
            progress(step, float(loss))
    folded = {p: fold_to_bcq(weights[p], qparams[p], qbuffers[p]) for p in paths}
    return {orig: folded[p] for orig, p in zip(linear_paths, paths)}
