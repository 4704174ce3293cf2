"""GGUF input on a real model: SmolLM2-135M-Instruct as Q4_1 GGUF (../shared/data/smollm2).

``hf.load`` (our reader: the ``gguf`` package's numpy dequantization, llama.cpp's q/k row
permutation undone) against transformers' own GGUF loader on the same file: the same tensors bit
for bit, the same logits on a real prompt, the same tokenizer ids; and a greedy chat answer that is
sensible text. The file ships with every machine's shared data folder: if it is absent the tests fail.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import uniql_jax as uq
from converters import gguf as gguf_reader
from converters import hf
from tests.conftest import SHARED_DATA
from tests.helpers import hf_logits, max_rel_err, randomize_extras_

GGUF = SHARED_DATA / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def gguf_file():
    if not GGUF.is_file():
        pytest.fail(f"{GGUF} is missing: the shared data folder ../shared/data (see its README.md) must hold "
                    f"smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return GGUF


@pytest.fixture(scope="module")
def ours(gguf_file):
    return hf.load(gguf_file)


@pytest.fixture(scope="module")
def tok(gguf_file):
    return hf.load_tokenizer(gguf_file)


@pytest.fixture(scope="module")
def reference(gguf_file):
    """transformers' GGUF loader: its config, and its dequantized, un-permuted state dict in a model.
    (``from_pretrained(gguf_file=...)`` does the same but needs accelerate; these are the functions it calls.)"""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied to the embedding
    model.tie_weights()
    return config, state, model


def test_tensors_equal_transformers_gguf_loader(gguf_file, reference):
    _, state, _ = reference
    raw, tensors, _ = gguf_reader.read(gguf_file)
    assert sorted(tensors) == sorted(state)
    for name, t in state.items():
        assert np.array_equal(tensors[name], t.numpy()), name


def test_config_equals_the_one_transformers_writes(gguf_file, ours, reference, tmp_path):
    """transformers' GGUF config saved as config.json (a 'Llama converted from GGUF': _model_name_or_path,
    unk_token_id, ...) reads to the same ModelConfig as the GGUF metadata."""
    config, _, _ = reference
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert {"_model_name_or_path", "unk_token_id"} <= set(raw)
    cfg, _ = ours
    assert hf.config_from_hf(raw, "config.json") == cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 49152, True)
    assert hf.arch_of(gguf_file) == hf.arch_of(tmp_path) == "llama"


def test_tokenizer_and_logits_equal_transformers(gguf_file, tok, ours, reference):
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ids = tok(PROMPT)["input_ids"]
    assert ids == ref_tok(PROMPT)["input_ids"] and tok.decode(ids) == PROMPT and len(ids) < len(PROMPT) // 2
    cfg, params = ours
    tokens = np.asarray([ids], np.int32)
    logits = np.asarray(uq.forward(cfg, params, jnp.asarray(tokens)))
    ref = hf_logits(reference[2], tokens)
    assert max_rel_err(logits, ref) <= 1e-4
    assert tok.decode(int(logits[0, -1].argmax())).strip() == "Berlin"


def test_greedy_chat_answer_is_sensible(tok, ours):
    cfg, params = ours
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    out = np.asarray(uq.generate(cfg, params, jnp.asarray([prompt], jnp.int32), 24))
    continuation = out[0, len(prompt):].tolist()
    assert cfg.eos_token_id in continuation, "the answer ends (<|im_end|>) within 24 tokens"
    answer = tok.decode(continuation[:continuation.index(cfg.eos_token_id)])
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF), greedy answer to {messages[0]['content']!r}: {answer!r}")
    assert "Paris" in answer and len(answer.split()) >= 3


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, inverted; and not the identity."""
    def permute(w, n_head):  # the converter's formula
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    assert np.array_equal(gguf_reader.unpermute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)
    b = np.arange(24, dtype=np.float32)
    assert np.array_equal(gguf_reader.unpermute(permute(b, 3), 3), b)


def test_gguf_errors_are_clear(tmp_path):
    with pytest.raises(hf.CheckpointError, match="no such GGUF file"):
        hf.load(tmp_path / "nowhere.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(hf.CheckpointError, match="unreadable GGUF"):
        hf.load(tmp_path / "bad.gguf")
    with pytest.raises(hf.CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        gguf_reader.config_from_gguf({"general.architecture": "gpt2"}, "x.gguf", tied=True)
    with pytest.raises(hf.CheckpointError, match="unsupported GGUF metadata llama.rope.scaling.type='linear'"):
        gguf_reader.config_from_gguf({"general.architecture": "llama", "llama.rope.scaling.type": "linear"},
                                     "x.gguf", tied=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hf.CheckpointError, match="unsupported model_type 'gpt2'"):
        hf.arch_of(tmp_path)


def write_gguf(path, model, arch):
    """A tiny transformers Llama / Qwen2 written as llama.cpp's converter would (float32 tensors; for
    llama, q/k rows permuted by its formula)."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    top = {v: k for k, v in gguf_reader.TOP_TENSORS.items()}
    layer = {v: k for k, v in gguf_reader.LAYER_TENSORS.items()}
    for name, t in model.state_dict().items():
        w = t.numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}." + layer[rest]
            n = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
            if arch == "llama" and ("q_proj" in rest or "k_proj" in rest):
                w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        elif name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        else:
            gname = top[name]
        writer.add_tensor(gname, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True)])
def test_gguf_written_from_a_tiny_model_matches_it(tmp_path, arch, tied):
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config = config_cls(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=tied, rms_norm_eps=1e-6, max_position_embeddings=64)
    torch.manual_seed(0)
    model = randomize_extras_(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    write_gguf(tmp_path / "tiny.gguf", model, arch)
    assert hf.arch_of(tmp_path / "tiny.gguf") == arch
    cfg, params = hf.load(tmp_path / "tiny.gguf")
    assert (cfg.arch, cfg.tie_word_embeddings, cfg.attention_bias) == (arch, tied, arch == "qwen2")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    assert max_rel_err(np.asarray(uq.forward(cfg, params, jnp.asarray(tokens))), hf_logits(model, tokens)) <= 1e-5
