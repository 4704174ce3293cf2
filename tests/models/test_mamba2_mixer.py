"""Mamba2 mixer: chunked SSD == sequential recurrence, cached decoding == full forward,
masked == sliced, and parity of one block with transformers' Mamba2Mixer (torch path)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from converters.hf import TensorTaker
from converters.mappings.mamba2 import mixer_from_hf
from uniql_jax.config import Mamba2Block, ModelConfig
from uniql_jax.models.mamba2 import Mamba2, init_mamba2_cache, ssd_chunked, ssd_recurrent_step, ssd_sequential


def max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def ssm_config(D=16, H=4, P=6, Rg=2, N=8, W=4, chunk=5, limit=(0.0, math.inf), conv_bias=True):
    return ModelConfig(arch="mamba2", vocab_size=11, hidden_size=D, blocks=(Mamba2Block(0, N, P),),
                       ssm_heads=H, ssm_head_dim=P, ssm_groups=Rg, ssm_state=N, conv_kernel=W,
                       ssm_chunk_size=chunk, time_step_limit=limit, conv_bias=conv_bias)


def build_mixer(cfg, blk, params: dict) -> Mamba2:
    """A Mamba2 block holding `params` (built abstractly: no random init is computed)."""
    m = nnx.eval_shape(lambda: Mamba2(cfg, blk, rngs=nnx.Rngs(0)))
    for k, v in params.items():
        getattr(m, k).set_value(jnp.asarray(v))
    return m


def param_shapes(cfg, blk) -> dict:
    m = nnx.eval_shape(lambda: Mamba2(cfg, blk, rngs=nnx.Rngs(0)))
    return {k[-1]: v.get_value().shape for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def random_value(name: str, shape, rng) -> np.ndarray:
    """A random float32 parameter by its name, so the tests see every parameter (norms, D, biases too):
    norms near 1, A_log and dt_bias in the ranges of real checkpoints, the rest small Gaussians."""
    if name in ("norm", "gnorm", "final_norm"):
        val = 1.0 + 0.3 * rng.standard_normal(shape)
    elif name == "A_log":
        val = rng.uniform(-1.0, 1.5, shape)
    elif name == "dt_bias":
        val = rng.uniform(-4.0, 0.5, shape)
    else:
        val = (0.3 if name.startswith(("conv", "D")) else 0.15) * rng.standard_normal(shape)
    return val.astype(np.float32)


def random_params(cfg, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: random_value(name, shape, rng) for name, shape in param_shapes(cfg, cfg.blocks[0]).items()}


def random_mixer(cfg, seed=0):
    return build_mixer(cfg, cfg.blocks[0], random_params(cfg, seed))


@nnx.jit
def run(m, x, cache=None, mask=None):
    """The block under jit (eager dispatch of the many small ops is far slower on CPU)."""
    return m(x, cache=cache, mask=mask)


# ----------------------------------------------------------------------------- SSD core
def random_ssd_inputs(b=2, T=13, H=6, P=3, Rg=3, N=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, T, H, P))
    dt = np.log1p(np.exp(rng.standard_normal((b, T, H)) - 1.0))  # softplus
    A = -np.exp(rng.standard_normal(H))
    B, C = rng.standard_normal((b, T, Rg, N)), rng.standard_normal((b, T, Rg, N))
    h0 = rng.standard_normal((b, H, P, N))
    return tuple(jnp.asarray(u, jnp.float32) for u in (x, dt, A, B, C, h0))


chunked = jax.jit(ssd_chunked, static_argnums=5)
sequential = jax.jit(ssd_sequential)


@pytest.mark.parametrize("chunk,Rg,with_h0", [
    (1, 1, False), (13, 3, True),  # chunk sizes dividing T = 13
    (5, 6, True), (16, 1, True),  # and not dividing it (16 > T: one padded chunk)
])
def test_chunked_scan_equals_sequential_recurrence(chunk, Rg, with_h0):
    x, dt, A, B, C, h0 = random_ssd_inputs(Rg=Rg)
    h0 = h0 if with_h0 else None
    y_ref, h_ref = sequential(x, dt, A, B, C, h0)
    y, h = chunked(x, dt, A, B, C, chunk, h0)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert max_rel_err(y, y_ref) <= 1e-5
    assert max_rel_err(h, h_ref) <= 1e-5


def test_recurrent_step_is_the_ssm_recurrence():
    """One step written out with explicit loops over heads: h' = exp(dt A) h + dt x B^T, y = h' C."""
    x, dt, A, B, C, h0 = random_ssd_inputs(b=1, T=1, H=4, P=2, Rg=2, N=3)
    y, h = jax.jit(ssd_recurrent_step)(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    x, dt, A, B, C, h0 = (np.asarray(u, np.float64) for u in (x, dt, A, B, C, h0))
    for head in range(4):
        g = head // 2  # 2 heads per group
        h_ref = np.exp(dt[0, 0, head] * A[head]) * h0[0, head] + dt[0, 0, head] * np.outer(x[0, 0, head], B[0, 0, g])
        np.testing.assert_allclose(np.asarray(h[0, head]), h_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(y[0, head]), h_ref @ C[0, 0, g], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- module
@pytest.mark.parametrize("Rg,chunk,conv_bias", [(1, 4, True), (2, 16, False)])  # T = 11: neither divides
def test_cached_decoding_equals_full_forward(Rg, chunk, conv_bias):
    cfg = ssm_config(Rg=Rg, chunk=chunk, limit=(0.02, 0.6), conv_bias=conv_bias)
    m = random_mixer(cfg, seed=Rg)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 11, cfg.hidden_size))
    full, none = run(m, x)
    assert none is None

    # prefill 6 tokens (chunked scan from the empty cache), then one token at a time (recurrent step)
    cache = init_mamba2_cache(cfg, cfg.blocks[0], 2, 16, jnp.float32)
    out, cache = run(m, x[:, :6], cache)
    outs = [out]
    for t in range(6, 11):
        out, cache = run(m, x[:, t:t + 1], cache)
        outs.append(out)
    assert max_rel_err(jnp.concatenate(outs, axis=1), full) <= 1e-5

    # a second multi-token chunk continues from a non-empty cached state and conv window
    cache = init_mamba2_cache(cfg, cfg.blocks[0], 2, 16, jnp.float32)
    a, cache = run(m, x[:, :6], cache)
    b, cache = run(m, x[:, 6:10], cache)
    c, cache = run(m, x[:, 10:11], cache)
    assert max_rel_err(jnp.concatenate([a, b, c], axis=1), full) <= 1e-5


def slice_mixer_params(p: dict, n: int, c: int) -> dict:
    """Leading box of every prunable axis: d_state -> n, head_dim -> c."""
    by_c = {"z": np.s_[:, :, :c], "x": np.s_[:, :, :c], "conv_x": np.s_[:, :, :c], "conv_x_bias": np.s_[:, :c],
            "gnorm": np.s_[:, :c], "out": np.s_[:, :c, :]}
    by_n = {"B": np.s_[..., :n], "C": np.s_[..., :n], "conv_B": np.s_[..., :n], "conv_C": np.s_[..., :n],
            "conv_B_bias": np.s_[..., :n], "conv_C_bias": np.s_[..., :n]}
    return {k: v[by_c.get(k, by_n.get(k, np.s_[...]))] for k, v in p.items()}


def assert_same(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("n,c", [(3, 4), (8, 1)])
def test_masked_equals_sliced(n, c):
    """Also defect 2 of the reference: a gated norm over the full group (masked zeros counted)
    would scale the masked output by sqrt(kept / full) and fail this comparison."""
    cfg = ssm_config(Rg=2, N=8, P=6, chunk=4)
    params = random_params(cfg, seed=7)
    full = build_mixer(cfg, cfg.blocks[0], params)
    small_blk = Mamba2Block(0, n, c)
    small_cfg = cfg.with_blocks([small_blk])
    small = build_mixer(small_cfg, small_blk, slice_mixer_params(params, n, c))
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 9, cfg.hidden_size))

    sliced, _ = run(small, x)
    # kept counts as traced ints, as masked fine-tuning passes them
    mask = {"d_state": jnp.int32(n), "head_dim": jnp.int32(c)}
    masked, _ = run(full, x, None, mask)
    assert_same(masked, sliced)
    unmasked, _ = run(full, x, None, {"d_state": jnp.int32(8), "head_dim": jnp.int32(6)})  # same trace
    assert_same(unmasked, run(full, x)[0])
    assert max_rel_err(unmasked, sliced) > 1e-3  # the mask does remove something

    # cached decoding under the mask equals the sliced block's cached decoding
    cm = init_mamba2_cache(cfg, cfg.blocks[0], 2, 9, jnp.float32)
    cs = init_mamba2_cache(small_cfg, small_blk, 2, 9, jnp.float32)
    (ym, cm), (ys, cs) = run(full, x[:, :5], cm, mask), run(small, x[:, :5], cs)
    assert_same(ym, ys)
    for t in range(5, 9):
        (ym, cm), (ys, cs) = run(full, x[:, t:t + 1], cm, mask), run(small, x[:, t:t + 1], cs)
        assert_same(ym, ys)
    assert_same(cm["ssm"][:, :, :c, :n], cs["ssm"])


# ----------------------------------------------------------------------------- transformers parity
def hf_mixer(hidden, heads, head_dim, groups, state, chunk, conv_kernel=4, limit=(0.0, math.inf), conv_bias=True,
             seed=0):
    config = transformers.Mamba2Config(
        hidden_size=hidden, num_heads=heads, head_dim=head_dim, expand=heads * head_dim // hidden, n_groups=groups,
        state_size=state, chunk_size=chunk, conv_kernel=conv_kernel, time_step_limit=limit,
        use_conv_bias=conv_bias, num_hidden_layers=1, vocab_size=11)
    torch.manual_seed(seed)
    mixer = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name == "norm.weight":
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name in ("D", "conv1d.bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name == "A_log":
                p.copy_(torch.rand_like(p) * 2.5 - 1.0)
            elif name == "dt_bias":
                p.copy_(torch.rand_like(p) * 4.5 - 4.0)
    return config, mixer


PARITY = {  # (hidden, heads, head_dim, groups, state, chunk, T)
    "1group_chunk_divides": (16, 4, 8, 1, 8, 4, 12),
    "2groups_chunk_not_dividing": (16, 4, 8, 2, 8, 5, 12),
    "4groups_chunk_longer_than_T": (24, 8, 6, 4, 16, 32, 9),
    "8groups_chunk3": (16, 8, 4, 8, 6, 3, 10),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_mixer_matches_transformers(case):
    hidden, heads, head_dim, groups, state, chunk, T = PARITY[case]
    limit = (0.01, 0.3) if groups == 2 else (0.0, math.inf)
    hf_cfg, mixer = hf_mixer(hidden, heads, head_dim, groups, state, chunk, limit=limit, conv_bias=groups != 4)
    cfg = ssm_config(D=hidden, H=heads, P=head_dim, Rg=groups, N=state, chunk=chunk, limit=limit,
                     conv_bias=groups != 4)

    norm_w = 1.0 + 0.3 * torch.randn(hidden)
    tensors = {k: v.detach().numpy() for k, v in mixer.state_dict().items()}
    tensors["pre.weight"] = norm_w.numpy()
    take = TensorTaker({"mixer." + k if k != "pre.weight" else k: v for k, v in tensors.items()})
    ours = build_mixer(cfg, cfg.blocks[0], mixer_from_hf(cfg, cfg.blocks[0], take, {"norm": "pre.weight", "mixer": "mixer."}))
    take.finish()

    x = torch.randn(2, T, hidden)
    prenorm = transformers.models.mamba2.modeling_mamba2.Mamba2RMSNorm(hidden, eps=cfg.rms_norm_eps)
    with torch.no_grad():
        prenorm.weight.copy_(norm_w)
        ref = mixer(prenorm(x)).numpy()
    got, _ = run(ours, jnp.asarray(x.numpy()))
    assert max_rel_err(got, ref) <= 1e-4
