"""Each op's bench.py runs end to end on CPU (--small, interpret mode) and writes its JSON.

The rows carry the kernel-vs-reference error of the benchmarked call, asserted small here,
so a benchmark can never report timings of a wrong kernel.
"""

from __future__ import annotations

import json
import sys

import pytest

from pallas_kernels.bcq import bench as bcq_bench
from pallas_kernels.rope import bench as rope_bench
from pallas_kernels.w4a16 import bench as w4a16_bench

BF16_REL = 2.0 ** -7  # two bf16 ulps of the largest output


def run_bench(module, monkeypatch, tmp_path, *extra):
    monkeypatch.setattr(sys, "argv", ["bench", "--small", "--out-dir", str(tmp_path), *extra])
    module.main()
    [path] = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert path.name.endswith("_cpu_small.json") and report["interpret"] and report["small"]
    return report


@pytest.mark.parametrize("module,op,paths", [(w4a16_bench, "w4a16", {"pallas"}), (bcq_bench, "bcq", {"lut", "dequant"})],
                         ids=["w4a16", "bcq"])
def test_matmul_bench_small(module, op, paths, monkeypatch, tmp_path):
    report = run_bench(module, monkeypatch, tmp_path, "--shapes", "256x40", "--batches", "1")
    assert report["op"] == op
    assert {row["path"] for row in report["rows"]} == paths
    for row in report["rows"]:
        assert (row["kin"], row["n"], row["batch"]) == (256, 40, 1)
        assert row["kernel_us"] > 0 and row["bf16_dot_us"] > 0 and row["dequant_dot_us"] > 0
        assert row["kernel_GBps"] > 0 and row["speedup_vs_bf16_dot"] > 0
        assert row["max_rel_err_vs_reference"] <= BF16_REL


def test_rope_bench_small(monkeypatch, tmp_path):
    report = run_bench(rope_bench, monkeypatch, tmp_path, "--shapes", "2x3", "--calls", "2")
    [row] = report["rows"]
    assert (row["batch"], row["tokens"], row["pairs"]) == (2, 3, 12)
    assert row["kernel_us"] > 0 and row["xla_us"] > 0
    assert row["max_rel_err"] <= BF16_REL
