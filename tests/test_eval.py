"""uq.perplexity: window slicing, a float64 reference, 1-device == 4-device, the unigram baseline."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from tests.conftest import REPO
from uniql_jax import eval as ev
from uniql_jax.config import AttentionBlock, MLPBlock

SEQ, BATCH = 16, 2
CFG = uq.ModelConfig(arch="llama", vocab_size=61, hidden_size=32,
                     blocks=(AttentionBlock(0, 8, 0, 16), MLPBlock(0, 64)),
                     num_heads=2, num_kv_heads=2, head_dim=16, rotary_dim=16, intermediate_size=64)
N_TOKENS = 13 * SEQ + 5  # 13 windows (not a multiple of any step size below) and a 5-token tail


def _params():
    # larger than init scale so that logits are far from uniform and errors would show
    return jax.tree.map(lambda x: x * 8 if x.dtype == jnp.float32 and x.ndim > 1 else x, uq.init_params(CFG, 3))


def _tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, N_TOKENS).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    return _params()


def test_windows_are_the_stream_cut_without_padding():
    stream = np.arange(100, 203)
    wins = ev.windows(stream, 10)
    assert wins.shape == (10, 10) and wins.dtype == np.int32
    np.testing.assert_array_equal(wins.ravel(), stream[:100])  # contiguous, in order, tail of 3 dropped
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.windows(stream[:9], 10)
    with pytest.raises(ValueError, match="1-D"):
        ev.windows(wins, 10)


def test_perplexity_equals_a_float64_reference(params):
    tokens = _tokens()
    wins = tokens[: 13 * SEQ].reshape(13, SEQ)
    logits = np.asarray(uq.forward(CFG, params, jnp.asarray(wins)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, wins[:, 1:, None], -1)
    want = math.exp(nll.mean())
    got = uq.perplexity(CFG, params, tokens, seq_len=SEQ, batch_size=BATCH)
    assert got == pytest.approx(want, rel=2e-6)
    assert 1.5 < got < CFG.vocab_size * 10  # not a degenerate model: the test has teeth


def test_the_tail_shorter_than_a_window_is_ignored(params):
    tokens = _tokens()
    full = uq.perplexity(CFG, params, tokens, seq_len=SEQ, batch_size=BATCH)
    assert uq.perplexity(CFG, params, tokens[: 13 * SEQ], seq_len=SEQ, batch_size=BATCH) == full
    changed = tokens.copy()
    changed[-5:] = (changed[-5:] + 1) % CFG.vocab_size
    assert uq.perplexity(CFG, params, changed, seq_len=SEQ, batch_size=BATCH) == full
    changed[3] = (changed[3] + 1) % CFG.vocab_size  # a token inside a window does count
    assert uq.perplexity(CFG, params, changed, seq_len=SEQ, batch_size=BATCH) != full


def test_progress_bar_on_request(params, capsys):
    uq.perplexity(CFG, params, _tokens(), seq_len=SEQ, batch_size=BATCH, progress=True)
    assert "perplexity (13 windows of 16)" in capsys.readouterr().err


FOUR_DEVICES = """
    import jax, numpy as np
    from tests import test_eval as t
    from uniql_jax import eval as ev
    assert jax.device_count() == 4, jax.devices()
    p, tok = t._params(), t._tokens()
    sums = ev.window_nll_sums(t.CFG, p, tok, seq_len=t.SEQ, batch_size=t.BATCH)  # default mesh: all 4 devices
    print("SUMS", " ".join(float(x).hex() for x in sums))
    print("PPL", ev.perplexity(t.CFG, p, tok, seq_len=t.SEQ, batch_size=t.BATCH).hex())
