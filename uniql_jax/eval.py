"""Perplexity over non-overlapping windows, jitted and data-parallel over all local devices.

ppl = exp(sum of next-token NLLs / number of predictions), where each window of
T tokens contributes the T - 1 predictions of its tokens 2..T (docs/method.md, "Evaluation").

Device independence: every device runs the same program on the same per-device
batch shape [b, T] (b = `batch_size`, windows per device per step), each window's
NLL is summed on device in float32, and the per-window sums are added on the host
in float64 in window order. A window's sum therefore never depends on how many
devices there are, and neither does the perplexity (bit-identical on 1 and 4
devices; tests/test_eval.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uniql_jax import distributed
from uniql_jax.config import ModelConfig
from uniql_jax.models.layers import rms_norm
from uniql_jax.models.stacks import bind, bind_block, block_key, block_shapes, embed_lookup, head_logits
from uniql_jax.quant.formats.packed import slice_to_shapes


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over the given devices; default: the mesh `distributed.use_mesh` set,
    else every device of every process (for one process: all local devices)."""
    if devices is None:
        return distributed.default_mesh()
    return Mesh(np.asarray(devices), ("data",))


def windows(tokens, seq_len: int) -> np.ndarray:
    """Non-overlapping windows int32 [N, seq_len] of a 1-D stream; the tail shorter than seq_len is dropped."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one prediction per window), got {seq_len}")
    n = len(tokens) // seq_len
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of seq_len={seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl", "remat"))
def window_nll(cfg: ModelConfig, params, batch, *, impl="xla", masks=None, remat: bool = False):
    """Summed next-token NLL (float32) of each window int32 [B, T] -> [B]: predictions of tokens 2..T.

    One program for the whole model, differentiable: fine-tuning's loss. The head runs
    over `HEAD_CHUNK` positions at a time (`head_nll_sums`), so the float32 logits of a
    large vocabulary never exist for the whole batch. `remat=True` recomputes each
    block's activations in the backward pass instead of keeping them
    (`rematerialized_blocks`): a gradient then holds the residual stream between
    blocks and one block's activations, not the whole model's.
    Perplexity runs block by block instead (`BlockwiseNLL`)."""
    return window_nll_core(cfg, params, batch, impl=impl, masks=masks, remat=remat)


def window_nll_core(cfg: ModelConfig, params, batch, *, impl="xla", masks=None, remat: bool = False,
                    adapt=None, adapters=None):
    """`window_nll`, not jitted; with remat, `adapt(index, block_params, adapters[index]) -> block_params`
    (e.g. merging LoRA adapters) runs inside each block's recomputed body (`rematerialized_blocks`)."""
    if not remat:
        if adapt is not None:
            raise ValueError("adapt needs remat=True (merge the adapters into params instead)")
        h, _ = bind(cfg, params).hidden(batch, _positions(batch), None, masks, impl)
        return head_nll_sums(cfg, params["embed"], params.get("lm_head"), h[:, :-1], batch[:, 1:], impl)
    x = embed_lookup(params["embed"], batch, params["final_norm"].dtype)  # the compute dtype (norms stay float)
    x = rematerialized_blocks(cfg, params["blocks"], x, masks, impl, adapt=adapt, adapters=adapters)
    h = rms_norm(x[:, :-1], params["final_norm"], cfg.rms_norm_eps)  # [B, T-1, D]
    return head_nll_sums(cfg, params["embed"], params.get("lm_head"), h, batch[:, 1:], impl)


