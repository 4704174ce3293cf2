"""Tiny configs of all five architectures and random parameters with non-trivial scales.

Shared by the tests of uniql_jax.compress (imported by basename: pytest puts this
folder on sys.path, there is no __init__.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig
from uniql_jax.models.stacks import init_params

V, D = 53, 32
ATTN = dict(num_heads=4, num_kv_heads=2, head_dim=8)  # GQA: 2 query heads per kv head
SSM = dict(ssm_heads=4, ssm_head_dim=6, ssm_groups=2, ssm_state=8, conv_kernel=3, ssm_chunk_size=8)


def tiny_config(arch: str) -> ModelConfig:
    """Two or three decoder layers of each arch, every block kind its arch uses.

    llama: GQA with full RoPE (llama_mha: one decoder layer of MHA); qwen2: + q/k/v biases; mamba2: SSM only;
    nemotron_h: Mamba2 / attention without RoPE / ReLU² MLP layers; bamba: Mamba2 and
    partial-rotary attention mixers, each followed by a gated MLP.
    """
    hd = ATTN["head_dim"]
    if arch == "llama_mha":  # multi-head attention: one query head per kv head
        blocks = (AttentionBlock(0, hd // 2, 0, hd), MLPBlock(0, 40))
        return ModelConfig(arch="llama", vocab_size=V, hidden_size=D, blocks=blocks, rotary_dim=hd, intermediate_size=40,
                           **{**ATTN, "num_kv_heads": ATTN["num_heads"]})
    if arch in ("llama", "qwen2"):
        blocks = [b for i in range(2) for b in (AttentionBlock(i, hd // 2, 0, hd), MLPBlock(i, 40))]
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, blocks=tuple(blocks), rotary_dim=hd,
                           attention_bias=arch == "qwen2", intermediate_size=40, **ATTN)
    if arch == "mamba2":
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, blocks=(Mamba2Block(0, 8, 6), Mamba2Block(1, 8, 6)),
                           tie_word_embeddings=True, **SSM)
    if arch == "nemotron_h":
        blocks = (Mamba2Block(0, 8, 6), AttentionBlock(1, 0, hd, hd), MLPBlock(2, 40), Mamba2Block(3, 8, 6))
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, blocks=blocks, rotary_dim=0, intermediate_size=40,
                           mlp_activation="relu2", **ATTN, **SSM)
    if arch == "bamba":
        rot = hd // 2  # partial rotary: 2 pairs rotated, 4 channels passed through
        blocks = (Mamba2Block(0, 8, 6), MLPBlock(0, 40), AttentionBlock(1, rot // 2, hd - rot, hd), MLPBlock(1, 40))
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, blocks=blocks, rotary_dim=rot, intermediate_size=40,
                           **ATTN, **SSM)
    raise ValueError(arch)


KEEP_INIT = ("A_log", "dt_bias", "D", "pair_index")  # their init is already meaningful (or they are indices)


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.25) -> dict:
    """init_params with every weight, norm and bias replaced by N(0, scale²) draws (norms around 1)."""
    params = init_params(cfg, seed)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in KEEP_INIT:
            return leaf
        if "norm" in name:
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


def tokens(n: int, t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (n, t)).astype(np.int32)


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


ARCH_NAMES = ("llama", "qwen2", "mamba2", "nemotron_h", "bamba")
CALIB = dict(n=6, t=24, seed=1)


@functools.lru_cache(maxsize=None)
def sorted_model(arch: str):
    """(cfg, original params, sorted params, calibration tokens) of the tiny `arch`, sorted once per session."""
    from uniql_jax.compress.sort import sort

    cfg = tiny_config(arch)
    params = random_params(cfg)
    calib = tokens(CALIB["n"], CALIB["t"], CALIB["seed"])
    _, params_sorted = sort(cfg, params, calib, progress=False, batch_size=4)
    return cfg, params, params_sorted, calib
