"""Importance matters: on real trained models, pruning UniQL's sorted order loses less than pruning a
random channel order or a weight-magnitude order under the same allocation (UNIQL.md, Stage 1)."""

import time

import numpy as np
import pytest

from converters import hf, llama2c
from experiments import common
from uniql_jax import data
from uniql_jax.compress.sort import compare_orders


def text_streams(tokenizer, shared_data, n_docs=60):
    """(calibration stream, evaluation stream) from disjoint TinyStories documents (first / last n_docs)."""
    docs = data.split_documents((shared_data / "tinystories" / "tinystories_valid_900.txt").read_text())
    return data.token_stream(docs[:n_docs], tokenizer), data.token_stream(docs[-n_docs:], tokenizer)


def stories260k(shared_data):
    folder = shared_data / "stories260K"
    return (*llama2c.load(folder / "stories260K.bin"), llama2c.load_tokenizer(folder / "tok512.bin"))


def default_model(arch):
    folder = common.DEFAULTS / arch
    if not (folder / "config.json").is_file():
        pytest.skip(f"no trained default model in {folder} yet")
    return (*hf.load(folder), hf.load_tokenizer(folder))


def check_uniql_wins(cfg, params, tok, shared_data, rates, n_calib, seq_len, n_docs):
    calib_stream, eval_stream = text_streams(tok, shared_data, n_docs)
    calib = data.calibration_windows(calib_stream, n_calib, seq_len, seed=0)
    res = compare_orders(cfg, params, calib, eval_stream, rates, seq_len=seq_len)
    ppl = res["ppl"]
    for i, r in enumerate(rates):
        assert res["dense_ppl"] < ppl["uniql"][i], r  # pruning costs something...
        assert ppl["uniql"][i] < ppl["random"][i] and ppl["uniql"][i] < ppl["magnitude"][i], (r, ppl)
    return res


def test_uniql_order_beats_baselines_on_stories260k_at_25_percent(shared_data):
    cfg, params, tok = stories260k(shared_data)
    check_uniql_wins(cfg, params, tok, shared_data, [0.25], n_calib=8, seq_len=128, n_docs=20)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["stories260K", "llama", "mamba2", "nemotron_h", "bamba", "qwen2"])
def test_uniql_order_beats_baselines_at_15_25_35_percent(model, shared_data):
    t0 = time.perf_counter()
    cfg, params, tok = stories260k(shared_data) if model == "stories260K" else default_model(model)
    res = check_uniql_wins(cfg, params, tok, shared_data, [0.15, 0.25, 0.35], n_calib=32, seq_len=256, n_docs=120)
    print(model, f"dense {res['dense_ppl']:.3f}", {k: np.round(v, 3).tolist() for k, v in res["ppl"].items()},
          f"{time.perf_counter() - t0:.0f} s")
