"""Calibration with a block's weights sharded over the `model` mesh axis (uniql_jax.distributed):
the same block outputs and statistics as with the weights replicated.

4 CPU devices in a subprocess: mesh A = 2 devices on "data" (weights whole on each), mesh B =
("data" 2, "model" 2) (every weight split in two, `distributed.weight_spec`; statistics sharded by
rows). Both runs see the same per-device batches, so only the partitioning of each block over
"model" differs. What holds (asserted): residual streams (last token after every block, final)
and every statistic (sorting correlations, GPTQ Hessians) equal up to float32 reassociation
(rel. 1e-5); the output-dim sharded weights (the preferred choice) give no partial sums, so in
practice most arrays come out bit-identical (the script reports how many).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import jax
from compress_models import random_params, tiny_config, tokens
from uniql_jax import distributed
from uniql_jax.compress import calibration
from uniql_jax.compress.sort import SORTERS
from uniql_jax.quant.plan import linear_inputs
assert len(jax.devices()) == 4, jax.devices()
replicated = distributed.global_mesh(model=1, devices=jax.devices()[:2])
sharded = distributed.global_mesh(model=2)
assert sharded.shape == {{"data": 2, "model": 2}}
report = {{"archs": {{}}}}
for arch in ("qwen2", "bamba"):
    cfg = tiny_config(arch)
    params = random_params(cfg)
    calib = tokens(6, 16, seed=3)
    # the weights really are split: every 2-D+ weight of block 0 has half of one dim per device
    placed = distributed.put_params(calibration.as_float32(params["blocks"][0]), sharded)
    split = {{k: v.sharding.shard_shape(v.shape) != v.shape for k, v in placed.items() if v.ndim >= 2}}
    assert split and all(split.values()), split
    out = {{}}
    for name, mesh in (("replicated", replicated), ("sharded", sharded)):
        stats = {{}}
        collectors = {{k: s.collect for k, s in SORTERS.items()}}
        sort_run = calibration.run_blocks(cfg, params, calib, collectors, lambda i, b, s: stats.__setitem__(("sort", i), s),
                                          batch_size=4, mesh=mesh, progress=False, return_final=True)
        hess_run = calibration.run_blocks(cfg, params, calib, {{k: linear_inputs for k in ("attention", "mlp", "mamba2")}},
                                          lambda i, b, s: stats.__setitem__(("gptq", i), s), batch_size=4, mesh=mesh,
                                          progress=False)
        arrays = {{f"{{kind}}/{{i}}/{{k}}": np.asarray(v) for (kind, i), s in stats.items() for k, v in s.items()}}
        arrays["last_token"] = sort_run["last_token"]
        arrays["final"] = sort_run["final"]
        assert np.array_equal(sort_run["last_token"], hess_run["last_token"])
        out[name] = arrays
    a, b = out["replicated"], out["sharded"]
    assert set(a) == set(b)
    worst, identical = 0.0, 0
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        rel = float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-30))
        worst = max(worst, rel)
        identical += int(np.array_equal(a[k], b[k]))
    report["archs"][arch] = {{"arrays": len(a), "bit_identical": identical, "max_rel_diff": worst,
                              "weights_split": sorted(split)}}
print(json.dumps(report))
"""


def test_model_axis_sharded_block_equals_replicated():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(HERE))], env=env, cwd=REPO, timeout=900,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n", json.dumps(report, indent=1))
    for arch, r in report["archs"].items():
        assert r["arrays"] > 10, arch
        assert r["max_rel_diff"] <= 1e-5, (arch, r)