"""


def test_one_and_four_devices_give_the_identical_perplexity(params):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FOUR_DEVICES)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("SUMS", "PPL")))
    one = ev.data_mesh(jax.devices()[:1])
    sums = ev.window_nll_sums(CFG, params, _tokens(), seq_len=SEQ, batch_size=BATCH, mesh=one)
    assert lines["SUMS"].split() == [float(x).hex() for x in sums]  # every window bit-identical
    assert lines["PPL"] == uq.perplexity(CFG, params, _tokens(), seq_len=SEQ, batch_size=BATCH, mesh=one).hex()


def test_unigram_perplexity_is_the_entropy_of_the_scored_tokens():
    tokens = np.tile([0, 1], 40)  # windows [0 1 0 1]: scored tokens 1, 0, 1
    want = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert ev.unigram_perplexity(tokens, seq_len=4) == pytest.approx(want, rel=1e-12)
    uniform = np.random.default_rng(0).integers(0, 50, 200_000)
    assert 49.0 < ev.unigram_perplexity(uniform, seq_len=100) <= 50.0


@pytest.mark.parametrize("tied", [True, False])
def test_window_nll_chunked_head_and_remat_equal_the_whole_logits_reference(params, tied):
    """window_nll runs the head over HEAD_CHUNK positions (the last chunk padded) and, with
    remat, recomputes block activations in the backward pass: value and gradient must equal
    the plain computation over the whole logits of uq.forward."""
    import dataclasses

    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    p = dict(params)
    if not tied:
        p["lm_head"] = jnp.asarray(np.random.default_rng(1).normal(0, 0.3, (CFG.hidden_size, CFG.vocab_size)),
                                   jnp.float32)
    else:
        p.pop("lm_head", None)
    T = ev.HEAD_CHUNK + 73  # 200 positions: two head chunks, the second padded
    batch = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, T)), jnp.int32)

    def reference(q):
        logits = uq.forward(cfg, q, batch)[:, :-1]
        picked = jnp.take_along_axis(logits, batch[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked, axis=-1)

    want = reference(p)
    for remat in (False, True):
        got = ev.window_nll(cfg, p, batch, remat=remat)
        np.testing.assert_allclose(got, want, rtol=2e-6)
    g_ref = jax.grad(lambda q: jnp.sum(reference(q)), allow_int=True)(p)  # int leaves (RoPE pair indices): float0
    for remat in (False, True):
        g = jax.grad(lambda q: jnp.sum(ev.window_nll(cfg, q, batch, remat=remat)), allow_int=True)(p)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
            if a.dtype != jax.dtypes.float0:
                np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * float(np.abs(b).max()),
                                           err_msg=f"remat={remat} {path}")


def test_repeated_runs_cover_the_blocks_in_order():
    runs = ev.repeated_runs(list("ababab"))
    assert runs == [(0, 2, 3)]
    # nemotron_h-like: locally periodic pieces, then the blocks that repeat nothing, alone
    keys = list("MaMaMbMaMaMaMb")
    runs = ev.repeated_runs(keys)
    covered = [i for start, period, reps in runs for i in range(start, start + period * reps)]
    assert covered == list(range(len(keys)))
    for start, period, reps in runs:
        for r in range(reps):
            assert keys[start + r * period:start + (r + 1) * period] == keys[start:start + period]
    assert max(period * reps for _, period, reps in runs) >= 6  # "MaMaMa" found


@pytest.mark.parametrize("arch", ["llama", "nemotron_h"])
def test_rematerialized_blocks_equal_the_plain_forward_with_masks(arch):
    """Runs of identical blocks are scanned under jax.checkpoint (llama: one run of 4 layers;
    nemotron_h: runs and lone blocks): value and gradient equal the unrolled forward, with the
    masks of a pruning rate (so every block's mask travels with its own block)."""
    from tests.helpers import random_params
    from uniql_jax.compress import masks as mask_lib
    from uniql_jax.compress.allocate import allocate, default_steps
    from uniql_jax.tiny import tiny_config

    cfg = tiny_config(arch, 97, 32)
    keys = [ev.block_key(cfg, b) for b in cfg.blocks]
    assert any(reps > 1 for _, _, reps in ev.repeated_runs(keys))
    params = random_params(cfg, 0)
    table = allocate(cfg, None, None, [0.0, 0.25], method="uniform", steps=default_steps(cfg))
    masks = mask_lib.masks_for_rate(cfg, 0.25, table)
    batch = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 32)), jnp.int32)

    def total(q, remat):
        return jnp.sum(ev.window_nll(cfg, q, batch, masks=masks, remat=remat))

    np.testing.assert_allclose(total(params, True), total(params, False), rtol=1e-6)
    g_plain = jax.grad(lambda q: total(q, False), allow_int=True)(params)
    g_remat = jax.grad(lambda q: total(q, True), allow_int=True)(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_remat), jax.tree.leaves(g_plain)):
        if a.dtype != jax.dtypes.float0:
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-12,
                                       err_msg=str(path))


def test_remat_actually_frees_the_activations_on_this_backend():
    """The compiled gradient with remat needs far less temporary memory than without: the
    scan keeps only the residual stream between layers (XLA:CPU undoes an unrolled chain of
    jax.checkpoint, so this fails if the blocks are not scanned)."""
    from tests.helpers import random_params
    from uniql_jax.tiny import tiny_config

    cfg = tiny_config("llama", 97, 256)
    params = random_params(cfg, 0)
    batch = jnp.zeros((8, 256), jnp.int32)
    temp = {}
    for remat in (False, True):
        grad = jax.jit(jax.grad(lambda q, remat=remat: jnp.sum(ev.window_nll(cfg, q, batch, remat=remat)),
                                allow_int=True))
        temp[remat] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.5 * temp[False], temp


@pytest.mark.parametrize("arch,quantized", [("llama", True), ("nemotron_h", False)])
def test_a_rate_from_the_full_params_equals_the_sliced_model(arch, quantized):
    """evaluate_rates hands the unpruned params to the evaluation with the rate's config, and each
    block program slices its own block: the perplexity equals the one of the sliced copy
    (`prune`), float or packed, and the reported bytes are the sliced model's."""
    from tests.helpers import random_params
    from uniql_jax.compress.allocate import evaluate_rates
    from uniql_jax.compress.prune import prune
    from uniql_jax.pipeline import uniform_table
    from uniql_jax.quant.formats import packed
    from uniql_jax.quant.quantize import rtn_quantize_model
    from uniql_jax.tiny import tiny_config

    cfg = tiny_config(arch, 97, 32)
    params = random_params(cfg, 0)
    table = uniform_table(cfg, [0.0, 0.25], group_size=16)
    if quantized:
        params = rtn_quantize_model(cfg, params, table, bits=4, group_size=16)[0]
        assert any(packed.is_packed(x) for x in jax.tree.leaves(params, is_leaf=packed.is_packed))
    tokens = np.random.default_rng(5).integers(0, 97, 4 * 32)
    rows = evaluate_rates(cfg, params, table, tokens, seq_len=32, batch_size=2)
    for row in rows:
        cfg_p, params_p = prune(cfg, params, row["rate"], table)
        assert cfg_p.blocks != cfg.blocks or row["rate"] == 0.0
        ppl = ev.perplexity(cfg_p, params_p, tokens, seq_len=32, batch_size=2)
        assert row["ppl"] == pytest.approx(ppl, rel=1e-6)
        assert row["param_bytes"] == packed.deployed_bytes(params_p)
