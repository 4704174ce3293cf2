"""The decode benchmark runs end to end on CPU with a tiny shape and writes its JSON."""

import json

import pytest

from benchmarks import benchmark
from experiments import common


def test_tiny_benchmark_writes_all_variants(tmp_path):
    out = tmp_path / "cpu-decode.json"
    result = benchmark.run(["--arch", "nemotron_h", "--shape", "tiny", "--prompt-len", "8", "--new-tokens", "4",
                            "--rates", "0,0.25", "--impls", "xla", "--probe-mb", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    rows = {(v["variant"], v["rate"], v["impl"]) for v in saved["variants"]}
    assert rows == {("bf16", 0.0, "xla"), ("w4", 0.0, "xla"), ("w4", 0.25, "xla")}
    by = {(v["variant"], v["rate"]): v for v in saved["variants"]}
    # W4 stores under a third of bf16's bytes; pruning shrinks it further
    assert by[("w4", 0.0)]["param_bytes"] < 0.35 * by[("bf16", 0.0)]["param_bytes"]
    assert by[("w4", 0.25)]["param_bytes"] < by[("w4", 0.0)]["param_bytes"]
    assert all(v["tokens_per_s"] > 0 and v["prefill_s"] > 0 for v in saved["variants"])


def test_shape_of_another_arch_is_refused():
    with pytest.raises(common.UsageError, match="llama3_8b is a llama shape"):
        benchmark.run(["--arch", "mamba2", "--shape", "llama3_8b"])


def test_llama3_8b_shape_has_the_real_sizes():
    from uniql_jax.compress.allocate import param_count

    cfg = benchmark.shape_config("llama", "llama3_8b")
    assert 7.9e9 < param_count(cfg) < 8.1e9  # Llama-3.1-8B: 8.03 B parameters
