"""`benchmarks.cpu_compile_budget` on the tiny Llama shape: the XLA decode programs compile from
abstract arrays with their times recorded, and the whole W4 Pallas decode program exports for
cuda from this CPU host with every packed product on a Triton kernel (no fallback, no
interpret mode)."""

from __future__ import annotations

import json
import math

from benchmarks import cpu_compile_budget


def test_tiny_budget_rows(tmp_path):
    out = tmp_path / "budget.json"
    cpu_compile_budget.main(["--shape", "tiny", "--prompt-len", "8", "--new-tokens", "3", "--rates", "0,0.35",
                             "--out", str(out)])
    report = json.loads(out.read_text())
    layers = report["layers"]
    xla = [r for r in report["rows"] if r["impl"] == "xla"]
    pallas = [r for r in report["rows"] if r["impl"] == "pallas"]
    assert {(r["variant"], r["rate"], r["program"]) for r in xla} == {
        (v, r, p) for v, r in (("bf16", 0.0), ("w4", 0.0), ("w4", 0.35)) for p in ("prefill", "full")}
    for r in xla:
        assert math.isfinite(r["lower_s"]) and r["lower_s"] > 0 and math.isfinite(r["compile_s"]) and r["compile_s"] > 0
        assert r["program_bytes"]["argument"] > 0
    by = {(r["variant"], r["rate"], r["program"]): r for r in xla}
    arg_bytes = {k: r["program_bytes"]["argument"] for k, r in by.items()}
    assert arg_bytes[("w4", 0.0, "full")] < 0.5 * arg_bytes[("bf16", 0.0, "full")]  # packed weights
    assert len(pallas) == 4
    for r in pallas:
        counts = r["ran"]["counts"]
        assert counts["w4a16/pallas"] >= 7 * layers + 1 and counts["rope/pallas"] >= layers
        assert not any(k.endswith("/fallback") for k in counts), r["ran"]
        assert r["triton_kernels_in_module"] > 0  # Triton lowering, not interpret mode
