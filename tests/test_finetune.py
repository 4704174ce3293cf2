"""Masked LoRA fine-tuning (uniql_jax/finetune/): properties that fail when the code is wrong.

Tiny random models keep compilation short; the learning test uses the real stories260K.
(Over 400 lines on purpose: the core, the driver and the resume tests share the
kill-and-resume fixture, whose compiled step the other tests reuse.)
"""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from uniql_jax.compress import masks as mask_lib
from uniql_jax.compress.allocate import allocate
from uniql_jax.compress.prune import abstract_params, prune
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig
from uniql_jax.data import DataError
from uniql_jax.eval import window_nll
from uniql_jax.finetune import lora as ft
from uniql_jax.finetune import train as driver
from uniql_jax.finetune.data import read_finetune_documents

REPO = Path(__file__).resolve().parents[1]


def tiny_llama() -> ModelConfig:
    blocks = []
    for layer in range(2):
        blocks += [AttentionBlock(layer, 4, 0, 8), MLPBlock(layer, 64)]
    return ModelConfig("llama", vocab_size=64, hidden_size=32, blocks=tuple(blocks), num_heads=4, num_kv_heads=2,
                       head_dim=8, rotary_dim=8, intermediate_size=64)


def tiny_bamba() -> ModelConfig:
    """Mamba2 + MLP, then partial-rotary attention (2 pairs + 4 pass channels per head) + MLP."""
    blocks = (Mamba2Block(0, 16, 16), MLPBlock(0, 64), AttentionBlock(1, 2, 4, 8), MLPBlock(1, 64))
    return ModelConfig("bamba", vocab_size=64, hidden_size=32, blocks=blocks, num_heads=4, num_kv_heads=2,
                       head_dim=8, rotary_dim=4, intermediate_size=64, ssm_heads=4, ssm_head_dim=16, ssm_groups=1,
                       ssm_state=16, ssm_chunk_size=16)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random params of `cfg` filled on the host from its abstract shapes (cheaper than
    compiling the NNX initializers): weights N(0, 0.02²), unit norms and skips, Mamba2's A
    = −(1..H) and Δ biases in softplus⁻¹([1e-3, 1e-1]), RoPE pair indices 0..P−1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "pair_index":
            return jnp.broadcast_to(jnp.arange(leaf.shape[-1], dtype=leaf.dtype), leaf.shape)
        if name in ("norm", "gnorm", "final_norm", "D"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "A_log":
            return jnp.log(jnp.arange(1, leaf.shape[0] + 1, dtype=leaf.dtype))
        if name == "dt_bias":
            dt = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), leaf.shape[0]))
            return jnp.asarray(dt + np.log(-np.expm1(-dt)), leaf.dtype)
        scale = 0.5 if name.startswith("conv") else 0.02
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_params(cfg))


@functools.lru_cache(maxsize=None)
def model(name: str):
    """(cfg, random params) of a tiny model."""
    cfg = {"llama": tiny_llama, "bamba": tiny_bamba}[name]()
    return cfg, random_params(cfg)


def uniform_table(cfg, rates):
    return allocate(cfg, None, None, rates, method="uniform")


@functools.partial(jax.jit, static_argnums=1)
def _perturb(lora, seed):
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def random_adapters(cfg, params, lora_cfg, seed=1):
    """Adapters with non-zero B (a trained state), so merging changes every target."""
    return _perturb(ft.init_lora(cfg, params, lora_cfg, seed), seed)


