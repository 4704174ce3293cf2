"""Mamba2ForCausalLM, and the Mamba2 mixer hooks shared with Nemotron-H and Bamba.

HF mixer tensors (I = H·P inner width, G = R_g·N):
  in_proj.weight  [2I + 2G + H, D]   rows packed [z (I) | x (I) | B (G) | C (G) | dt (H)]
  conv1d.weight   [I + 2G, 1, W]     depthwise taps over [x | B | C];  conv1d.bias [I + 2G]
  dt_bias, A_log, D [H];  norm.weight [I] (gated RMSNorm);  out_proj.weight [D, I]
Channel i of x/z/norm/out_proj is (head i // P, channel i % P); channel j of B/C is
(group j // N, state j % N). Our layout: see uniql_jax/models/mamba2.py.

Each HF layer ``backbone.layers.{i}`` (``norm`` + ``mixer``) is one Mamba2 block.
"""

from __future__ import annotations

import math

import numpy as np

from converters.mappings import common
from uniql_jax.config import Mamba2Block, ModelConfig

CheckpointError = common.CheckpointError
EMBED, FINAL_NORM, HEAD = "backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"
LEGACY_EMBED = "backbone.embedding.weight"  # older checkpoints; transformers renames it on load


# ----------------------------------------------------------------------------- mixer hooks
def mixer_from_hf(cfg: ModelConfig, blk: Mamba2Block, take, names: dict) -> dict:
    """names: norm (the block pre-norm tensor), mixer (prefix of the mixer tensors, ending in '.')."""
    Dm, H, P, Rg, N, W = cfg.hidden_size, cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_groups, cfg.ssm_state, cfg.conv_kernel
    I, G = H * P, Rg * N
    m = names["mixer"]
    p = {"norm": take(names["norm"], (Dm,))}
    in_w = take(m + "in_proj.weight", (2 * I + 2 * G + H, Dm)).T  # [D, proj]
    z, x, B, C, dt = np.split(in_w, np.cumsum([I, I, G, G]), axis=1)
    p.update(z=z.reshape(Dm, H, P), x=x.reshape(Dm, H, P), B=B.reshape(Dm, Rg, N), C=C.reshape(Dm, Rg, N), dt=dt)
    taps = take(m + "conv1d.weight", (I + 2 * G, 1, W))[:, 0, :].T  # [W, I + 2G]
    cx, cB, cC = np.split(taps, [I, I + G], axis=1)
    p.update(conv_x=cx.reshape(W, H, P), conv_B=cB.reshape(W, Rg, N), conv_C=cC.reshape(W, Rg, N))
    if cfg.conv_bias:
        bx, bB, bC = np.split(take(m + "conv1d.bias", (I + 2 * G,)), [I, I + G])
        p.update(conv_x_bias=bx.reshape(H, P), conv_B_bias=bB.reshape(Rg, N), conv_C_bias=bC.reshape(Rg, N))
    for name in ("dt_bias", "A_log", "D"):
        p[name] = take(m + name, (H,))
    p["gnorm"] = take(m + "norm.weight", (I,)).reshape(H, P)
    p["out"] = take(m + "out_proj.weight", (Dm, I)).T.reshape(H, P, Dm)
    return p


