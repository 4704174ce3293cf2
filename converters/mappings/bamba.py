"""BambaForCausalLM: each HF layer ``model.layers.{i}`` is two blocks.

A mixer block, ``input_layernorm`` + either ``mamba`` (Mamba2 mixer) or ``self_attn``
(attention for the layers in ``attn_layer_indices``; partial rotary: RoPE on the first half
of each head, the rest passed through), then an MLP block, ``pre_ff_layernorm`` +
``feed_forward`` (gated SiLU).
"""

from __future__ import annotations

from converters.mappings import common, mamba2
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig

CheckpointError = common.CheckpointError
EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.final_layernorm.weight", "lm_head.weight"
PARTIAL_ROTARY = 0.5  # BambaConfig hard-codes it


def names(blk) -> dict:
    pre = f"model.layers.{blk.layer}."
    if blk.kind == "mamba2":
        return {"norm": pre + "input_layernorm.weight", "mixer": pre + "mamba."}
    if blk.kind == "attention":
        a = pre + "self_attn."
        return {"norm": pre + "input_layernorm.weight", "q": a + "q_proj", "k": a + "k_proj", "v": a + "v_proj",
                "o": a + "o_proj"}
    f = pre + "feed_forward."
    return {"norm": pre + "pre_ff_layernorm.weight", "gate": f + "gate_proj", "up": f + "up_proj", "down": f + "down_proj"}


def config_from_hf(r, model_type: str) -> ModelConfig:
    # absent attributes take BambaConfig's defaults
    D, L = r.require("hidden_size"), r.get("num_hidden_layers", 32)
    nA = r.get("num_attention_heads", 32)
    nK = r.get("num_key_value_heads", 8) or nA
    head_dim = r.get("head_dim") or D // nA
    H, Rg, N = r.get("mamba_n_heads", 128), r.get("mamba_n_groups", 1), r.get("mamba_d_state", 256)
    expand = r.get("mamba_expand", 2)
    P = r.get("mamba_d_head", "auto")
    P = expand * D // H if P == "auto" else P
    mamba2.check_ssm_geometry(r.source, D, expand, H, P, Rg)
    attn = r.get("attn_layer_indices") or []
    if any(not 0 <= i < L for i in attn):
        raise CheckpointError(f"{r.source}: attn_layer_indices {attn} outside 0..{L - 1}")
    if attn and nA % nK:
        raise CheckpointError(f"{r.source}: num_attention_heads={nA} not a multiple of num_key_value_heads={nK}")
    r.expect("hidden_act", "silu")  # the MLP activation and the mixer's conv activation
    r.expect("mamba_proj_bias", False)
    r.expect("attention_bias", False)
    r.expect("mlp_bias", False)
    for k in ("z_loss_coefficient", "num_logits_to_keep"):  # training loss / generation only
        r.get(k)
    try:
        theta, scaling, partial = common.rope_from_hf(r)
    except common.CheckpointError as e:
        raise CheckpointError(f"{r.source}: {e}") from e
    if scaling is not None:
        raise CheckpointError(f"{r.source}: Bamba supports only the default RoPE")
    if partial not in (None, PARTIAL_ROTARY):
        raise CheckpointError(f"{r.source}: partial_rotary_factor={partial}; Bamba uses {PARTIAL_ROTARY}")
    rotary = int(head_dim * PARTIAL_ROTARY)
    # written by the mamba_ssm -> HF conversion (Bamba-9B); BambaConfig does not define it
    r.agree("attn_rotary_emb", rotary, "the rotary width head_dim*partial_rotary_factor")
    if rotary % 2:
        raise CheckpointError(f"{r.source}: head_dim={head_dim} gives an odd rotary width {rotary}")
    F = r.get("intermediate_size", 14336)
    eps = float(r.get("rms_norm_eps", 1e-5))
    blocks = []
    for i in range(L):
        if i in attn:
            blocks.append(AttentionBlock(i, rotary // 2, head_dim - rotary, head_dim))
        else:
            blocks.append(Mamba2Block(i, N, P))
        blocks.append(MLPBlock(i, F))
    return ModelConfig(
        arch="bamba", vocab_size=r.require("vocab_size"), hidden_size=D, blocks=tuple(blocks),
        rms_norm_eps=eps, tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
        pad_token_id=r.get("pad_token_id"), bos_token_id=r.get("bos_token_id"), eos_token_id=r.get("eos_token_id"),
        max_position_embeddings=int(r.get("max_position_embeddings", 262144)),
        num_heads=nA, num_kv_heads=nK, head_dim=head_dim, rotary_dim=rotary, rope_theta=theta,
        intermediate_size=F, mlp_activation="silu_gated",
        ssm_heads=H, ssm_head_dim=P, ssm_groups=Rg, ssm_state=N, conv_kernel=int(r.get("mamba_d_conv", 4)),
        ssm_chunk_size=int(r.get("mamba_chunk_size", 256)),
        time_step_limit=mamba2.time_step_limit_from_hf(r.get("time_step_limit")),
        ssm_norm_eps=eps, conv_bias=bool(r.get("mamba_conv_bias", True)))


def config_to_hf(cfg: ModelConfig) -> dict:
    mamba2.check_uniform_eps(cfg)
    if cfg.rope_scaling:
        raise CheckpointError("Bamba supports only the default RoPE")
    if cfg.rotary_dim != int(cfg.head_dim * PARTIAL_ROTARY):
        raise CheckpointError(f"Bamba rotates half of each head; got rotary_dim={cfg.rotary_dim}, head_dim={cfg.head_dim}")
    if cfg.ssm_heads * cfg.ssm_head_dim % cfg.hidden_size:
        raise CheckpointError(f"BambaConfig needs mamba heads*head_dim ({cfg.ssm_heads}*{cfg.ssm_head_dim}) to be a "
                              f"multiple of hidden_size ({cfg.hidden_size})")
    raw = {
        "model_type": "bamba", "architectures": ["BambaForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "attn_layer_indices": sorted({b.layer for b in cfg.blocks if b.kind == "attention"}),
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "mamba_n_heads": cfg.ssm_heads, "mamba_d_head": cfg.ssm_head_dim, "mamba_n_groups": cfg.ssm_groups,
        "mamba_d_state": cfg.ssm_state, "mamba_d_conv": cfg.conv_kernel,
        "mamba_expand": cfg.ssm_heads * cfg.ssm_head_dim // cfg.hidden_size, "mamba_chunk_size": cfg.ssm_chunk_size,
        "mamba_conv_bias": cfg.conv_bias, "mamba_proj_bias": False, "time_step_limit": list(cfg.time_step_limit),
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": PARTIAL_ROTARY},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        raw["head_dim"] = cfg.head_dim
    return raw


def params_from_hf(cfg: ModelConfig, take) -> dict:
    return mamba2.stack_from_hf(cfg, take, names, EMBED, FINAL_NORM, HEAD)


def params_to_hf(cfg: ModelConfig, params: dict) -> dict:
    return mamba2.stack_to_hf(cfg, params, names, EMBED, FINAL_NORM, HEAD)
