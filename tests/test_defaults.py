"""The embedded default models (experiments/defaults/<arch>) and the trainer that made them.

Each default must load through converters.hf and through transformers, give the
same held-out perplexity both ways (4 digits), beat the unigram perplexity of the
same tokens by far, and leave every prunable axis room to prune.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from converters import hf
from tests.conftest import SHARED_DATA
from uniql_jax import data, tiny
from uniql_jax.eval import unigram_perplexity
from uniql_jax.paths import DEFAULTS

TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_valid_900.txt"
BLOCK_KINDS = {"llama": {"attention", "mlp"}, "qwen2": {"attention", "mlp"}, "mamba2": {"mamba2"},
               "nemotron_h": {"mamba2", "attention", "mlp"}, "bamba": {"mamba2", "attention", "mlp"}}
SLICE_SEQ, SLICE_WINDOWS = 128, 8
# the defaults shipped so far (issue 4 tracks the remaining archs); each shipped one is checked fully
SHIPPED = sorted(a for a in BLOCK_KINDS if (DEFAULTS / a / "config.json").is_file())


def default_folder(arch):
    try:
        hf.mapping_for(arch)
    except hf.CheckpointError as e:  # the converter itself is not written yet
        pytest.skip(str(e))
    folder = DEFAULTS / arch
    if not (folder / "config.json").is_file():
        pytest.fail(f"no embedded default at {folder}: python -m experiments.train_tiny --arch {arch}")
    return folder


@pytest.fixture(scope="module")
def heldout_docs():
    if not TINYSTORIES.is_file():
        pytest.fail(f"{TINYSTORIES} is required")
    return data.load_documents(TINYSTORIES, part="heldout")


@pytest.mark.parametrize("arch", SHIPPED)
def test_default_geometry_and_recorded_results(arch):
    folder = default_folder(arch)
    cfg, params = hf.load(folder)
    tok = hf.load_tokenizer(folder)
    assert cfg.arch == arch and len(tok) == cfg.vocab_size
    assert {b.kind for b in cfg.blocks} == BLOCK_KINDS[arch]  # hybrids hold every block type they allow
    n_params = tiny.count_params(params)
    assert 1e6 <= n_params <= 5e6
    # room to prune along every axis
    if "attention" in BLOCK_KINDS[arch]:
        assert cfg.num_kv_heads >= 2 and cfg.head_dim >= 16
    if "mlp" in BLOCK_KINDS[arch]:
        assert cfg.intermediate_size >= 256
    if "mamba2" in BLOCK_KINDS[arch]:
        assert cfg.ssm_state >= 16 and cfg.ssm_head_dim >= 16
    r = json.loads((folder / "results.json").read_text())
    h = r["heldout"]
    assert r["params"] == n_params
    assert h["ppl"] == pytest.approx(h["ppl_transformers"], rel=1e-4)  # the README's 4 digits
    assert h["ppl"] < h["unigram_ppl"] / 3  # it learned far more than token frequencies
    assert h["greedy"].startswith(tiny.PROMPT)


@pytest.mark.parametrize("arch", SHIPPED)
def test_default_heldout_perplexity_matches_transformers_and_beats_unigram(arch, heldout_docs):
    import torch
    import transformers

    folder = default_folder(arch)
    cfg, params = hf.load(folder)
    tokens = data.token_stream(heldout_docs[:12], hf.load_tokenizer(folder))[: SLICE_WINDOWS * SLICE_SEQ]
    assert len(tokens) == SLICE_WINDOWS * SLICE_SEQ
    ours = uq.perplexity(cfg, params, tokens, seq_len=SLICE_SEQ)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    wins = torch.from_numpy(tokens.reshape(SLICE_WINDOWS, SLICE_SEQ).astype(np.int64))
    with torch.no_grad():
        theirs = math.exp(model(wins, labels=wins).loss.item())  # transformers' own shifted loss
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours < unigram_perplexity(tokens, seq_len=SLICE_SEQ) / 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", SHIPPED)
def test_default_greedy_continuation_is_reproduced(arch):
    """uq.generate reproduces the recorded sample; transformers' greedy decoding agrees token for token."""
    import torch
    import transformers

    folder = default_folder(arch)
    cfg, params = hf.load(folder)
    tok = hf.load_tokenizer(folder)
    recorded = json.loads((folder / "results.json").read_text())["heldout"]["greedy"]
    assert tiny.greedy_sample(cfg, params, tok) == recorded
    ids = tok(tiny.PROMPT)["input_ids"]
    ours = np.asarray(uq.generate(cfg, params, jnp.asarray([ids], jnp.int32), 24))[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)[0].numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_stories260k_on_the_heldout_stories(heldout_docs, shared_data):
    """The real pretrained model through the same data + uq.perplexity path: about 4 (README)."""
    res = tiny.stories260k_heldout(TINYSTORIES)
    assert 2.0 < res["ppl"] < 8.0 and res["ppl"] < res["unigram_ppl"] / 10


# ----------------------------------------------------------------------------- the trainer


def _tiny_run(stream, seed):
    cfg = tiny.tiny_config("llama", 64, 32, hidden=32, layers=1, heads=2, kv_heads=2, head_dim=16, mlp=64)
    return tiny.train(cfg, stream, steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup=2, weight_decay=0.1,
                            seed=seed, log_every=4)


def test_train_tiny_is_reproducible_under_a_seed_and_learns():
    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(1, 64, 40), 50).astype(np.int32)  # a repeated 40-token phrase: learnable
    p1, h1 = _tiny_run(stream, seed=0)
    p2, h2 = _tiny_run(stream, seed=0)
    p3, _ = _tiny_run(stream, seed=1)
    assert h1 == h2
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)))
    assert h1[-1]["loss"] < 0.7 * h1[0]["loss"] and h1[0]["loss"] > 3.0  # starts near log(64), then learns


def test_tokenizer_training_is_reproducible_and_round_trips(tmp_path):
    docs = data.split_documents(TINYSTORIES.read_text()[:60_000])
    a, b = tiny.train_tokenizer(docs, 300), tiny.train_tokenizer(docs, 300)
    assert a.get_vocab() == b.get_vocab() and len(a) == 300
    a.save_pretrained(str(tmp_path))
    loaded = hf.load_tokenizer(tmp_path)
    text = 'Once upon a time, Tom said: "Hi!"\n\nThe end.'
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id == 0 and ids == a(text)["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == text
