"""NemotronHForCausalLM: one block per HF layer, of the kind ``layers_block_type`` says.

``backbone.layers.{i}.norm`` + ``.mixer`` where the mixer is a Mamba2 mixer ("linear_attention",
pattern letter M), attention without RoPE ("full_attention", *), or a ReLU² MLP without gate
("mlp", -). Mixture-of-experts layers ("moe", E) are not supported. transformers loads the
checkpoint prefix ``backbone.`` as ``model.``; we read either and write ``backbone.``.

Note (transformers semantics, which we follow): the Mamba time step is clipped to
``(time_step_min, inf)``; the ``time_step_limit`` attribute is not used by this model.
"""

from __future__ import annotations

import math

from converters.mappings import common, mamba2
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig

CheckpointError = common.CheckpointError
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
KINDS = {"linear_attention": "mamba2", "full_attention": "attention", "mlp": "mlp"}
LETTER = {"mamba2": "M", "attention": "*", "mlp": "-"}

# legacy config.json names (NemotronHConfig.__post_init__ maps them) -> current names
LEGACY = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "expand": "mamba_expand",
          "time_step_min": "mamba_dt_min", "time_step_max": "mamba_dt_max", "time_step_limit": "mamba_dt_limit",
          "time_step_floor": "mamba_dt_init_floor", "use_conv_bias": "mamba_conv_bias", "chunk_size": "mamba_chunk_size"}
DEFAULTS = {"n_groups": 8, "conv_kernel": 4, "expand": 2, "time_step_min": 0.001, "use_conv_bias": True,
            "chunk_size": 128}
