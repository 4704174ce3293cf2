"""The converters on the config.json of real published checkpoints, not only on configs transformers wrote.

For each checkpoint: its config.json as published (below, with where it was found), only the size
fields shrunk (hidden, layers, heads, head dims, intermediate, vocab, SSM sizes: ``SHRINK``); a random
transformers model built from exactly that dict (float32), saved with ``save_pretrained``; the shrunk
published dict written back verbatim as config.json; then ``hf.load`` must give transformers' logits,
and the attributes accepted only because transformers' config class does not define them must be
exactly the expected ones (``IGNORED``).

Sources. ``verbatim copy`` means the dict was checked against a copy of the published file: a page of the
model repo on huggingface.co stored by the docs search (Bamba-9B, mamba2-130m-hf, SmolLM2-1.7B-Instruct: the
dict also reproduces the byte size the repo lists for the file) or a copy in a public GitHub repository
(Llama-3.2-1B: a config.json committed verbatim; Llama-3.1-8B, Qwen2.5-0.5B, SmolLM2-135M, Mamba-Codestral,
Nemotron-H-8B: copies in code or a README, some needing the small edits their source notes; no huggingface.co
page of these files was found to check them further). ``transcribed, not verified`` (Qwen2.5-7B,
SmolLM2-1.7B) means no copy of the base repo's own file was found anywhere searched (code search, exact-string
search, the stored huggingface.co pages); those dicts are the author's transcription and stay only as cases.

Not found (no case): Nemotron-H-4B-Base-8K and -56B-Base-8K (only trimmed excerpts and recipe names; no
config.json), Bamba-9B-v2 (only its file listing, config.json 989 bytes, not its content).
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import uniql_jax as uq
from converters import hf
from tests.helpers import hf_logits, max_rel_err, randomize_extras_

INF = math.inf

PUBLISHED = {
    "Llama-3.1-8B": dict(
        source="https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json (verbatim copy: the "
               "llama_3_1_config dict of a public HF-model benchmark module, found by code search)",
        config={
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
        shrink=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, vocab_size=256),
        ignored=[]),
    "Llama-3.2-1B": dict(
        source="https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (verbatim copy: "
               "github.com/MatthewGoldsberry/LLM-Projects, Llama-3.2-1B/config.json at commit "
               "bf1733705e944f312bf5564d13932a9b6de21606, compared key by key)",
        config={
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
        shrink=dict(hidden_size=64, head_dim=16, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, vocab_size=256),
        ignored=[]),
    "Qwen2.5-0.5B": dict(
        source="https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (verbatim copy: a model page "
               "dump found by code search, '# Qwen/Qwen2.5-0.5B ## model config')",
        config={
            "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
            "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
            "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False,
            "use_sliding_window": False, "vocab_size": 151936},
        shrink=dict(hidden_size=56, intermediate_size=96, num_attention_heads=7, num_key_value_heads=1,
                    num_hidden_layers=2, vocab_size=256),
        ignored=[]),
    "Qwen2.5-7B": dict(
        source="https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json (transcribed, not verified: "
               "code search (find_string on 18944 / max_window_layers 28 / vocab 152064, model-page dumps) and the "
               "stored huggingface.co pages found only Qwen2.5-7B-Instruct, Qwen2-7B and fine-tunes of the base "
               "whose _name_or_path is Qwen/Qwen2.5-7B, never the base repo's own file)",
        config={
            "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
            "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
            "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_mrope": False,
            "use_sliding_window": False, "vocab_size": 152064},
        shrink=dict(hidden_size=56, intermediate_size=96, num_attention_heads=7, num_key_value_heads=1,
                    num_hidden_layers=2, vocab_size=256),
        ignored=[]),
    "SmolLM2-135M": dict(
        source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json (verbatim copy: the "
               "LlamaConfig printed in satyasundar/erav3-s13 README.md, less the _name_or_path and head_dim "
               "that printing adds)",
        config={
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
            "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
            "max_position_embeddings": 2048, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
            "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.48.0", "use_cache": True, "vocab_size": 49152},
        shrink=dict(hidden_size=48, intermediate_size=64, num_attention_heads=3, num_key_value_heads=1,
                    num_hidden_layers=2, vocab_size=256),
        ignored=["is_llama_config"]),
    "SmolLM2-1.7B": dict(
        source="https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json (transcribed, not "
               "verified: code search and the stored huggingface.co pages found the -Instruct file (case below) "
               "and fine-tunes of the base, never the base repo's own file)",
        config={
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 2048,
            "initializer_range": 0.02, "intermediate_size": 8192, "is_llama_config": True,
            "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 24, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_interleaved": False, "rope_scaling": None, "rope_theta": 130000, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152},
        shrink=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                    num_hidden_layers=2, vocab_size=256),
        ignored=["is_llama_config"]),
    "Mamba-Codestral-7B-v0.1": dict(
        source="https://huggingface.co/mistralai/Mamba-Codestral-7B-v0.1/blob/main/config.json (verbatim copy: "
               "the codestral_mamba_config dict of a public HF-model benchmark module, found by code search; "
               "its time_step_limit (0.0, inf) is the published [0.0, Infinity])",
        config={
            "_name_or_path": "/raid/pablo/codestral-hf-good/", "architectures": ["Mamba2ForCausalLM"],
            "bos_token_id": 0, "chunk_size": 256, "conv_kernel": 4, "eos_token_id": 0, "expand": 2, "head_dim": 64,
            "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.1, "intermediate_size": 8192,
            "layer_norm_epsilon": 1e-05, "model_type": "mamba2", "n_groups": 8, "norm_before_gate": True,
            "num_heads": 128, "num_hidden_layers": 64, "pad_token_id": 0, "rescale_prenorm_residual": False,
            "residual_in_fp32": True, "rms_norm": True, "state_size": 128, "tie_word_embeddings": False,
            "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_limit": [0.0, INF],
            "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 256, "time_step_scale": 1.0,
            "torch_dtype": "bfloat16", "transformers_version": "4.44.0.dev0", "use_bias": False, "use_cache": True,
            "use_conv_bias": True, "vocab_size": 32768},
        shrink=dict(hidden_size=32, head_dim=8, num_heads=8, intermediate_size=64, n_groups=2, state_size=8,
                    num_hidden_layers=2, vocab_size=256),
        ignored=["norm_before_gate"]),
    "mamba2-130m-hf": dict(
        source="https://huggingface.co/AntonV/mamba2-130m-hf/blob/97d2a95f2466fec3dbc48fbc16ac63c4a2525d9b/config.json "
               "(verbatim copy of that page, found by docs search; config.json last changed by commit ee4eabb "
               "'Upload 5 files'; json.dumps(indent=2) of this dict plus a newline is 756 bytes, the size the "
               "repo's file listing gives). It has no 'architectures' key.",
        config={
            "bos_token_id": 0, "chunk_size": 256, "conv_kernel": 4, "eos_token_id": 0, "expand": 2, "head_dim": 64,
            "hidden_act": "silu", "hidden_size": 768, "initializer_range": 0.1, "layer_norm_epsilon": 1e-05,
            "model_type": "mamba2", "n_groups": 1, "num_heads": 24, "num_hidden_layers": 24, "pad_token_id": 0,
            "rescale_prenorm_residual": False, "residual_in_fp32": True, "rms_norm": True, "state_size": 128,
            "tie_word_embeddings": True, "time_step_floor": 0.0001, "time_step_limit": [0.0, INF],
            "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 256,
            "transformers_version": "4.45.0.dev0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
            "vocab_size": 50288},
        shrink=dict(hidden_size=32, head_dim=8, num_heads=8, state_size=8, num_hidden_layers=2, vocab_size=256),
        ignored=[]),
    "Nemotron-H-8B-Base-8K": dict(
        source="https://huggingface.co/nvidia/Nemotron-H-8B-Base-8K/blob/main/config.json (verbatim copy: the "
               "nemotronh_8b_config_dict fixture of Megatron-Bridge's NemotronH bridge test, less the two keys "
               "that fixture marks as its own additions: hidden_act and n_routed_experts=None)",
        config={
            "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "attention_head_dim": 128,
            "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                         "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
            "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2,
            "hidden_dropout": 0.0, "hidden_size": 4096,
            "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
            "initializer_range": 0.02, "intermediate_size": 21504, "layer_norm_epsilon": 1e-05,
            "mamba_head_dim": 64, "mamba_hidden_act": "silu", "mamba_num_heads": 128, "mamba_proj_bias": False,
            "max_position_embeddings": 8192, "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
            "n_groups": 8, "num_attention_heads": 32, "num_hidden_layers": 52, "num_key_value_heads": 8,
            "num_logits_to_keep": 1, "pad_token_id": 0, "rescale_prenorm_residual": True, "residual_in_fp32": False,
            "rms_norm_eps": 1e-05, "ssm_state_size": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.48.0.dev0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
            "use_mamba_kernels": True, "vocab_size": 131072},
        # the first 9 layers of the published pattern (every kind); attention_head_dim stays 128 because
        # transformers sizes the heads by head_dim (absent: 128) and our check wants the two to agree
        shrink=dict(hidden_size=32, hybrid_override_pattern="M-M-M-M*-", num_hidden_layers=9, intermediate_size=48,
                    mamba_head_dim=8, mamba_num_heads=8, n_groups=2, ssm_state_size=8, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256),
        ignored=[]),
    "Bamba-9B": dict(
        source="https://huggingface.co/ibm-fms/Bamba-9B/blame/43f21514c01057cdbfbd5e3fbc97bd3df3360aba/config.json "
               "(verbatim copy of that page, found by docs search; the repo is now ibm-ai-platform/Bamba-9B-v1; its "
               "config.json was written once, by commit 2fb00d0 'Weights upload'; json.dumps(indent=2) of this "
               "dict plus a newline is 886 bytes, the size every file listing of the repo gives). No rope_theta, "
               "max_position_embeddings or torch_dtype; mamba_dt_rank is one transformers' BambaConfig lacks.",
        config={
            "architectures": ["BambaForCausalLM"], "attention_dropout": 0.0, "attn_layer_indices": [9, 18, 27],
            "attn_rotary_emb": 64, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "mamba_chunk_size": 256,
            "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_head": 64, "mamba_d_state": 128,
            "mamba_dt_rank": 256, "mamba_expand": 2, "mamba_n_groups": 1, "mamba_n_heads": 128,
            "mamba_proj_bias": False, "model_type": "bamba", "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "num_logits_to_keep": 1, "pad_token_id": 0, "rms_norm_eps": 1e-05,
            "tie_word_embeddings": False, "transformers_version": "4.47.0.dev0", "use_cache": True,
            "use_mamba_kernels": True, "vocab_size": 128256},
        shrink=dict(hidden_size=64, attn_layer_indices=[1], attn_rotary_emb=8, intermediate_size=96, mamba_d_head=16,
                    mamba_d_state=8, mamba_n_heads=8, num_attention_heads=4, num_hidden_layers=3,
                    num_key_value_heads=2, vocab_size=256),
        ignored=["mamba_dt_rank", "use_mamba_kernels"]),
    "SmolLM2-1.7B-Instruct": dict(
        source="https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B-Instruct/blob/"
               "dfc017ec3d4e0eaed394f8bf2a0fd2ff24f8b2cd/config.json (verbatim copy of that page, found by docs "
               "search; file from commit a587c08; json.dumps(indent=2) of this dict plus a newline is 737 bytes, "
               "the size the page gives)",
        config={
            "_name_or_path": "loubnabnl/smollm2-1.7B-8k-mix7-ep2-v2", "architectures": ["LlamaForCausalLM"],
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 24, "num_key_value_heads": 32, "pad_token_id": 2, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 130000, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152},
        shrink=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                    num_hidden_layers=2, vocab_size=256),
        ignored=[]),
}


def shrunk(name):
    case = PUBLISHED[name]
    assert set(case["shrink"]) <= set(case["config"]), "shrinking only replaces published size fields"
    return {**case["config"], **case["shrink"]}


def write_config(folder, raw):
    (folder / "config.json").write_text(json.dumps(raw, indent=2))  # float('inf') -> Infinity, as published


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_loads_and_matches_transformers(name, tmp_path):
    raw = shrunk(name)
    write_config(tmp_path, raw)
    # transformers reads the same file (its native class; auto_map's remote code is never run)
    config = transformers.AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)
    torch.manual_seed(0)
    model = randomize_extras_(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    model.save_pretrained(tmp_path)
    # transformers' own re-serialization (every attribute its class defines, legacy keys converted)
    cfg_resaved = hf.config_from_hf(json.loads((tmp_path / "config.json").read_text()), "resaved config.json")
    write_config(tmp_path, raw)  # the published dict back, verbatim
    cfg, params = hf.load(tmp_path)
    assert cfg == cfg_resaved
    assert cfg.arch == hf.arch_of(tmp_path) == raw["model_type"]
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(uq.forward(cfg, params, jnp.asarray(tokens)))
    assert max_rel_err(ours, hf_logits(model, tokens)) <= 1e-4


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_only_attributes_transformers_does_not_define_are_ignored(name):
    """Of the full published dict, exactly the expected attributes are accepted unread."""
    raw = PUBLISHED[name]["config"]
    reader = hf.ConfigReader(raw, name, raw["model_type"])
    hf.mapping_for(raw["model_type"]).config_from_hf(reader, raw["model_type"])
    reader.finish()
    assert reader.ignored == PUBLISHED[name]["ignored"]
    _, defined = hf.transformers_attributes(raw["model_type"])
    assert not set(reader.ignored) & defined


@pytest.mark.parametrize("name, change, message", [
    ("SmolLM2-135M", dict(rope_interleaved=True), "rope_interleaved=True"),
    ("Qwen2.5-7B", dict(use_mrope=True), "use_mrope=True"),
    ("Qwen2.5-7B", dict(use_sliding_window=True, max_window_layers=1), "sliding-window attention on layer"),
    ("Mamba-Codestral-7B-v0.1", dict(rms_norm=False), "rms_norm=False"),
    ("Nemotron-H-8B-Base-8K", dict(attention_head_dim=64), "attention_head_dim=64"),
    ("Bamba-9B", dict(attn_rotary_emb=128), "attn_rotary_emb=128"),
])
def test_published_config_with_unimplemented_math_is_refused(name, change, message):
    with pytest.raises(hf.CheckpointError, match=message):
        hf.config_from_hf({**PUBLISHED[name]["config"], **change}, name)