def repeated_runs(keys: list, max_period: int = 8) -> list[tuple[int, int, int]]:
    """Cover a sequence with runs (start, period, repeats): keys[start : start + period·repeats]
    is keys[start : start + period] repeated. Greedy from the left, each run the longest
    coverage with the shortest period; a block that starts no repetition is a run of one.

    Llama's [attention, MLP] × 30 is one run (0, 2, 30); Nemotron-H's irregular pattern
    becomes its locally periodic pieces."""
    runs, i, n = [], 0, len(keys)
    while i < n:
        best = (1, 1)  # (period, repeats)
        for period in range(1, min(max_period, (n - i) // 2) + 1):
            reps = 1
            while i + (reps + 1) * period <= n and keys[i + reps * period:i + (reps + 1) * period] == keys[i:i + period]:
                reps += 1
            if reps > 1 and period * reps > best[0] * best[1]:
                best = (period, reps)
        runs.append((i, *best))
        i += best[0] * best[1]
    return runs


def rematerialized_blocks(cfg: ModelConfig, blocks: list, x_BxTxD, masks, impl, *, adapt=None, adapters=None):
    """The residual stream through every block, each block's activations recomputed in the backward pass.

    Runs of identical blocks (`repeated_runs` over `block_key`) go through a `lax.scan`
    whose body is under `jax.checkpoint`; only the stream between repetitions is kept
    for the backward pass. An unrolled chain of `jax.checkpoint` blocks does not work
    on XLA:CPU: it drops the optimization barriers and CSEs the recomputation back into
    the forward pass, so every block's activations stay live (measured: 1.73 GB of
    temporaries for 8 SmolLM2 blocks of 8 x 512 tokens, against 1.80 GB without
    remat); a loop body cannot be merged with the forward pass. A block that repeats
    nothing runs alone under `jax.checkpoint` (which XLA:CPU may undo). The body picks its
    repetition's weights itself (`lax.switch`): stacking them for the scan would copy every
    block's weights into the program's temporaries.

    `adapt(index, block_params, adapters[index])`, when given, transforms a block's
    params inside the body (`index` traced in a scan), e.g. merges LoRA adapters.
    """
    x = x_BxTxD
    keys = [block_key(cfg, blk) for blk in cfg.blocks]
    for start, period, reps in repeated_runs(keys):
        unit = [_block_residual(cfg, cfg.blocks[start + j], impl) for j in range(period)]

        def pick(tree, r, start=start, period=period):
            """Repetition r's entries of a per-block list (None stays None)."""
            return None if tree is None else tree[start + r * period:start + (r + 1) * period]

        def body(x, unit_inputs, unit=unit, start=start, period=period, reps=reps, pick=pick):
            r, unit_adapters, unit_masks = unit_inputs
            # the weights of repetition r, chosen in the body instead of stacked beforehand: a stack
            # would copy every block's weights into the step's temporaries
            unit_params = pick(blocks, 0) if reps == 1 else jax.lax.switch(
                r, [lambda k=k: pick(blocks, k) for k in range(reps)])
            for j, run in enumerate(unit):
                bp = unit_params[j]
                if adapt is not None:
                    bp = adapt(start + r * period + j, bp, unit_adapters[j])
                x = run(bp, x, None if unit_masks is None else unit_masks[j])
            return x, None

        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        if reps == 1:
            x, _ = body(x, (0, pick(adapters, 0), pick(masks, 0)))
        else:  # the adapters and masks are small: stacked and scanned over
            stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                   *[(pick(adapters, r), pick(masks, r)) for r in range(reps)])
            x, _ = jax.lax.scan(body, x, (jnp.arange(reps), *stacked))
    return x


def _positions(batch_BxT):
    B, T = batch_BxT.shape[:2]
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _block_residual(cfg: ModelConfig, blk, impl):
    """x -> x + block(x) for one block, as a pure function of its params (shared by every path here).

    The params may be those of a larger block of the same sorted model (the unpruned one): they
    are sliced to `blk`'s sizes inside the program, so evaluating a rate never materializes a
    sliced copy of the model (jit keys the program on the shapes it is given)."""
    geometry, small = block_key(cfg, blk)
    shapes = block_shapes(cfg, blk)

    def run(block_params, x_BxTxD, mask):
        block_params = slice_to_shapes(shapes, block_params)
        update, _ = bind_block(geometry, small, block_params)(x_BxTxD, _positions(x_BxTxD), None, mask, impl)
        return x_BxTxD + update

    return run


HEAD_CHUNK = 128  # positions per head matmul (bounds the float32 logits held at once)


def head_nll_sums(cfg: ModelConfig, table, lm_head, h_BxTxD, target_BxT, impl="xla", chunk: int = HEAD_CHUNK):
    """Summed NLL (float32) [B] of targets under the head applied to final hidden states h.

    h [B, T, D] (already normalized) predicts target [B, T]. The head runs over `chunk`
    positions at a time, each chunk under `jax.checkpoint`: forward and backward hold
    the float32 logits [B, chunk, V] of one chunk, never [B, T, V] (3.2 GB for 8 windows
    of 512 over a 49 k vocabulary).
    """
    B, n, D = h_BxTxD.shape
    chunk = min(n, chunk)
    pad = (-n) % chunk
    h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, chunk, D).swapaxes(0, 1)  # [n/C, B, C, D]
    target = jnp.pad(target_BxT, ((0, 0), (0, pad))).reshape(B, -1, chunk).swapaxes(0, 1)  # [n/C, B, C]

    @jax.checkpoint
    def chunk_nll(args):
        h_BxCxD, t_BxC = args
        logits = head_logits(cfg, table, lm_head, h_BxCxD, impl).astype(jnp.float32)  # [B, C, V]
        picked = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked  # [B, C]

    nll = jax.lax.map(chunk_nll, (h, target)).swapaxes(0, 1).reshape(B, -1)[:, :n]  # [B, T]
    return jnp.sum(nll, axis=-1)


