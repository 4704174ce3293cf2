"""Calibration driver: statistics independent of batching, padding and device count; the Mamba2
signals the SSM sorter recomputes reproduce the block."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from compress_models import random_params, tiny_config, tokens

from uniql_jax.compress import calibration, ssm
from uniql_jax.compress.sort import SORTERS
from uniql_jax.models.layers import rms_norm
from uniql_jax.models.mamba2 import gated_group_rms_norm, ssd_sequential
from uniql_jax.models.stacks import bind

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def close(a, b, tol=1e-5):
    """Equal up to float32 summation order: |a - b| <= tol · max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) <= tol * max(np.max(np.abs(b)), 1e-30)


def collect_all(cfg, params, calib, batch_size):
    stats = {}
    collectors = {kind: s.collect for kind, s in SORTERS.items()}
    run = calibration.run_blocks(cfg, params, calib, collectors, lambda i, blk, s: stats.__setitem__(i, s),
                                 batch_size=batch_size, progress=False)
    return stats, run


def test_statistics_add_up_over_batches_and_ignore_padding():
    """stats(7 windows) = stats(first 6) + stats(last 1): batches of 3 accumulate, and the two padding
    rows the last batch needs contribute nothing (one compiled step serves all three runs)."""
    full = tiny_config("bamba")
    cfg = full.with_blocks(full.blocks[:2])  # one Mamba2 mixer and its gated MLP
    params = random_params(cfg)
    calib = tokens(7, 16, seed=2)
    a, run_a = collect_all(cfg, params, calib, batch_size=3)
    head, run_head = collect_all(cfg, params, calib[:6], batch_size=3)
    tail, run_tail = collect_all(cfg, params, calib[6:], batch_size=3)
    for i in a:
        assert a[i]["tokens"] == 7 * 16
        for name in a[i]:
            assert close(a[i][name], head[i][name] + tail[i][name]), (i, name)
    assert close(run_a["last_token"], np.concatenate([run_head["last_token"], run_tail["last_token"]], axis=1))
    # the MLP statistic is XᵀX of down_proj's input, computed here directly from the bound model
    @jax.jit
    def down_proj_input(params, toks):
        model = bind(cfg, params)
        x = params["embed"][toks]
        pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
        x = x + model.blocks[0](x, pos, None, None, "xla")[0]
        blk = model.blocks[1]
        h = rms_norm(x, blk.norm.get_value(), cfg.rms_norm_eps)
        return jax.nn.silu(h @ blk.gate.get_value()) * (h @ blk.up.get_value())

    act = np.asarray(down_proj_input(params, jnp.asarray(calib))).reshape(-1, 40)
    assert np.allclose(a[1]["C_act"], act.T @ act, rtol=1e-4, atol=1e-4)


def test_ssm_inputs_reproduce_the_mamba2_block():
    """ssm.ssm_inputs re-derives the scan inputs; scanning them must give the block's own output."""
    cfg = tiny_config("mamba2")
    params = random_params(cfg, seed=4)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, cfg.hidden_size))

    @jax.jit
    def both(params, x):
        module = bind(cfg, params).blocks[0]
        s = ssm.ssm_inputs(cfg, module, x)
        y, _ = ssd_sequential(s["x"], s["dt"], s["A"], s["B"], s["C"])
        y = y + module.D.get_value()[:, None] * s["x"]
        h = rms_norm(x, module.norm.get_value(), cfg.rms_norm_eps)
        z = jnp.einsum("btd,dhp->bthp", h, module.z.get_value())
        g = gated_group_rms_norm(y, z, module.gnorm.get_value(), cfg.ssm_groups, cfg.ssm_norm_eps)
        return jnp.einsum("bthp,hpd->btd", g, module.out.get_value()), module(x)[0]

    ours, ref = both(params, x)
    assert np.max(np.abs(np.asarray(ours - ref))) <= 1e-4 * np.max(np.abs(np.asarray(ref)))


def test_state_correlation_sums_outer_products_of_every_state():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    b, T, H, P, G, N = 2, 6, 4, 3, 2, 5
    x = jax.random.normal(k[0], (b, T, H, P))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, T, H)))
    A = -jnp.exp(jax.random.normal(k[2], (H,)))
    B, C = jax.random.normal(k[3], (b, T, G, N)), jax.random.normal(k[4], (b, T, G, N))
    got = np.asarray(jax.jit(ssm.state_correlation)(x, dt, A, B, C))
    h = np.zeros((b, H, P, N))
    ref = np.zeros((H, P, P))
    Bn, xn, dtn, An = (np.asarray(u, np.float64) for u in (B, x, dt, A))
    for t in range(T):
        Bh = np.repeat(Bn[:, t], H // G, axis=1)  # [b, H, N]
        h = h * np.exp(dtn[:, t] * An)[..., None, None] + (dtn[:, t, :, None] * xn[:, t])[..., None] * Bh[:, :, None]
        ref += np.einsum("bhpn,bhqn->hpq", h, h)
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-4)


MULTI_DEVICE_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import jax
from compress_models import random_params, tiny_config, tokens
from uniql_jax.compress import calibration
from uniql_jax.compress.sort import SORTERS
assert len(jax.devices()) == 4, jax.devices()
cfg = tiny_config("qwen2")
cfg = cfg.with_blocks(cfg.blocks[:2])  # one decoder layer: attention (with biases) and MLP
params = random_params(cfg)
stats = {{}}
collectors = {{k: s.collect for k, s in SORTERS.items()}}
calibration.run_blocks(cfg, params, tokens(6, 16, seed=2), collectors, lambda i, b, s: stats.__setitem__(i, s),
                       batch_size=2, progress=False)
np.savez({out!r}, **{{f"{{i}}/{{k}}": np.asarray(v) for i, s in stats.items() for k, v in s.items()}})
"""


def test_statistics_on_four_devices_equal_one_device(tmp_path):
    """Data-parallel over a 4-device mesh (psum of correlations) == single device."""
    out = tmp_path / "stats.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    script = MULTI_DEVICE_SCRIPT.format(tests=str(HERE), out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO, timeout=600)
    multi = dict(np.load(out))
    cfg = tiny_config("qwen2")
    cfg = cfg.with_blocks(cfg.blocks[:2])
    single, _ = collect_all(cfg, random_params(cfg), tokens(6, 16, seed=2), batch_size=2)
    assert set(multi) == {f"{i}/{k}" for i, s in single.items() for k in s}
    for key, value in multi.items():
        i, name = key.split("/", 1)
        assert close(value, single[int(i)][name]), key