# names NemotronHConfig converts (``__post_init__``): transformers defines them
TRANSFORMERS_LEGACY = frozenset(LEGACY.values()) | {"hybrid_override_pattern", "mtp_hybrid_override_pattern"}
MOE_KEYS = ("n_routed_experts", "output_router_logits", "n_shared_experts", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "moe_latent_size", "moe_shared_expert_overlap",
            "num_experts_per_tok", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob")


def get_aliased(r, key):
    """The current name wins over the legacy one, as in NemotronHConfig."""
    legacy = LEGACY.get(key)
    value = r.get(legacy) if legacy else None
    if key in r.raw:
        value = r.get(key)
    return DEFAULTS.get(key) if value is None else value


def layer_types(r) -> list[str]:
    types = r.get("layers_block_type")
    pattern = r.get("hybrid_override_pattern")
    if types is None and pattern is not None:
        bad = sorted(set(pattern) - set(PATTERN))
        if bad:
            raise CheckpointError(f"{r.source}: hybrid_override_pattern has unknown letter(s) {bad}")
        types = [PATTERN[ch] for ch in pattern]
    if types is None:
        raise CheckpointError(f"{r.source}: missing required attribute 'layers_block_type'")
    for i, t in enumerate(types):
        if t == "moe":
            raise CheckpointError(f"{r.source}: layer {i} is a mixture-of-experts ('moe') layer: not supported")
        if t not in KINDS:
            raise CheckpointError(f"{r.source}: layer {i} has unknown type {t!r}")
    n = r.get("num_hidden_layers")
    if n is not None and n != len(types):
        raise CheckpointError(f"{r.source}: num_hidden_layers={n} but {len(types)} layer types")
    return list(types)


def names(blk) -> dict:
    pre = f"backbone.layers.{blk.layer}."
    m = pre + "mixer."
    if blk.kind == "mamba2":
        return {"norm": pre + "norm.weight", "mixer": m}
    if blk.kind == "attention":
        return {"norm": pre + "norm.weight", "q": m + "q_proj", "k": m + "k_proj", "v": m + "v_proj", "o": m + "o_proj"}
    return {"norm": pre + "norm.weight", "up": m + "up_proj", "down": m + "down_proj"}


def config_from_hf(r, model_type: str) -> ModelConfig:
    types = layer_types(r)
    D = r.require("hidden_size")
    # absent attributes take NemotronHConfig's defaults
    H, P = r.get("mamba_num_heads", 128), r.get("mamba_head_dim", 64)
    N, Rg = r.get("ssm_state_size", 128), get_aliased(r, "n_groups")
    mamba2.check_ssm_geometry(r.source, D, None, H, P, Rg)  # NemotronH sizes the mixer as heads x head_dim
    nA = r.get("num_attention_heads", 32)
    nK = r.get("num_key_value_heads", 8) or nA
    head_dim = r.get("head_dim", 128) or D // nA
    # the remote-code NemotronH (auto_map) names these differently; NemotronHConfig does not define them,
    # so they must restate what transformers computes with
    r.agree("attention_head_dim", head_dim, "the attention head_dim")
    r.agree("rms_norm_eps", r.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon (the epsilon of every norm)")
    if "full_attention" in types and nA % nK:
        raise CheckpointError(f"{r.source}: num_attention_heads={nA} not a multiple of num_key_value_heads={nK}")
    F = int(r.get("intermediate_size", 21504))
    # NemotronHForCausalLM declares no tied weights: lm_head is its own tensor whatever this flag says
    r.get("tie_word_embeddings")
    r.expect("mlp_hidden_act", "relu2")
    r.expect("mamba_hidden_act", "silu")
    r.expect("mlp_bias", False)
    r.expect("attention_bias", False)
    r.expect("use_bias", False)
    r.expect("mamba_proj_bias", False)
    r.expect("sliding_window", None)
    r.expect("num_nextn_predict_layers", 0)
    # no effect on the forward pass: MoE sizes (no MoE layer here), init-only knobs, dropout, the
    # generation logit count, the kernel switch, the storage dtype of the SSM cache (ours is float32),
    # the float32 residual (a no-op in float32), and the ignored time_step_limit (see module doc)
    for k in MOE_KEYS + ("time_step_max", "time_step_floor", "rescale_prenorm_residual", "hidden_dropout",
                         "num_logits_to_keep", "use_mamba_kernels", "mamba_ssm_cache_dtype", "residual_in_fp32",
                         "mtp_layers_block_type", "mtp_hybrid_override_pattern", "expand", "time_step_limit"):
        get_aliased(r, k) if k in LEGACY else r.get(k)
    eps = float(r.get("layer_norm_epsilon", 1e-5))
    blocks = []
    for i, t in enumerate(types):
        kind = KINDS[t]
        if kind == "mamba2":
            blocks.append(Mamba2Block(i, N, P))
        elif kind == "attention":
            blocks.append(AttentionBlock(i, 0, head_dim, head_dim))
        else:
            blocks.append(MLPBlock(i, F))
    return ModelConfig(
        arch="nemotron_h", vocab_size=r.require("vocab_size"), hidden_size=D, blocks=tuple(blocks),
        rms_norm_eps=eps, tie_word_embeddings=False,
        pad_token_id=r.get("pad_token_id"), bos_token_id=r.get("bos_token_id"), eos_token_id=r.get("eos_token_id"),
        max_position_embeddings=int(r.get("max_position_embeddings", 4096)),
        num_heads=nA, num_kv_heads=nK, head_dim=head_dim, rotary_dim=0,
        intermediate_size=F, mlp_activation="relu2",
        ssm_heads=H, ssm_head_dim=P, ssm_groups=Rg, ssm_state=N, conv_kernel=int(get_aliased(r, "conv_kernel")),
        ssm_chunk_size=int(get_aliased(r, "chunk_size")),
        time_step_limit=(mamba2.float_from_json(get_aliased(r, "time_step_min")), math.inf),
        ssm_norm_eps=eps, conv_bias=bool(get_aliased(r, "use_conv_bias")))


def config_to_hf(cfg: ModelConfig) -> dict:
    mamba2.check_uniform_eps(cfg)
    if cfg.time_step_limit[1] != math.inf:
        raise CheckpointError(f"NemotronH has no upper time-step limit; got time_step_limit={cfg.time_step_limit}")
    if cfg.rotary_dim:
        raise CheckpointError("NemotronH attention has no RoPE; got rotary_dim > 0")
    if cfg.tie_word_embeddings:
        raise CheckpointError("NemotronHForCausalLM does not tie lm_head to the embeddings")
    return {
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "layers_block_type": [PATTERN[LETTER[b.kind]] for b in cfg.blocks],
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "mlp_hidden_act": "relu2", "mamba_num_heads": cfg.ssm_heads, "mamba_head_dim": cfg.ssm_head_dim,
        "ssm_state_size": cfg.ssm_state, "n_groups": cfg.ssm_groups, "conv_kernel": cfg.conv_kernel,
        "chunk_size": cfg.ssm_chunk_size, "time_step_min": cfg.time_step_limit[0],
        "time_step_limit": [0.0, math.inf], "use_conv_bias": cfg.conv_bias, "layer_norm_epsilon": cfg.rms_norm_eps,
        "tie_word_embeddings": False, "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False, "mlp_bias": False, "use_bias": False, "mamba_proj_bias": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }


EMBED, FINAL_NORM, HEAD = "backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"


class _Renamed:
    """A tensor taker that reads ``model.*`` names as ``backbone.*`` (checkpoints saved either way)."""

    def __init__(self, take, prefix):
        self.take, self.prefix = take, prefix

    def _name(self, name):
        return self.prefix + name[len("backbone."):] if name.startswith("backbone.") else name

    def __call__(self, name, shape):
        return self.take(self._name(name), shape)

    def has(self, name):
        return self.take.has(self._name(name))


def params_from_hf(cfg: ModelConfig, take) -> dict:
    if not take.has(EMBED) and take.has("model.embeddings.weight"):
        take = _Renamed(take, "model.")
    return mamba2.stack_from_hf(cfg, take, names, EMBED, FINAL_NORM, HEAD)


def params_to_hf(cfg: ModelConfig, params: dict) -> dict:
    return mamba2.stack_to_hf(cfg, params, names, EMBED, FINAL_NORM, HEAD)
