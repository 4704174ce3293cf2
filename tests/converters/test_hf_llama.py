"""Llama / Qwen2 converters: logits parity with transformers, bit-exact round trips, strict errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import uniql_jax as uq
from converters import hf
from tests.helpers import edit_config, hf_logits, max_rel_err, randomize_extras_, rewrite_weights

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

CASES = {
    "mha_tied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa2": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "gqa4_llama3_rope": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2,
                             rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING}, max_position_embeddings=64),
    "mqa": dict(model_type="llama", num_attention_heads=6, num_key_value_heads=1, head_dim=12),
    "qwen2_gqa3": dict(model_type="qwen2", num_attention_heads=6, num_key_value_heads=2),
    "qwen2_tied": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    # Qwen2Config does not define head_dim, but Qwen2's modelling reads it (getattr) when present
    "qwen2_head_dim16": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def tiny_hf_model(model_type, seed=0, **kw):
    """A random transformers model; biases and norms randomized so parity tests see them."""
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, rms_norm_eps=1e-5)
    base.update(kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**base), dtype=torch.float32).eval()
    return randomize_extras_(model, seed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    kw = dict(CASES[case])
    model = tiny_hf_model(kw.pop("model_type"), **kw)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 37)).astype(np.int32)
    ours = np.asarray(uq.forward(cfg, params, jnp.asarray(tokens)))
    assert max_rel_err(ours, hf_logits(model, tokens)) <= 1e-4


@pytest.mark.parametrize("case", ["gqa4_llama3_rope", "qwen2_gqa3"])
def test_cached_decoding_equals_full_forward(case, tmp_path):
    kw = dict(CASES[case])
    model = tiny_hf_model(kw.pop("model_type"), **kw)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    full = uq.forward(cfg, params, tokens)
    cache = uq.init_cache(cfg, 2, 16)
    first, cache = uq.decode_step(cfg, params, tokens[:, :5], cache)  # a prefill chunk, then single tokens
    steps = [first]
    for t in range(5, 12):
        logits, cache = uq.decode_step(cfg, params, tokens[:, t:t + 1], cache)
        steps.append(logits)
    assert float(jnp.max(jnp.abs(jnp.concatenate(steps, axis=1) - full))) <= 1e-5 * float(jnp.max(jnp.abs(full)))


@pytest.mark.parametrize("case", ["gqa2", "qwen2_tied", "gqa4_llama3_rope"])
def test_save_transformers_load_is_bit_exact(case, tmp_path):
    kw = dict(CASES[case])
    model = tiny_hf_model(kw.pop("model_type"), **kw)
    model.save_pretrained(tmp_path / "orig")
    cfg, params = hf.load(tmp_path / "orig")
    hf.save(cfg, params, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    reloaded.save_pretrained(tmp_path / "again")
    cfg2, params2 = hf.load(tmp_path / "again")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    tokens = np.arange(10, dtype=np.int32)[None]
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


def test_pytorch_bin_and_sharded_safetensors(tmp_path):
    model = tiny_hf_model("llama", num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ref = hf.load(tmp_path / "st")[1]
    for other in ("sharded", "bin"):
        got = hf.load(tmp_path / other)[1]
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_checkpoint_keeps_dtype_and_runs(tmp_path):
    model = tiny_hf_model("llama", num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert params["embed"].dtype == jnp.bfloat16
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9)).astype(np.int32)
    ours = np.asarray(uq.forward(cfg, params, jnp.asarray(tokens)))
    ref = hf_logits(model.float(), tokens)
    assert max_rel_err(ours, ref) < 5e-2  # bfloat16 activations
    hf.save(cfg, params, tmp_path / "out")
    _, again = hf.load(tmp_path / "out")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))


# ----------------------------------------------------------------------------- strictness


@pytest.fixture
def saved(tmp_path):
    model = tiny_hf_model("llama", num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(pretraining_tp=2), "pretraining_tp"),
    (dict(rope_interleaved=True), "rope_interleaved=True"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
    (dict(model_type="gpt2"), "gpt2"),
    (dict(model_type="qwen2", use_mrope=True), "use_mrope=True"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1), "sliding-window"),
    (dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention"]), "sliding-window"),
])
def test_unhandled_config_attribute_raises(saved, change, message):
    edit_config(saved, **change)
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load(saved)


def test_attribute_transformers_does_not_define_is_accepted_and_logged(saved, caplog, monkeypatch):
    """transformers keeps such an attribute as an unused extra, so it cannot change the forward."""
    monkeypatch.setattr(hf, "_logged_ignored", set())
    ref = hf.load(saved)[1]
    edit_config(saved, some_new_knob=3, is_llama_config=True)
    with caplog.at_level("INFO", logger="converters.hf"):
        got = hf.load(saved)[1]
        assert "ignoring attribute(s) is_llama_config=True, some_new_knob=3" in caplog.text
        caplog.clear()
        hf.load(saved)
        assert "ignoring" not in caplog.text  # once per process
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
    raw = json.loads((saved / "config.json").read_text())
    reader = hf.ConfigReader(raw, "config.json", "llama")
    hf.mapping_for("llama").config_from_hf(reader, "llama")
    reader.finish()
    assert reader.ignored == ["is_llama_config", "some_new_knob"]


def test_attribute_transformers_defines_must_be_consumed():
    """A LlamaConfig attribute the mapping did not read (here: hidden_act, skipped on purpose) raises
    naming attribute and value, and every LlamaConfig attribute is classified by the llama mapping."""
    raw = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4).to_dict()
    reader = hf.ConfigReader(raw, "config.json", "llama")
    hf.mapping_for("llama").config_from_hf(reader, "llama")
    reader.finish()  # the full to_dict() of transformers' class: nothing left over
    reader.used.discard("hidden_act")
    with pytest.raises(hf.CheckpointError, match=r"unsupported attribute\(s\) hidden_act='silu' .*LlamaConfig"):
        reader.finish()
    _, defined = hf.transformers_attributes("llama")
    assert {"hidden_act", "rope_parameters", "rope_theta", "rope_scaling", "head_dim"} <= defined
    assert "is_llama_config" not in defined
    _, defined = hf.transformers_attributes("qwen2")
    assert "head_dim" in defined and "head_dim" not in transformers.Qwen2Config().to_dict()  # read by the modelling


def test_missing_unexpected_and_misshapen_tensors_raise(saved):
    rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf.load(saved)
    rewrite_weights(saved, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((72, 48), np.float32),
                                               "model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(hf.CheckpointError, match="unexpected tensor.*model.layers.0.extra.weight"):
        hf.load(saved)
    rewrite_weights(saved, lambda t: (t.pop("model.layers.0.extra.weight"),
                                      t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((71, 48), np.float32)})))
    with pytest.raises(hf.CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\(71, 48\)"):
        hf.load(saved)


def test_unreadable_inputs_raise_clearly(tmp_path, saved):
    with pytest.raises(hf.CheckpointError, match="no such checkpoint directory"):
        hf.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.CheckpointError, match="no config.json"):
        hf.load(tmp_path / "empty")
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(hf.CheckpointError, match="unreadable weights"):
        hf.load(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(hf.CheckpointError, match="malformed JSON"):
        hf.load(saved)


def test_offline_hub_id_fails_at_once(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(hf.CheckpointError, match="cannot be fetched from the Hub"):
        hf.load("someone/not-cached-model-xyz")
    assert time.monotonic() - start < 10


def test_bin_checkpoints_load_weights_only(tmp_path):
    """A pickle that would run code is refused by the weights-only loader."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    saved = tiny_hf_model("llama", num_attention_heads=4, num_key_value_heads=2)
    saved.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save({"x": Evil()}, tmp_path / "bin" / "pytorch_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(hf.CheckpointError, match="unreadable weights"):
        hf.load(tmp_path / "bin")
