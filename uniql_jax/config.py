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


# ----- full-rank configs from a layer pattern --------------------------------

# the rotary channels per head of each arch (Nemotron-H attention has no position encoding, Bamba rotates half)
_ROTARY = {"mamba2": lambda hd: 0, "nemotron_h": lambda hd: 0, "bamba": lambda hd: hd // 2}


def layout_config(arch: str, *, layers: int | None = None, pattern: str | None = None, **fields) -> ModelConfig:
    """A full-rank ModelConfig of `arch` from its decoder layout and geometry `fields` (ModelConfig keywords).

    llama / qwen2: `layers` x (attention, MLP); mamba2: `layers` Mamba2 blocks; nemotron_h: one
    block per letter of `pattern` (M Mamba2, * attention, - MLP); bamba: a mixer per letter (M or
    *), each followed by an MLP. Every block is full rank (attention: rotary_dim / 2 pairs and
    head_dim - rotary_dim pass-through channels; MLP: intermediate_size; Mamba2: ssm_state,
    ssm_head_dim). Defaults that follow from the arch: `rotary_dim` (head_dim; 0 for nemotron_h,
    head_dim / 2 for bamba) and nemotron_h's relu2 MLP.
    """
    hd = fields.get("head_dim", 0)
    fields.setdefault("rotary_dim", _ROTARY.get(arch, lambda d: d)(hd))
    if arch == "nemotron_h":
        fields.setdefault("mlp_activation", "relu2")
    rot = fields["rotary_dim"]
    make = {"*": lambda i: AttentionBlock(i, rot // 2, hd - rot, hd),
            "-": lambda i: MLPBlock(i, fields["intermediate_size"]),
            "M": lambda i: Mamba2Block(i, fields["ssm_state"], fields["ssm_head_dim"])}
    if arch in ("llama", "qwen2", "mamba2"):
        pattern = ("M" if arch == "mamba2" else "*-") * layers
        blocks = [make[c](i // (1 if arch == "mamba2" else 2)) for i, c in enumerate(pattern)]
    elif set(pattern) - set(make) or (arch == "bamba" and "-" in pattern):
        raise ValueError(f"bad --pattern {pattern!r} for {arch}")
    elif arch == "nemotron_h":
        blocks = [make[c](i) for i, c in enumerate(pattern)]
    else:
        blocks = [b for i, c in enumerate(pattern) for b in (make[c](i), make["-"](i))]
    return ModelConfig(arch=arch, blocks=tuple(blocks), **fields)


# ----- JSON (de)serialization (checkpoints) ---------------------------------

BLOCK_TYPES = {cls.__dataclass_fields__["kind"].default: cls for cls in (AttentionBlock, MLPBlock, Mamba2Block)}


def _json_value(value):
    """Tuples -> lists, recursively (JSON has no tuples); other values unchanged."""
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


def _tuple_value(value):
    """Lists -> tuples, recursively: the inverse of `_json_value` (configs are hashable)."""
    if isinstance(value, list):
        return tuple(_tuple_value(v) for v in value)
    return value


def block_to_dict(block: BlockConfig) -> dict:
    return {f.name: getattr(block, f.name) for f in dataclasses.fields(block)}


def block_from_dict(d: dict) -> BlockConfig:
    """A block config from `block_to_dict` output; raises ValueError naming what is wrong."""
    if not isinstance(d, dict) or d.get("kind") not in BLOCK_TYPES:
        raise ValueError(f"not a block config (need 'kind' in {sorted(BLOCK_TYPES)}): {d!r}")
    cls = BLOCK_TYPES[d["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = set(d) - names, {f.name for f in dataclasses.fields(cls) if f.name not in d and f.name != "kind"}
    if unknown or missing:
        raise ValueError(f"{d['kind']} block: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    for name in names - {"kind"}:
        if not isinstance(d[name], int) or isinstance(d[name], bool):
            raise ValueError(f"{d['kind']} block field {name!r} must be an int, got {d[name]!r}")
    return cls(**d)


def config_to_dict(cfg: ModelConfig) -> dict:
    """A JSON-serializable dict of every field; `config_from_dict` inverts it exactly.

    Non-finite floats (``time_step_limit``'s inf) stay floats: Python's json writes
    and reads them as ``Infinity``. ``extra`` values must be JSON values themselves.
    """
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "blocks":
            out[f.name] = [block_to_dict(b) for b in value]
        else:
            out[f.name] = _json_value(value)
    return out


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `config_to_dict`; raises ValueError on unknown, missing or ill-typed fields."""
    if not isinstance(d, dict):
        raise ValueError(f"a model config must be a dict, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown model config fields: {sorted(unknown)}")
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if required - set(d):
        raise ValueError(f"missing model config fields: {sorted(required - set(d))}")
    if not isinstance(d["blocks"], list):
        raise ValueError("model config field 'blocks' must be a list")
    kw = {name: _tuple_value(value) for name, value in d.items() if name != "blocks"}
    kw["blocks"] = tuple(block_from_dict(b) for b in d["blocks"])
    return ModelConfig(**kw)