def synthetic_stream(n, vocab=64, seed=0):
    """A learnable stream: a fixed random 'text' of 97 tokens repeated, with 10 % noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, 97)
    stream = np.resize(base, n)
    noise = rng.random(n) < 0.1
    stream[noise] = rng.integers(0, vocab, noise.sum())
    return stream.astype(np.int32)


# ----------------------------------------------------------------------------- adapters and merge
def test_zero_init_adapters_leave_the_model_unchanged_and_cover_every_target():
    cfg, params = model("bamba")
    lora = ft.init_lora(cfg, params, ft.LoraConfig())
    merged = ft.merged_params(cfg, ft.LoraConfig(), params, lora)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)))
    names = [set(a) for a in lora["blocks"]]
    assert names == [{"in_proj", "out_proj"}, {"gate", "up", "down"}, {"q", "k", "v", "o"}, {"gate", "up", "down"}]
    assert set(lora["blocks"][0]["in_proj"]["B"]) == {"z", "x", "B", "C", "dt"}
    assert set(lora["blocks"][2]["q"]["B"]) == {"q", "q_pass"}
    assert lora["blocks"][0]["in_proj"]["A"].shape == (32, 8)
    assert lora["blocks"][2]["o"]["A"].shape == (2 * 2 * 8, 8)  # K·G·R input rows of o_proj


def test_merged_update_is_one_rank_r_lora_per_hugging_face_linear():
    """In HF layout every adapted linear changes by a matrix of rank exactly r (one shared A for
    q/q_pass and for the five in_proj parts), and nothing else changes."""
    from converters.mappings import bamba

    cfg, params = model("bamba")
    lora_cfg = ft.LoraConfig(rank=3, alpha=6.0)
    merged = ft.merged_params(cfg, lora_cfg, params, random_adapters(cfg, params, lora_cfg))
    hf_view = lambda p: {k: np.asarray(v, np.float64)  # noqa: E731
                         for k, v in bamba.params_to_hf(cfg, jax.tree.map(np.asarray, p)).items()}
    before, after = hf_view(params), hf_view(merged)
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj")
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if any(f".{n}." in k for n in linears)}
    assert len(changed) == 2 + 3 + 4 + 3
    for k in changed:
        delta = after[k] - before[k]
        assert np.linalg.matrix_rank(delta, tol=1e-6 * np.abs(delta).max()) == 3, k


def test_dropout_drops_adapter_input_features_with_the_right_rate():
    cfg, params = model("llama")
    lora_cfg = ft.LoraConfig(dropout=0.25)
    lora = random_adapters(cfg, params, lora_cfg)
    merge = jax.jit(ft.merge, static_argnums=2)
    plain = merge(params, lora, lora_cfg)
    dropped = merge(params, lora, lora_cfg, jax.random.PRNGKey(0))
    # up_proj: W' − W = s·diag(keep/(1−p))·A·B, so each input row is scaled by 0 or 1/(1−p)
    d_plain = np.asarray(plain["blocks"][1]["up"] - params["blocks"][1]["up"])
    d_drop = np.asarray(dropped["blocks"][1]["up"] - params["blocks"][1]["up"])
    ratio = np.linalg.norm(d_drop, axis=1) / np.linalg.norm(d_plain, axis=1)
    assert np.allclose(ratio[ratio < 0.5], 0.0, atol=1e-5)
    assert np.allclose(ratio[ratio > 0.5], 1 / 0.75, rtol=1e-4)
    assert 0 < np.mean(ratio < 0.5) < 0.6


# ----------------------------------------------------------------------------- masked forward and rates
def test_training_loss_at_each_rate_equals_the_sliced_merged_model():
    """The loss the step differentiates (masked forward of W + AB at a rate's kept sizes) is the
    loss of the deployed model: the merged weights sliced to that rate."""
    cfg, params = model("bamba")
    table = uniform_table(cfg, [0.25, 0.5])
    lora_cfg = ft.LoraConfig()
    lora = random_adapters(cfg, params, lora_cfg)
    merged = ft.merged_params(cfg, lora_cfg, params, lora)
    loss = jax.jit(ft.loss, static_argnums=(2, 3))
    tokens = jnp.asarray(synthetic_stream(2 * 24).reshape(2, 24))
    _, stacked = mask_lib.mask_table(cfg, table)
    losses = []
    for i, rate in enumerate(sorted(table)):
        masked = float(loss(lora, params, cfg, lora_cfg, tokens, mask_lib.select(stacked, i)))
        cfg_p, params_p = prune(cfg, merged, rate, table)
        sliced = float(jnp.sum(window_nll(cfg_p, params_p, tokens)) / (2 * 23))
        assert masked == pytest.approx(sliced, rel=1e-5, abs=1e-6), rate
        losses.append(masked)
    assert abs(losses[0] - losses[1]) > 1e-4  # the rates really differ


@pytest.mark.parametrize("name", ["llama", "bamba"])
def test_remat_loss_merges_inside_the_scan_and_equals_the_merged_forward(name):
    """With remat, each block's adapters are merged inside its recomputed (scanned) body: the
    loss and its gradient w.r.t. the adapters equal those of the merged model, with dropout on
    (the same adapter rows dropped: the key folds the block's index, traced or not) and masks."""
    cfg, params = model(name)
    table = uniform_table(cfg, [0.25])
    lora_cfg = ft.LoraConfig(dropout=0.3)
    lora = random_adapters(cfg, params, lora_cfg)
    tokens = jnp.asarray(synthetic_stream(2 * 24).reshape(2, 24))
    masks = mask_lib.masks_for_rate(cfg, 0.25, table)
    key = jax.random.PRNGKey(7)
    grad = jax.jit(jax.value_and_grad(ft.loss), static_argnums=(2, 3, 7))
    v0, g0 = grad(lora, params, cfg, lora_cfg, tokens, masks, key, False)
    v1, g1 = grad(lora, params, cfg, lora_cfg, tokens, masks, key, True)
    assert float(v1) == pytest.approx(float(v0), rel=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-12, err_msg=str(path))
    v_nodrop, _ = grad(lora, params, cfg, lora_cfg, tokens, masks, None, True)
    assert abs(float(v_nodrop) - float(v1)) > 1e-5  # dropout really acts in the scanned path


@pytest.mark.parametrize("name", ["llama", "bamba"])
def test_evaluation_merges_inside_the_scan_and_equals_the_merged_model(name):
    """The fine-tuning evaluation (`adapted_window_nll`: each block's adapters merged in its own
    scanned body, no merged copy of the model) equals the forward of the merged model, at a rate."""
    cfg, params = model(name)
    table = uniform_table(cfg, [0.25])
    lora_cfg = ft.LoraConfig()
    lora = random_adapters(cfg, params, lora_cfg)
    tokens = jnp.asarray(synthetic_stream(3 * 24).reshape(3, 24))
    masks = mask_lib.masks_for_rate(cfg, 0.25, table)
    merged = window_nll(cfg, ft.merged_params(cfg, lora_cfg, params, lora), tokens, masks=masks)
    adapted = ft.adapted_window_nll(cfg, lora_cfg, params, lora, tokens, masks)
    np.testing.assert_allclose(adapted, merged, rtol=1e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(window_nll(cfg, params, tokens, masks=masks))).max() > 1e-3


def _step_temporaries_and_block_bytes(layers: int) -> tuple[int, int]:
    """(XLA's temporary bytes of the compiled training step, bytes of the blocks' weights) of a
    llama of `layers` wide layers trained on 8 tokens: weights far larger than activations."""
    blocks = []
    for layer in range(layers):
        blocks += [AttentionBlock(layer, 8, 0, 16), MLPBlock(layer, 1024)]
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=64, blocks=tuple(blocks), num_heads=4, num_kv_heads=2,
                      head_dim=16, rotary_dim=16, intermediate_size=1024)
    params = random_params(cfg)
    tc, lora_cfg = ft.TrainConfig(steps=2, batch_size=1, seq_len=8), ft.LoraConfig()
    lora = ft.init_lora(cfg, params, lora_cfg)
    state = {"lora": lora, "opt": ft.make_optimizer(tc).init(lora)}
    _, stacked = mask_lib.mask_table(cfg, uniform_table(cfg, [0.0, 0.25]))
    batch = jnp.zeros((1, 1, 8), jnp.int32)
    compiled = ft.train_step.lower(cfg, lora_cfg, tc, state, params, batch, stacked, jnp.int32(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes, sum(x.nbytes for x in jax.tree.leaves(params["blocks"]))


def test_the_training_step_holds_no_copy_of_the_frozen_weights():
    """A scan over the layers needs each repetition's weights; stacking them would copy every
    block's weights into the step's temporaries (425 MB for SmolLM2-135M). The step picks each
    repetition's weights in the loop body instead, so adding layers adds their weights to the
    arguments, not to the temporaries (with a stack: at least the added bytes; the stacked adapters
    and their gradients do grow with depth, but they are small)."""
    temp_8, bytes_8 = _step_temporaries_and_block_bytes(8)
    temp_16, bytes_16 = _step_temporaries_and_block_bytes(16)
    assert temp_16 - temp_8 < 0.5 * (bytes_16 - bytes_8), (temp_8, temp_16, bytes_16 - bytes_8)  # 0.29x; 1.29x stacked


def test_rate_sampling_favours_heavy_pruning_as_specified():
    n, steps = 8, 20000
    idx = np.asarray(jax.vmap(lambda s: ft.sample_rate_index(0, s, n))(jnp.arange(steps)))
    freq = np.bincount(idx, minlength=n) / steps
    expected = np.exp(-0.1 * (n - 1 - np.arange(n)))  # rate index n-1 = heaviest pruning = lowest keep ratio
    expected /= expected.sum()
    assert np.allclose(ft.rate_probs(n), expected)
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / steps))
    assert freq.argmax() == n - 1 and freq.argmin() == 0


# ----------------------------------------------------------------------------- the step
def test_gradient_accumulation_equals_one_large_batch_and_the_step_uses_it():
    cfg, params, table, _, _ = kill_run_inputs()
    _, stacked = mask_lib.mask_table(cfg, table)
    batch = jnp.asarray(synthetic_stream(4 * 16).reshape(4, 16))
    masks = mask_lib.select(stacked, 2)
    grads = jax.jit(ft.accumulated_grads, static_argnums=(0, 1))
    no_dropout = ft.LoraConfig(dropout=0.0)
    lora = random_adapters(cfg, params, no_dropout)
    l1, g1 = grads(cfg, no_dropout, lora, params, batch.reshape(1, 4, 16), masks)
    l2, g2 = grads(cfg, no_dropout, lora, params, batch.reshape(2, 2, 16), masks)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)

    # the step (the configuration of KILL_RUN, so its compilation is shared): it trains the
    # sampled rate, with the accumulated gradient of that step's dropout masks, and moves the adapters
    lora_cfg, tc = KILL_RUN["lora_cfg"], KILL_RUN["tc"]
    assert (tc.batch_size, tc.grad_accum, tc.seq_len) == (2, 2, 16)
    step = next(s for s in range(100) if int(ft.sample_rate_index(tc.seed, s, 3)) == 2)
    lv, gv = grads(cfg, lora_cfg, lora, params, batch.reshape(2, 2, 16), masks, ft.step_keys(tc.seed, step)[1])
    state = {"lora": jax.tree.map(jnp.copy, lora), "opt": ft.make_optimizer(tc).init(lora)}
    state, metrics = ft.train_step(cfg, lora_cfg, tc, state, params, batch.reshape(2, 2, 16), stacked,
                                   jnp.int32(step))
    assert int(metrics["rate_index"]) == 2
    assert float(metrics["loss"]) == pytest.approx(float(lv), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax_norm(gv)), rel=1e-5)
    assert float(lv) != pytest.approx(float(l2), rel=1e-4)  # dropout was on
    # the warm-up starts at lr 0; the next step moves the adapters
    state, _ = ft.train_step(cfg, lora_cfg, tc, state, params, batch.reshape(2, 2, 16), stacked, jnp.int32(step + 1))
    assert not np.array_equal(state["lora"]["blocks"][1]["up"]["B"]["up"], lora["blocks"][1]["up"]["B"]["up"])


