"""The README's downstream example runs as written, in a fresh process, without `experiments`."""

import os
import re
import subprocess
import sys
import textwrap

import jax.numpy as jnp

import uniql_jax as uq
from tests.conftest import REPO
from uniql_jax.config import AttentionBlock, MLPBlock


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- downstream-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no downstream example block"
    return match.group(1)


def test_readme_downstream_example_runs(tmp_path):
    cfg = uq.ModelConfig(arch="llama", vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16,
                         rotary_dim=16, intermediate_size=64,
                         blocks=tuple(b for i in range(2) for b in (AttentionBlock(i, 8, 0, 16), MLPBlock(i, 64))))
    params = uq.init_params(cfg, seed=0)
    small = tuple(b for i in range(2) for b in (AttentionBlock(i, 6, 0, 8), MLPBlock(i, 48)))
    uq.save(tmp_path / "ckpt", cfg, params, table={0.0: cfg.blocks, 0.25: small})
    script = "CKPT = %r\n" % str(tmp_path / "ckpt") + readme_example() + textwrap.dedent("""
        import sys
        assert logits.shape == (1, 16, 64) and tokens.shape == (1, 23)
        assert not any(m == "experiments" or m.startswith("experiments.") for m in sys.modules)
        print("ok", cfg.blocks[1].width)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["ok", "48"]
    ref_cfg, ref = uq.prune(cfg, params, 0.25, {0.25: small})
    assert ref_cfg.blocks[1].width == 48 and jnp.shape(ref["blocks"][1]["down"]) == (48, 32)