def mixer_to_hf(cfg: ModelConfig, blk: Mamba2Block, p: dict, names: dict) -> dict:
    if (blk.d_state, blk.head_dim) != (cfg.ssm_state, cfg.ssm_head_dim):
        raise CheckpointError(f"layer {blk.layer}: a pruned Mamba2 block (d_state={blk.d_state}, "
                              f"head_dim={blk.head_dim}) has no Hugging Face equivalent")
    Dm, W = cfg.hidden_size, cfg.conv_kernel
    m = names["mixer"]
    flat = lambda a, lead: a.reshape(lead + (-1,))  # noqa: E731  [..., a, b] -> [..., a*b]
    out = {names["norm"]: p["norm"]}
    out[m + "in_proj.weight"] = np.concatenate(
        [flat(p["z"], (Dm,)), flat(p["x"], (Dm,)), flat(p["B"], (Dm,)), flat(p["C"], (Dm,)), p["dt"]], axis=1).T
    taps = np.concatenate([flat(p["conv_x"], (W,)), flat(p["conv_B"], (W,)), flat(p["conv_C"], (W,))], axis=1)
    out[m + "conv1d.weight"] = taps.T[:, None, :]
    if cfg.conv_bias:
        out[m + "conv1d.bias"] = np.concatenate([p["conv_x_bias"].ravel(), p["conv_B_bias"].ravel(), p["conv_C_bias"].ravel()])
    for name in ("dt_bias", "A_log", "D"):
        out[m + name] = p[name]
    out[m + "norm.weight"] = p["gnorm"].ravel()
    out[m + "out_proj.weight"] = p["out"].reshape(-1, Dm).T
    return out


