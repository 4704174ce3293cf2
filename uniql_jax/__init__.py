"""uniql-jax: compress an LLM once into a 4-bit checkpoint prunable at load time (UniQL in JAX).

The public API (docs/api.md); re-exports only.
"""

from uniql_jax.checkpoint import load, save
from uniql_jax.compress.allocate import allocate
from uniql_jax.compress.prune import prune
from uniql_jax.compress.sort import sort
from uniql_jax.config import ARCHS, AttentionBlock, Mamba2Block, MLPBlock, ModelConfig
from uniql_jax.elastic import ElasticModel
from uniql_jax.eval import perplexity
from uniql_jax.inference import decode_step, forward, generate
from uniql_jax.models.cache import init_cache
from uniql_jax.models.stacks import init_params
from uniql_jax.quant.quantize import quantize

__all__ = [
    "ARCHS", "AttentionBlock", "MLPBlock", "Mamba2Block", "ModelConfig",
    "save", "load", "ElasticModel",
    "sort", "allocate", "prune", "quantize", "perplexity",
    "forward", "decode_step", "generate", "init_cache", "init_params",
]
