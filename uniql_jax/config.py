"""Model configuration: the architecture as a frozen, hashable dataclass.

A model is a flat sequence of *blocks*; each block is ``x + mixer(norm(x))``.
A Llama decoder layer is two blocks (attention, MLP), a Mamba2 layer is one
block, a Nemotron-H layer is one block of any kind, a Bamba layer is a Mamba2 or
attention block followed by an MLP block. ``BlockConfig.layer`` keeps the index
of the Hugging Face decoder layer the block came from.

Every prunable size is a field of its block, so a pruned model is a model built
from a smaller config. The geometry that is never pruned (hidden size, head
counts, groups, conv kernel, ...) lives in ``ModelConfig``.

Shape letters used across the code base:
  B batch, T query tokens, S key tokens, D hidden, V vocab,
  K kv heads, G query heads per kv head, P rotary pairs kept per head,
  E non-rotary (pass-through) head channels kept, R v/o rank kept per kv head,
  F MLP width kept, H SSM heads, C SSM head_dim kept, N SSM d_state kept,
  R_g SSM groups, W conv kernel width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Union

ARCHS = ("llama", "qwen2", "mamba2", "nemotron_h", "bamba")


@dataclass(frozen=True)
class AttentionBlock:
    layer: int  # index of the HF decoder layer this block belongs to
    qk_pairs: int  # rotary (i, i + half) channel pairs kept per q/k head
    qk_pass: int  # non-rotary q/k channels kept per head (partial rotary or no RoPE)
    vo_rank: int  # rank of the v/o product kept per kv head
    kind: Literal["attention"] = "attention"


@dataclass(frozen=True)
class MLPBlock:
    layer: int  # index of the HF decoder layer this block belongs to
    width: int  # intermediate channels kept
    kind: Literal["mlp"] = "mlp"


@dataclass(frozen=True)
class Mamba2Block:
    layer: int  # index of the HF decoder layer this block belongs to
    d_state: int  # SSM state size kept per group (shared by B and C)
    head_dim: int  # channels kept per SSM head (z, x, gated norm, out_proj)
    kind: Literal["mamba2"] = "mamba2"


BlockConfig = Union[AttentionBlock, MLPBlock, Mamba2Block]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Frozen and hashable: it is a static jit argument."""

    arch: str  # one of ARCHS
    vocab_size: int  # V
    hidden_size: int  # D, never pruned
    blocks: tuple[BlockConfig, ...]  # the model body, in order
    rms_norm_eps: float = 1e-5  # eps of every RMSNorm (block norms, final norm)
    tie_word_embeddings: bool = False  # lm_head is embed.T
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    max_position_embeddings: int = 2048
    # attention geometry (unpruned)
    num_heads: int = 0  # query heads
    num_kv_heads: int = 0  # K
    head_dim: int = 0  # original head_dim; the softmax scale stays 1/sqrt(head_dim)
    rotary_dim: int = 0  # channels per head that RoPE rotates (0: no RoPE)
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3 scaling, as sorted items
    attention_bias: bool = False  # q/k/v biases (Qwen-2.5)
    # MLP
    intermediate_size: int = 0  # MLP width at full rank
    mlp_activation: Literal["silu_gated", "relu2"] = "silu_gated"
    # Mamba2 geometry (unpruned)
    ssm_heads: int = 0  # H
    ssm_head_dim: int = 0  # original head_dim
    ssm_groups: int = 1  # groups sharing B and C
    ssm_state: int = 0  # original d_state
    conv_kernel: int = 4  # W
    ssm_chunk_size: int = 256  # chunk length of the SSD prefill scan
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    ssm_norm_eps: float = 1e-5  # eps of the gated RMSNorm
    conv_bias: bool = True
    # provenance of the HF config for round trips (sorted items, informational only)
    extra: tuple[tuple[str, object], ...] = field(default=(), compare=False, hash=False)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")

    # ----- derived geometry -------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        """G: query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_pairs(self) -> int:
        """Rotary pairs per head at full rank."""
        return self.rotary_dim // 2

    @property
    def pass_dim(self) -> int:
        """Non-rotary channels per head at full rank."""
        return self.head_dim - self.rotary_dim

    @property
    def ssm_heads_per_group(self) -> int:
        return self.ssm_heads // self.ssm_groups

    @property
    def num_layers(self) -> int:
        return 1 + max((b.layer for b in self.blocks), default=-1)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_blocks(self, blocks) -> "ModelConfig":
        return dataclasses.replace(self, blocks=tuple(blocks))

    def is_full_rank(self) -> bool:
        return self.blocks == full_rank_blocks(self)


def full_rank_block(cfg: ModelConfig, block: BlockConfig) -> BlockConfig:
    """The unpruned sizes of a block of this geometry."""
    if block.kind == "attention":
        return AttentionBlock(block.layer, cfg.rotary_pairs, cfg.pass_dim, cfg.head_dim)
    if block.kind == "mamba2":
        return Mamba2Block(block.layer, cfg.ssm_state, cfg.ssm_head_dim)
    return MLPBlock(block.layer, cfg.intermediate_size)


def full_rank_blocks(cfg: ModelConfig) -> tuple[BlockConfig, ...]:
    return tuple(full_rank_block(cfg, b) for b in cfg.blocks)
