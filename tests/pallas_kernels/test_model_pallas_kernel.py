"""A 4-bit, pruned Llama-style model gives the same logits with impl="pallas" (fused RoPE +
W4A16 kernels through `packed_einsum`, interpret mode) as with impl="xla", and the dispatch
log shows the kernels, not a fallback to the reference, computed them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.testing import assert_close, jit_fast
from uniql_jax.config import AttentionBlock, MLPBlock, ModelConfig
from uniql_jax.models import stacks
from uniql_jax.quant import rtn
from uniql_jax.quant.formats import qarray

# quantized (contraction) axis of each block weight, as the models lay them out
QUANT_AXIS = {"q": 0, "k": 0, "v": 0, "o": 2, "up": 0, "gate": 0, "down": 0}


@pytest.mark.slow  # ~15 s of CPU per dtype (model init + op-by-op quantization + two compiles)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_quantized_pruned_model_pallas_equals_xla(dtype):
    # head_dim 32 = 16 pairs, pruned to 12 (not a power of two); G = 2 query heads per kv head
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                      rotary_dim=32, intermediate_size=256, blocks=(AttentionBlock(0, 12, 0, 32), MLPBlock(0, 256)))
    params = stacks.init_params(cfg, seed=0, dtype=dtype)
    params["blocks"] = [{name: rtn.quantize_rtn(w, bits=4, group_size=32, axis=QUANT_AXIS[name])
                         if name in QUANT_AXIS else w for name, w in block.items()} for block in params["blocks"]]
    params["lm_head"] = rtn.quantize_rtn(params["lm_head"], bits=4, group_size=32, axis=0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 5)))
    positions = jnp.asarray(rng.integers(0, 2000, (2, 1))) + jnp.arange(5)  # per-sequence offsets

    def logits(params, tokens, positions, impl):
        return stacks.bind(cfg, params)(tokens, positions, impl=impl)[0]

    run = jit_fast(logits, static_argnames=("impl",))
    want = np.asarray(run(params, tokens, positions, "xla"), np.float64)
    with common.dispatch_log() as log:
        got = run(params, tokens, positions, "pallas")
    # every packed product and the RoPE on the kernels: q, k, v, o, gate, up, down, lm_head
    assert log.counts == {"w4a16/pallas": 8, "rope/pallas": 1}, log.as_dict()
    # bf16: rounding of intermediate activations may differ between the fused and XLA orders
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2 * np.abs(want).max(), rtol=0)
    assert_close(got, want, **tol, what="logits")


@pytest.mark.slow  # interpret-mode kernels over a whole (tiny) trained model
def test_default_model_pruned_and_quantized_pallas_equals_xla():
    """The embedded llama default, sorted order kept, W4 (GPTQ-format packing via the driver's RTN
    path) and pruned at 25 % through a uniform table: kernels == reference."""
    from converters import hf
    from uniql_jax.compress.prune import prune
    from uniql_jax.inference import forward
    from uniql_jax.paths import DEFAULTS
    from uniql_jax.pipeline import uniform_table
    from uniql_jax.quant.quantize import rtn_quantize_model

    cfg, params = hf.load(DEFAULTS / "llama")
    table = uniform_table(cfg, [0.25])
    cfg_p, params_p = prune(cfg, rtn_quantize_model(cfg, params, table, bits=4, group_size=32)[0], 0.25, table)
    assert any(qarray.is_qarray(x) for x in jax_leaves(params_p))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    want = np.asarray(forward(cfg_p, params_p, tokens, impl="xla"), np.float64)
    with common.dispatch_log() as log:
        got = forward(cfg_p, params_p, tokens, impl="pallas")
    # the kernels ran (every layer's RoPE and packed products), and nothing fell back
    assert set(log.counts) == {"w4a16/pallas", "rope/pallas"} and log.ran("rope", "pallas") > 0, log.as_dict()
    assert_close(got, want, atol=1e-4 * np.abs(want).max(), rtol=0, what="logits")


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree, is_leaf=qarray.is_qarray)