# ----------------------------------------------------------------------------- config helpers
def float_from_json(v):
    """transformers writes inf as {"__float__": "Infinity"}; plain JSON readers give floats."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        return float(v["__float__"])
    return float(v)


def time_step_limit_from_hf(value) -> tuple[float, float]:
    if value is None:
        return (0.0, math.inf)
    if len(value) != 2:
        raise CheckpointError(f"time_step_limit must be a pair, got {value!r}")
    lo, hi = (float_from_json(v) for v in value)
    if not lo <= hi:
        raise CheckpointError(f"time_step_limit {value!r}: lower bound above upper bound")
    return (lo, hi)


def check_ssm_geometry(source: str, hidden: int, expand, heads: int, head_dim: int, groups: int):
    """The mixer width must be heads x head_dim (= expand x hidden where HF derives it so)."""
    if expand is not None and expand * hidden != heads * head_dim:
        raise CheckpointError(f"{source}: expand*hidden_size ({expand}*{hidden}) != num_heads*head_dim "
                              f"({heads}*{head_dim})")
    if groups < 1 or heads % groups:
        raise CheckpointError(f"{source}: {heads} Mamba heads are not divisible into n_groups={groups}")


# ----------------------------------------------------------------------------- Mamba2ForCausalLM
def names(blk) -> dict:
    pre = f"backbone.layers.{blk.layer}."
    return {"norm": pre + "norm.weight", "mixer": pre + "mixer."}


def config_from_hf(r, model_type: str) -> ModelConfig:
    D, H, P = r.require("hidden_size"), r.require("num_heads"), r.require("head_dim")
    Rg, N, L = r.require("n_groups"), r.require("state_size"), r.require("num_hidden_layers")
    check_ssm_geometry(r.source, D, r.get("expand", 2), H, P, Rg)
    r.expect("hidden_act", "silu")
    r.expect("use_bias", False)
    # initialization-only or precision-only knobs (the float32 residual is a no-op in float32);
    # time_step_init_scheme / time_step_scale are mamba_ssm's dt initialization, not Mamba2Config attributes
    r.inert("time_step_rank", "time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual",
            "residual_in_fp32", "time_step_init_scheme", "time_step_scale")
    # mamba_ssm attributes Mamba2Config does not define, checked where their meaning is certain:
    # rms_norm=False would be LayerNorm block norms (transformers always uses RMSNorm), and
    # intermediate_size (Mamba-Codestral writes it) restates the mixer width.
    r.expect("rms_norm", True)
    r.agree("intermediate_size", H * P, "the mixer width num_heads*head_dim")
    # norm_before_gate is deliberately not checked: transformers' Mamba2 always gates before the norm
    # (mamba_ssm's norm_before_gate=False), and Mamba-Codestral-7B-v0.1 publishes norm_before_gate=true
    # while its reference code (mistral_inference -> mamba_ssm Mamba2 defaults) gates before the norm too.
    # Like every attribute transformers' class does not define, it is accepted and logged.
    eps = float(r.get("layer_norm_epsilon", 1e-5))
    return ModelConfig(
        arch="mamba2", vocab_size=r.require("vocab_size"), hidden_size=D,
        blocks=tuple(Mamba2Block(i, N, P) for i in range(L)),
        rms_norm_eps=eps, tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
        pad_token_id=r.get("pad_token_id"), bos_token_id=r.get("bos_token_id"), eos_token_id=r.get("eos_token_id"),
        ssm_heads=H, ssm_head_dim=P, ssm_groups=Rg, ssm_state=N, conv_kernel=int(r.get("conv_kernel", 4)),
        ssm_chunk_size=int(r.get("chunk_size", 256)), time_step_limit=time_step_limit_from_hf(r.get("time_step_limit")),
        ssm_norm_eps=eps, conv_bias=bool(r.get("use_conv_bias", True)))


def check_uniform_eps(cfg: ModelConfig):
    if cfg.ssm_norm_eps != cfg.rms_norm_eps:
        raise CheckpointError(f"{cfg.arch} uses one epsilon for all norms; got {cfg.rms_norm_eps} and {cfg.ssm_norm_eps}")


def config_to_hf(cfg: ModelConfig) -> dict:
    check_uniform_eps(cfg)
    if cfg.ssm_heads * cfg.ssm_head_dim % cfg.hidden_size:
        raise CheckpointError(f"Mamba2Config needs heads*head_dim ({cfg.ssm_heads}*{cfg.ssm_head_dim}) to be a "
                              f"multiple of hidden_size ({cfg.hidden_size})")
    return {
        "model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_heads": cfg.ssm_heads,
        "head_dim": cfg.ssm_head_dim, "expand": cfg.ssm_heads * cfg.ssm_head_dim // cfg.hidden_size,
        "n_groups": cfg.ssm_groups, "state_size": cfg.ssm_state, "conv_kernel": cfg.conv_kernel,
        "chunk_size": cfg.ssm_chunk_size, "time_step_limit": list(cfg.time_step_limit),
        "layer_norm_epsilon": cfg.rms_norm_eps, "use_conv_bias": cfg.conv_bias, "use_bias": False,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }


# ----------------------------------------------------------------------------- the stack (all three archs)
BLOCK_FROM_HF = {"mamba2": mixer_from_hf, "attention": common.attention_from_hf, "mlp": common.mlp_from_hf}
BLOCK_TO_HF = {"mamba2": mixer_to_hf, "attention": common.attention_to_hf, "mlp": common.mlp_to_hf}


def stack_from_hf(cfg: ModelConfig, take, names, embed: str, final_norm: str, head: str) -> dict:
    """Embedding, every block by its kind (tensor names from `names(blk)`), final norm, head."""
    params = common.embed_from_hf(cfg, take, embed, head)
    params["blocks"] = [BLOCK_FROM_HF[b.kind](cfg, b, take, names(b)) for b in cfg.blocks]
    params["final_norm"] = take(final_norm, (cfg.hidden_size,))
    return params


def stack_to_hf(cfg: ModelConfig, params: dict, names, embed: str, final_norm: str, head: str) -> dict:
    out = common.embed_to_hf(cfg, params, embed, head)
    for b, p in zip(cfg.blocks, params["blocks"]):
        out.update(BLOCK_TO_HF[b.kind](cfg, b, p, names(b)))
    out[final_norm] = params["final_norm"]
    return out


def params_from_hf(cfg: ModelConfig, take) -> dict:
    embed = EMBED if take.has(EMBED) or not take.has(LEGACY_EMBED) else LEGACY_EMBED
    return stack_from_hf(cfg, take, names, embed, FINAL_NORM, HEAD)


def params_to_hf(cfg: ModelConfig, params: dict) -> dict:
    return stack_to_hf(cfg, params, names, EMBED, FINAL_NORM, HEAD)
