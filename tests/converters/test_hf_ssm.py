"""Mamba2 / Nemotron-H / Bamba converters: logits parity with transformers (its torch path,
float32), bit-exact save -> transformers -> load round trips, strict errors."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import uniql_jax as uq
from converters import hf
from uniql_jax.config import Mamba2Block

from tests.helpers import edit_config, hf_logits, max_rel_err, randomize_extras_, rewrite_weights

M, A, F = "linear_attention", "full_attention", "mlp"
BASE = {
    "mamba2": dict(vocab_size=64, hidden_size=16, num_heads=4, head_dim=8, expand=2, state_size=8,
                   num_hidden_layers=2, layer_norm_epsilon=1e-5),
    "nemotron_h": dict(vocab_size=64, hidden_size=16, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=24),
    "bamba": dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                  mamba_n_heads=8, mamba_d_state=8, mamba_expand=2),
}
CASES = {  # T = 12 tokens below
    "mamba2_g1_chunk4_divides": ("mamba2", dict(n_groups=1, chunk_size=4)),
    "mamba2_g2_chunk5_dt_limit": ("mamba2", dict(n_groups=2, chunk_size=5, time_step_limit=(0.01, 0.3))),
    "mamba2_g4_chunk16_tied_no_conv_bias": ("mamba2", dict(n_groups=4, chunk_size=16, tie_word_embeddings=True,
                                                           use_conv_bias=False)),
    "nemotron_M*-_g2_chunk5": ("nemotron_h", dict(layers_block_type=[M, A, F], n_groups=2, chunk_size=5)),
    "nemotron_-M*_g1_chunk4_dt_min": ("nemotron_h", dict(layers_block_type=[F, M, A], n_groups=1, chunk_size=4,
                                                         time_step_min=0.05)),
    "nemotron_*-M_g4_chunk7": ("nemotron_h", dict(layers_block_type=[A, F, M, F], n_groups=4, chunk_size=7)),
    "bamba_attn_first_g2_chunk5": ("bamba", dict(num_hidden_layers=2, attn_layer_indices=[0], mamba_n_groups=2,
                                                 mamba_chunk_size=5)),
    "bamba_attn_last_g8_chunk4_tied": ("bamba", dict(num_hidden_layers=3, attn_layer_indices=[2], mamba_n_groups=8,
                                                     mamba_chunk_size=4, tie_word_embeddings=True,
                                                     time_step_limit=(0.0, 0.2))),
}
CONFIG_CLASSES = {"mamba2": transformers.Mamba2Config, "nemotron_h": transformers.NemotronHConfig,
                  "bamba": transformers.BambaConfig}


def tiny_hf_model(arch, seed=0, **kw):
    """A random transformers model; norms, D, conv biases, dt_bias and A_log randomized too."""
    torch.manual_seed(seed)
    config = CONFIG_CLASSES[arch](**{**BASE[arch], **kw})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return randomize_extras_(model, seed)


def tokens_for(cfg, seed=1, T=12):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, T)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    arch, kw = CASES[case]
    model = tiny_hf_model(arch, **kw)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert cfg.arch == arch
    tokens = tokens_for(cfg)
    assert max_rel_err(np.asarray(uq.forward(cfg, params, jnp.asarray(tokens))), hf_logits(model, tokens)) <= 1e-4


def test_configs_read_as_expected(tmp_path):
    """Block patterns, groups, chunk sizes and time-step limits land in the config."""
    expect = {
        "nemotron_*-M_g4_chunk7": (("attention", "mlp", "mamba2", "mlp"), 4, 7, (0.001, math.inf)),
        "nemotron_-M*_g1_chunk4_dt_min": (("mlp", "mamba2", "attention"), 1, 4, (0.05, math.inf)),
        "bamba_attn_last_g8_chunk4_tied": (("mamba2", "mlp", "mamba2", "mlp", "attention", "mlp"), 8, 4, (0.0, 0.2)),
        "mamba2_g2_chunk5_dt_limit": (("mamba2", "mamba2"), 2, 5, (0.01, 0.3)),
    }
    for case, (kinds, groups, chunk, limit) in expect.items():
        arch, kw = CASES[case]
        cfg = hf.config_from_hf(CONFIG_CLASSES[arch](**{**BASE[arch], **kw}).to_dict())
        assert tuple(b.kind for b in cfg.blocks) == kinds
        assert (cfg.ssm_groups, cfg.ssm_chunk_size, cfg.time_step_limit) == (groups, chunk, limit)
    bamba = hf.config_from_hf(CONFIG_CLASSES["bamba"](**BASE["bamba"], attn_layer_indices=[1]).to_dict())
    attn = bamba.blocks[2]
    assert (bamba.head_dim, bamba.rotary_dim, attn.qk_pairs, attn.qk_pass) == (8, 4, 2, 4)  # partial rotary 0.5


@pytest.mark.parametrize("case", ["mamba2_g4_chunk16_tied_no_conv_bias", "nemotron_M*-_g2_chunk5",
                                  "bamba_attn_last_g8_chunk4_tied"])
def test_save_transformers_load_is_bit_exact(case, tmp_path):
    arch, kw = CASES[case]
    model = tiny_hf_model(arch, **kw)
    model.save_pretrained(tmp_path / "orig")
    cfg, params = hf.load(tmp_path / "orig")
    hf.save(cfg, params, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    for name, t in model.state_dict().items():  # transformers sees exactly the original tensors
        assert torch.equal(reloaded.state_dict()[name], t), name
    reloaded.save_pretrained(tmp_path / "again")
    cfg2, params2 = hf.load(tmp_path / "again")
    assert cfg2 == cfg
    leaves, leaves2 = jax.tree.leaves(params), jax.tree.leaves(params2)
    assert len(leaves) == len(leaves2)
    for a, b in zip(leaves, leaves2):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    tokens = tokens_for(cfg, T=9)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


def test_nemotron_h_reads_model_prefix_and_legacy_names(tmp_path):
    """Checkpoints written with the in-memory `model.` prefix, and configs with the legacy names
    (hybrid_override_pattern, mamba_*), give the same model."""
    arch, kw = CASES["nemotron_M*-_g2_chunk5"]
    model = tiny_hf_model(arch, **kw)
    model.save_pretrained(tmp_path / "orig")
    cfg, params = hf.load(tmp_path / "orig")
    from safetensors.numpy import load_file, save_file

    (tmp_path / "renamed").mkdir()
    tensors = {k.replace("backbone.", "model.", 1): v for k, v in load_file(tmp_path / "orig" / "model.safetensors").items()}
    save_file(tensors, tmp_path / "renamed" / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((tmp_path / "orig" / "config.json").read_text())
    raw["hybrid_override_pattern"] = "".join({M: "M", A: "*", F: "-"}[t] for t in raw.pop("layers_block_type"))
    for new, old in (("n_groups", "mamba_n_groups"), ("chunk_size", "mamba_chunk_size"), ("conv_kernel", "mamba_d_conv"),
                     ("time_step_min", "mamba_dt_min")):
        raw[old] = raw.pop(new)
    (tmp_path / "renamed" / "config.json").write_text(json.dumps(raw))
    cfg2, params2 = hf.load(tmp_path / "renamed")
    assert cfg2 == cfg
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))


# ----------------------------------------------------------------------------- strictness
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssm_models")
    for arch, case in (("mamba2", "mamba2_g2_chunk5_dt_limit"), ("nemotron_h", "nemotron_M*-_g2_chunk5"),
                       ("bamba", "bamba_attn_first_g2_chunk5")):
        tiny_hf_model(arch, **CASES[case][1]).save_pretrained(root / arch)
    return root


@pytest.fixture
def copy_of(saved_models, tmp_path):
    def copy(arch):
        shutil.copytree(saved_models / arch, tmp_path / arch)
        return tmp_path / arch
    return copy


@pytest.mark.parametrize("arch, change, message", [
    ("mamba2", dict(use_bias=True), "use_bias"),
    ("mamba2", dict(hidden_act="gelu"), "hidden_act"),
    ("mamba2", dict(expand=3), "expand"),  # hidden*expand != heads*head_dim: inconsistent
    ("mamba2", dict(n_groups=3), "n_groups=3"),  # 4 heads cannot form 3 groups
    ("mamba2", dict(time_step_limit=[0.5, 0.1]), "time_step_limit"),
    ("mamba2", dict(rms_norm=False), "rms_norm=False"),
    ("mamba2", dict(intermediate_size=48), "intermediate_size=48"),
    ("nemotron_h", dict(attention_head_dim=8), "attention_head_dim=8"),
    ("nemotron_h", dict(rms_norm_eps=1e-6), "rms_norm_eps=1e-06"),
    ("bamba", dict(attn_rotary_emb=8), "attn_rotary_emb=8"),
    ("nemotron_h", dict(layers_block_type=[M, "moe", F]), "mixture-of-experts.*not supported"),
    ("nemotron_h", dict(mlp_hidden_act="silu"), "mlp_hidden_act"),
    ("nemotron_h", dict(num_nextn_predict_layers=1), "num_nextn_predict_layers"),
    ("nemotron_h", dict(sliding_window=4), "sliding_window"),
    ("nemotron_h", dict(hybrid_override_pattern="MX-", layers_block_type=None), "unknown letter"),
    ("bamba", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
     "partial_rotary_factor"),
    ("bamba", dict(mamba_proj_bias=True), "mamba_proj_bias"),
    ("bamba", dict(attn_layer_indices=[5]), "attn_layer_indices"),
    ("bamba", dict(mamba_d_head=5), "num_heads\\*head_dim"),
])
def test_unhandled_or_inconsistent_config_raises(copy_of, arch, change, message):
    folder = copy_of(arch)
    edit_config(folder, **change)
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load(folder)


@pytest.mark.parametrize("arch, name", [("mamba2", "backbone.layers.1.mixer.A_log"),
                                        ("nemotron_h", "backbone.layers.0.mixer.conv1d.weight"),
                                        ("bamba", "model.layers.1.mamba.in_proj.weight")])
def test_missing_unexpected_and_misshapen_tensors_raise(copy_of, arch, name):
    folder = copy_of(arch)
    original = {}
    rewrite_weights(folder, lambda t: original.update({name: t.pop(name)}))
    with pytest.raises(hf.CheckpointError, match=f"missing tensor '{name}'"):
        hf.load(folder)
    extra = name.rsplit(".", 1)[0] + ".extra_bias"
    rewrite_weights(folder, lambda t: t.update({name: original[name], extra: np.zeros(3, np.float32)}))
    with pytest.raises(hf.CheckpointError, match=f"unexpected tensor.*{extra}"):
        hf.load(folder)
    bad = original[name][..., :-1]
    rewrite_weights(folder, lambda t: (t.pop(extra), t.update({name: np.ascontiguousarray(bad)})))
    with pytest.raises(hf.CheckpointError, match=f"{name}.*{tuple(bad.shape)}".replace("(", r"\(").replace(")", r"\)")):
        hf.load(folder)


def test_saving_a_pruned_ssm_block_raises(copy_of, tmp_path):
    cfg, params = hf.load(copy_of("mamba2"))
    small = cfg.with_blocks([Mamba2Block(0, 4, 8)] + list(cfg.blocks[1:]))
    from uniql_jax.compress.prune import slice_to_config

    with pytest.raises(hf.CheckpointError, match="pruned Mamba2 block"):
        hf.save(small, slice_to_config(small, params), tmp_path / "out")
