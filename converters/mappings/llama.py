"""LlamaForCausalLM and Qwen2ForCausalLM (same stack; Qwen-2.5 adds q/k/v biases).

Each HF decoder layer ``model.layers.{i}`` becomes two blocks: attention
(``input_layernorm`` + ``self_attn``) and MLP (``post_attention_layernorm`` + ``mlp``).
"""

from __future__ import annotations

from converters.mappings import common
from uniql_jax.config import AttentionBlock, MLPBlock, ModelConfig

EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def names(blk) -> dict:
    pre = f"model.layers.{blk.layer}."
    if blk.kind == "attention":
        return {"norm": pre + "input_layernorm.weight", "q": pre + "self_attn.q_proj", "k": pre + "self_attn.k_proj",
                "v": pre + "self_attn.v_proj", "o": pre + "self_attn.o_proj"}
    return {"norm": pre + "post_attention_layernorm.weight", "gate": pre + "mlp.gate_proj",
            "up": pre + "mlp.up_proj", "down": pre + "mlp.down_proj"}


def sliding_layers(r, L: int):
    """Qwen2's per-layer attention kinds, derived as Qwen2Config does; any sliding layer is refused."""
    use_window, window = r.get("use_sliding_window", False), r.get("sliding_window")
    first = r.get("max_window_layers", 28)
    types = r.get("layer_types")
    if types is None:
        types = ["sliding_attention" if use_window and window is not None and i >= first else "full_attention"
                 for i in range(L)]
    if len(types) != L:
        raise common.CheckpointError(f"{r.source}: {len(types)} layer_types for num_hidden_layers={L}")
    sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    if sliding:
        raise common.CheckpointError(
            f"{r.source}: unsupported sliding-window attention on layer(s) {sliding[:4]}{' ...' if len(sliding) > 4 else ''} "
            f"(use_sliding_window={use_window}, sliding_window={window}, max_window_layers={first}, "
            f"layer_types={sorted(set(types))})")


def config_from_hf(r, model_type: str) -> ModelConfig:
    D, H = r.require("hidden_size"), r.require("num_attention_heads")
    K = r.get("num_key_value_heads") or H
    head_dim = r.get("head_dim") or D // H
    L, F = r.require("num_hidden_layers"), r.require("intermediate_size")
    r.expect("hidden_act", "silu")
    if model_type == "llama":
        r.expect("pretraining_tp", 1)
        r.expect("mlp_bias", False)
        # not a LlamaConfig attribute (nanotron's export writes it): True would mean GPT-J interleaved
        # rotary pairs, which neither transformers' Llama nor we compute
        r.expect("rope_interleaved", False)
        bias = bool(r.get("attention_bias", False))
    else:  # qwen2: biases on q/k/v only; sliding windows are not implemented
        bias = True
        # not a Qwen2Config attribute (Qwen2-VL's multimodal RoPE flag): True needs 3-D positions
        r.expect("use_mrope", False)
        sliding_layers(r, L)
    try:
        theta, scaling, partial = common.rope_from_hf(r)
    except common.CheckpointError as e:
        raise common.CheckpointError(f"{r.source}: {e}") from e
    if partial not in (None, 1.0):
        raise common.CheckpointError(f"{r.source}: unsupported partial_rotary_factor={partial}")
    if H % K:
        raise common.CheckpointError(f"{r.source}: num_attention_heads={H} not a multiple of num_key_value_heads={K}")
    blocks = []
    for i in range(L):
        blocks += [AttentionBlock(i, head_dim // 2, head_dim % 2, head_dim), MLPBlock(i, F)]
    return ModelConfig(
        arch=model_type, vocab_size=r.require("vocab_size"), hidden_size=D, blocks=tuple(blocks),
        rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
        pad_token_id=r.get("pad_token_id"), bos_token_id=r.get("bos_token_id"), eos_token_id=r.get("eos_token_id"),
        max_position_embeddings=int(r.get("max_position_embeddings", 2048)),
        num_heads=H, num_kv_heads=K, head_dim=head_dim, rotary_dim=2 * (head_dim // 2), rope_theta=theta,
        rope_scaling=scaling, attention_bias=bias, intermediate_size=F, mlp_activation="silu_gated")


def config_to_hf(cfg: ModelConfig) -> dict:
    raw = {
        "model_type": cfg.arch, "architectures": ["LlamaForCausalLM" if cfg.arch == "llama" else "Qwen2ForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_parameters": common.rope_to_hf(cfg),
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }
    if cfg.arch == "llama":
        raw.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    return raw


def params_from_hf(cfg: ModelConfig, take) -> dict:
    params = common.embed_from_hf(cfg, take, EMBED, HEAD)
    params["blocks"] = [(common.attention_from_hf if b.kind == "attention" else common.mlp_from_hf)(cfg, b, take, names(b))
                        for b in cfg.blocks]
    params["final_norm"] = take(FINAL_NORM, (cfg.hidden_size,))
    return params


def params_to_hf(cfg: ModelConfig, params: dict) -> dict:
    out = common.embed_to_hf(cfg, params, EMBED, HEAD)
    for b, p in zip(cfg.blocks, params["blocks"]):
        out.update((common.attention_to_hf if b.kind == "attention" else common.mlp_to_hf)(cfg, b, p, names(b)))
    out[FINAL_NORM] = params["final_norm"]
    return out