class BlockwiseNLL:
    """`window_nll` as a chain of small programs: embedding, each block, then norm + head + NLL.

    A whole-model program is compiled per model shape, and every pruning rate is a
    new shape: a 30-layer model over a grid of 8 rates compiled 8 deep programs.
    Here a block's program depends only on its own sizes (``stacks.block_key``), so
    it serves every layer, rate and model with those sizes; a rate grid compiles
    one program per distinct block shape, plus the embedding and the head. The
    residual stream stays on the device between programs; the head runs over
    `HEAD_CHUNK` positions at a time, so the logits of a large vocabulary never exist
    for a whole batch of windows. ``programs`` counts the
    compiled programs (``compiles()``).
    """

    def __init__(self):
        self._blocks: dict = {}
        self._ends: dict = {}

    def _block(self, cfg, blk, impl):
        key = block_key(cfg, blk) + (impl,)
        if key not in self._blocks:
            self._blocks[key] = jax.jit(_block_residual(cfg, blk, impl))
        return self._blocks[key]

    def _end(self, cfg, impl):
        key = (cfg.with_blocks(()), impl)
        if key not in self._ends:
            geometry = key[0]

            def embed(table, final_norm, batch_BxT):
                return embed_lookup(table, batch_BxT, final_norm.dtype)  # the compute dtype (norms stay float)

            def head_nll(table, lm_head, final_norm, x_BxTxD, batch_BxT):
                h = rms_norm(x_BxTxD[:, :-1], final_norm, geometry.rms_norm_eps)  # [B, T-1, D]
                return head_nll_sums(geometry, table, lm_head, h, batch_BxT[:, 1:], impl)

            self._ends[key] = (jax.jit(embed), jax.jit(head_nll))
        return self._ends[key]

    def __call__(self, cfg: ModelConfig, params, batch_BxT, *, impl="xla", masks=None):
        embed, head_nll = self._end(cfg, impl)
        x = embed(params["embed"], params["final_norm"], batch_BxT)
        for i, blk in enumerate(cfg.blocks):
            x = self._block(cfg, blk, impl)(params["blocks"][i], x, None if masks is None else masks[i])
        return head_nll(params["embed"], params.get("lm_head"), params["final_norm"], x, batch_BxT)

    def compiles(self) -> int:
        """Programs compiled so far (each jitted function's cache entries)."""
        fns = list(self._blocks.values()) + [f for pair in self._ends.values() for f in pair]
        return sum(f._cache_size() for f in fns)


blockwise_nll = BlockwiseNLL()  # one process-wide cache of block programs


def window_nll_sums(cfg: ModelConfig, params, tokens, *, seq_len: int, batch_size: int = 4, impl: str = "xla",
                    masks=None, mesh: Mesh | None = None, progress: bool | None = None) -> np.ndarray:
    """float32 [N]: summed NLL of each non-overlapping window of `seq_len` (see module docstring).

    `batch_size` is the number of windows each device evaluates per step; the
    last step is filled with copies of window 0 whose results are discarded.
    """
    wins = windows(tokens, seq_len)
    mesh = mesh or data_mesh()
    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis, has {mesh.axis_names}")
    per_step = int(batch_size) * mesh.shape["data"]
    n = len(wins)
    fill = (-n) % per_step
    padded = np.concatenate([wins, np.repeat(wins[:1], fill, axis=0)]) if fill else wins
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    params = distributed.put_params(params, mesh)  # replicated over "data", weights sharded over "model" if any
    steps = range(0, len(padded), per_step)
    if progress is None:
        progress = len(steps) > 20
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"perplexity ({n} windows of {seq_len})", unit="step", leave=False)
    sums = []
    for s in steps:
        batch = distributed.put(padded[s:s + per_step], batch_sharding)
        sums.append(blockwise_nll(cfg, params, batch, impl=impl, masks=masks))  # async: host waits only at the end
    return np.concatenate([distributed.to_host(x) for x in sums])[:n]  # across processes: an all-gather


def perplexity(cfg: ModelConfig, params, tokens, *, seq_len: int, batch_size: int = 4, impl: str = "xla",
               masks=None, mesh: Mesh | None = None, progress: bool | None = None) -> float:
    """exp(mean NLL of tokens 2..T over non-overlapping windows of `seq_len`) (docs/method.md, "Evaluation").

    tokens: a 1-D int stream; the tail shorter than `seq_len` is dropped. `params` may be those
    of the unpruned sorted model when `cfg` is a rate's config: each block is sliced inside its
    program (``_block_residual``). Windows
    are split over the "data" axis of `mesh` (default: all local devices),
    `batch_size` windows per device per step; a progress bar shows on long runs.
    """
    sums = window_nll_sums(cfg, params, tokens, seq_len=seq_len, batch_size=batch_size, impl=impl, masks=masks,
                           mesh=mesh, progress=progress)
    return float(math.exp(sums.astype(np.float64).sum() / (len(sums) * (seq_len - 1))))


def unigram_perplexity(tokens, *, seq_len: int) -> float:
    """Perplexity of the best context-free model of the same predictions perplexity() scores.

    The unigram distribution is fitted on the very tokens being scored (tokens
    2..T of each window), so this is exp(entropy) of their empirical
    distribution: a lower bound for any unigram model, the baseline a model
    that learned anything beyond token frequencies must beat.
    """
    targets = windows(tokens, seq_len)[:, 1:].ravel()
    counts = np.bincount(targets).astype(np.float64)
    p = counts[counts > 0] / len(targets)
    return float(math.exp(-(p * np.log(p)).sum()))