def optax_norm(tree):
    return np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
    cfg, params = model("llama")
    lora_cfg = ft.LoraConfig(dropout=0.0)
    lora = random_adapters(cfg, params, lora_cfg)
    masks = mask_lib.masks_for(cfg, uniform_table(cfg, [0.35])[0.35])
    tokens = jnp.asarray(synthetic_stream(4 * 32).reshape(4, 32))
    grad = jax.jit(jax.value_and_grad(ft.loss), static_argnums=(2, 3))
    l32, g32 = grad(lora, params, cfg, lora_cfg, tokens, masks)
    l16, g16 = grad(lora, ft.cast_floats(params, jnp.bfloat16), cfg, lora_cfg, tokens, masks)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))  # adapters and their grads stay float32
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g32, g16))
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.95


# ----------------------------------------------------------------------------- data
def test_alpaca_jsonl_reader(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"text": "Once upon a time there was a cat."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = read_finetune_documents(path)
    assert len(docs) == 3
    assert docs[0].endswith("### Instruction:\nName a color.\n\n### Response:\nBlue.") and "### Input" not in docs[0]
    assert "### Input:\n2 and 3\n\n### Response:\n5" in docs[1] and "further context" in docs[1]
    assert docs[2] == rows[2]["text"]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    assert read_finetune_documents(tmp_path / "list.json") == docs
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    with pytest.raises(DataError, match="line 2"):
        read_finetune_documents(tmp_path / "bad.jsonl")
    (tmp_path / "fields.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(DataError, match="record 0"):
        read_finetune_documents(tmp_path / "fields.jsonl")


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    n, per_step = 10, 4
    seq = np.concatenate([driver.batch_indices(n, s, per_step, seed=5) for s in range(5)])  # 20 samples: 2 epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert np.array_equal(driver.batch_indices(n, 3, per_step, 5), seq[12:16])
    assert not np.array_equal(driver.batch_indices(n, 3, per_step, 6), seq[12:16])


# ----------------------------------------------------------------------------- driver: resume and learning
KILL_RUN = dict(tc=ft.TrainConfig(steps=10, seq_len=16, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=2, seed=3),
                lora_cfg=ft.LoraConfig(dropout=0.05), eval_cfg=driver.EvalConfig(every=3, windows=4), progress=False)


def checkpoints_in(folder) -> driver.ResumeConfig:
    return driver.ResumeConfig(folder, every=2)


def kill_run_inputs():
    cfg, params = model("llama")
    stream = synthetic_stream(3000)
    return cfg, params, uniform_table(cfg, [0.0, 0.25, 0.35]), stream[:2400], stream[2400:]


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.test_finetune import KILL_RUN, checkpoints_in, kill_run_inputs
from uniql_jax.finetune import train as driver

def paced(step, metrics):
    print("step", step, flush=True)
    time.sleep(0.4)

cfg, params, table, train, held = kill_run_inputs()
driver.train_lora(cfg, params, table, train, held, resume=checkpoints_in({ckpt!r}), callback=paced, **KILL_RUN)
print("finished", flush=True)
"""


def test_killed_run_resumes_to_the_same_adapters(tmp_path):
    """SIGKILL a fine-tuning process after its step-4 checkpoint; resuming from the folder
    ends with adapters, best adapters and history bit-identical to an uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), ckpt=str(ckpt)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    deadline, killed_after = time.monotonic() + 240, None
    try:
        for line in child.stdout:
            if line.startswith("finished"):
                break
            if line.startswith("step") and int(line.split()[1]) >= 5:
                killed_after = int(line.split()[1])
                os.kill(child.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                break
    finally:
        if child.poll() is None and killed_after is None:
            child.kill()
        child.wait()
    assert killed_after is not None, f"the child was not killed mid-way: {child.stderr.read()[-2000:]}"
    assert child.returncode == -signal.SIGKILL

    cfg, params, table, train, held = kill_run_inputs()
    resumed = driver.train_lora(cfg, params, table, train, held, resume=checkpoints_in(ckpt), **KILL_RUN)
    start = resumed.history["config"]["resumed_from"]
    assert 4 <= start < KILL_RUN["tc"].steps
    straight = driver.train_lora(cfg, params, table, train, held, **KILL_RUN)

    for name in ("lora", "best_lora"):
        a, b = jax.tree.leaves(getattr(resumed, name)), jax.tree.leaves(getattr(straight, name))
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), name
    assert resumed.history["steps"] == straight.history["steps"]
    assert resumed.history["evals"] == straight.history["evals"]
    assert resumed.history["best_step"] == straight.history["best_step"]
    # not vacuous: training moved the adapters, and the eval loss went down
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves([b["B"] for blk in straight.lora["blocks"]
                                                                         for b in blk.values()]))
    assert straight.history["best_eval_loss"] < straight.history["evals"][0]["eval_loss"]

    with pytest.raises(ValueError, match="different fine-tuning run"):
        driver.train_lora(cfg, params, table, train, held, resume=checkpoints_in(ckpt),
                          **{**KILL_RUN, "tc": dataclasses.replace(KILL_RUN["tc"], lr=2e-2)})
    with pytest.raises(ValueError, match="different fine-tuning run"):  # the same weights, channels permuted
        driver.train_lora(cfg, permute_mlp_channels(params, 1), table, train, held, resume=checkpoints_in(ckpt),
                          **KILL_RUN)


