"""The real pretrained stories260K (llama2.c) through our Llama: generation and perplexity."""

import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from converters import hf, llama2c
from uniql_jax.eval import perplexity


@pytest.fixture(scope="module")
def stories(request):
    from tests.conftest import SHARED_DATA

    folder = SHARED_DATA / "stories260K"
    if not folder.is_dir():
        pytest.fail(f"{folder} is required")
    cfg, params = llama2c.load(folder / "stories260K.bin")
    return cfg, params, llama2c.load_tokenizer(folder / "tok512.bin")


def test_greedy_continuation_is_the_known_story(stories):
    cfg, params, tok = stories
    prompt = tok.encode("Once upon a time", bos=True)
    out = uq.generate(cfg, params, jnp.asarray([prompt], jnp.int32), 16)
    assert tok.decode(out[0]).startswith("Once upon a time, there was a little girl named Lily")


def test_tokenizer_round_trip(stories):
    *_, tok = stories
    text = 'Tom said, "Look at the big dog!" Then they ran home.'
    assert tok.decode(tok.encode(text, bos=True)) == text


def test_perplexity_matches_transformers_on_the_hf_export(stories, tmp_path):
    """stories260K exported to HF: transformers' own loss gives the same perplexity."""
    import torch
    import transformers

    cfg, params, tok = stories
    from tests.conftest import SHARED_DATA

    text = (SHARED_DATA / "tinystories" / "tinystories_valid_900.txt").read_text().split("\n\n")[-40:]
    ids = np.asarray([t for p in text for t in tok.encode(p.strip(), bos=True)], np.int32)
    ours = perplexity(cfg, params, ids, seq_len=128)
    hf.save(cfg, params, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    wins = torch.tensor(ids[: len(ids) // 128 * 128].reshape(-1, 128), dtype=torch.long)
    with torch.no_grad():
        loss = model(wins, labels=wins).loss.item()
    assert ours == pytest.approx(np.exp(loss), rel=1e-4)
    assert ours < 8.0  # a trained model: far below the 512-token vocabulary's uniform perplexity