def permute_mlp_channels(params, block: int, seed: int = 0) -> dict:
    """`params` with the intermediate channels of MLP block `block` permuted (gate/up columns, down
    rows): the same function, the same multiset of weights per array."""
    perm = np.random.default_rng(seed).permutation(params["blocks"][block]["up"].shape[1])
    mlp = dict(params["blocks"][block])
    mlp.update(gate=mlp["gate"][:, perm], up=mlp["up"][:, perm], down=mlp["down"][perm, :])
    blocks = list(params["blocks"])
    blocks[block] = mlp
    return {**params, "blocks": blocks}


def test_resume_fingerprint_sees_a_permutation_of_channels():
    """The fingerprint hashes the bytes of the weights: identical params (other buffers) match, a
    permutation of channels does not, though it keeps every per-array sum (the old fingerprint)."""
    cfg, params, table, train, held = kill_run_inputs()
    tc, lora_cfg = KILL_RUN["tc"], KILL_RUN["lora_cfg"]
    train_w, eval_w = train[:160].reshape(-1, 16), held[:64].reshape(-1, 16)
    rates = sorted(table)

    def fingerprint(p):
        return driver.fingerprint(cfg, p, lora_cfg, tc, train_w, eval_w, rates, eval_every=3, dense_tolerance=0.01)

    permuted = permute_mlp_channels(params, 1)
    assert not np.array_equal(permuted["blocks"][1]["up"], params["blocks"][1]["up"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(permuted)):
        assert np.array_equal(np.sort(np.ravel(a)), np.sort(np.ravel(b)))  # a sum cannot tell them apart
    copy = jax.tree.map(lambda x: jnp.array(np.asarray(x)), params)
    assert fingerprint(copy) == fingerprint(params)
    assert fingerprint(permuted)["weights"] != fingerprint(params)["weights"]
    assert driver.weights_digest(permute_mlp_channels(params, 1, seed=1)) != driver.weights_digest(permuted)


@pytest.mark.slow
def test_finetuning_stories260k_lowers_held_out_perplexity_when_pruned(shared_data):
    """The real stories260K (uniform allocation over its unsorted channels): masked LoRA lowers the
    held-out perplexity of the sliced model at 35 % and keeps 0 % within 1 % (the dense guard)."""
    from converters import llama2c
    from uniql_jax import data
    from uniql_jax.eval import perplexity

    folder = shared_data / "stories260K"
    cfg, params = llama2c.load(folder / "stories260K.bin")
    tok = llama2c.load_tokenizer(folder / "tok512.bin")
    docs = data.load_documents(shared_data / "tinystories" / "tinystories_valid_900.txt")
    train, dev = data.token_stream(docs[:48], tok), data.token_stream(docs[48:60], tok)
    held = data.token_stream(docs[-12:], tok)
    table = uniform_table(cfg, [0.0, 0.35])
    merged, history = driver.finetune(cfg, params, table, train, dev, ft.TrainConfig(steps=40, seq_len=64, lr=3e-3),
                                      eval_cfg=driver.EvalConfig(every=5, windows=16), progress=False)
    assert history["best_step"] > 0
    assert any(not e.get("dense_ok", True) for e in history["evals"])  # the guard had something to reject
    ppl = {r: [perplexity(*prune(cfg, p, r, table), held, seq_len=64, progress=False) for p in (params, merged)] for r in (0.0, 0.35)}
    assert ppl[0.35][1] < 0.9 * ppl[0.35][0], ppl
    assert ppl[0.0][1] <= 1.01 * ppl[0.0][0], ppl


# ----------------------------------------------------------------------------- the CLI stage


@pytest.mark.slow
def test_compress_finetune_steps_merges_low_rank_updates_into_the_saved_checkpoint(tmp_path, shared_data):
    """`experiments.compress --finetune-steps N --finetune-data FILE`: the grid before fine-tuning is
    the grid of the same run without it, and the saved weights differ from that run's by merged
    LoRA updates (rank <= r on every adapted linear, untouched elsewhere)."""
    from experiments import compress
    from uniql_jax import data

    docs = data.load_documents(shared_data / "tinystories" / "tinystories_valid_900.txt")
    (tmp_path / "calib.txt").write_text("\n\n".join(docs[:40]))
    (tmp_path / "eval.txt").write_text("\n\n".join(docs[-6:]))
    # four stories repeated: the held-out tail of the file (its last 10 %) is text the adapters train
    # on, so a few steps surely lower its loss and the best adapters are not the initial (zero) ones
    (tmp_path / "ft.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[40:44] * 10))
    common = ["--arch", "llama", "--quantizer", "none", "--rates", "0,0.25", "--seq-len", "32", "--calib-samples", "4",
              "--calib", str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "eval.txt")]
    plain = compress.run(common + ["--out", str(tmp_path / "plain")])
    tuned = compress.run(common + ["--out", str(tmp_path / "tuned"), "--finetune-steps", "6",
                                   "--finetune-data", str(tmp_path / "ft.jsonl"), "--finetune-lr", "5e-3"])
    plain_report, tuned_report = (json.loads((d / "report.json").read_text()) for d in (plain, tuned))
    assert tuned_report["rates_before_finetune"] == plain_report["rates"]
    assert tuned_report["finetune"]["source"] == str(tmp_path / "ft.jsonl")
    assert tuned_report["finetune"]["best_step"] > 0, tuned_report["finetune"]["evals"]
    assert [r["ppl"] for r in tuned_report["rates"]] != [r["ppl"] for r in plain_report["rates"]]

    _, before = uq.load(plain / "checkpoint")
    _, after = uq.load(tuned / "checkpoint")
    changed = 0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)):
        delta = np.asarray(b, np.float64) - np.asarray(a, np.float64)
        if not delta.any():
            continue
        changed += 1
        name = jax.tree_util.keystr(path)
        assert a.ndim >= 2, f"{name}: a non-matrix parameter changed"
        # a merged update W + B A has rank <= r (8) over (input axes) x (output axes) for one split of
        # the axes; the float32 rounding of W + B A leaves singular values far below the update's
        for split in range(1, delta.ndim):
            sv = np.linalg.svd(delta.reshape(int(np.prod(delta.shape[:split])), -1), compute_uv=False)
            if len(sv) > 8 and sv[8] <= 1e-3 * sv[0]:
                break
        else:
            raise AssertionError(f"{name}: the update is not low-rank under any input/output split")
    assert changed >= 7 * 4, changed  # q, k, v, o, gate, up, down in each of the 4 layers
