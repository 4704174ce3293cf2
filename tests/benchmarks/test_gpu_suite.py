"""The GPU suite's dry run (`--tiny`, CPU, interpret-mode kernels) writes every result file with
finite figures, in the planned order, and its Pallas figures come from the kernels, not from a
silent fallback to XLA; a spent budget skips the remaining steps and records why."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_suite

REPO = Path(__file__).resolve().parents[2]
PLAN = gpu_suite.TINY_PLAN
BF16_REL = 2.0 ** -7  # two bf16 ulps of the largest output


def finite_positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(out), "--tiny"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, {name: json.loads((out / name).read_text()) for name in gpu_suite.FILES}


def test_every_file_and_step_in_order(dry_run):
    out, files = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_suite.FILES)  # nothing else, no .tmp left over
    suite = files["suite.json"]
    assert suite["finished"] and suite["tiny"]
    assert [s["status"] for s in suite["steps"]] == ["done"] * len(suite["steps"])
    names = [s["name"] for s in suite["steps"]]
    expected = (["probe", "decode smoke setup"]
                + [f"decode smoke {v} {r:.2f} {i}" for v, r, i in PLAN.smoke_variants]
                + [f"{op} {k}x{n}" for op in ("w4a16", "bcq") for k, n in PLAN.kernel_shapes]
                + [f"rope {b}x{t}" for b, t in PLAN.rope_shapes]
                + ["decode main setup"] + [f"decode main {v} {r:.2f} {i}" for v, r, i in PLAN.main_variants])
    assert names == expected
    assert all(finite_positive(s["seconds"]) for s in suite["steps"])
    probe = files["probe.json"]
    assert finite_positive(probe["copy_bandwidth_GBps"], probe["bf16_matmul_TFLOPs"])
    assert probe["backend"] == "cpu" and probe["interpret"] is True


def test_the_dry_run_covers_every_kind_of_decode_variant_the_gpu_runs():
    """The tiny plan runs a subset of the GPU plan's decode variants: every (variant, impl,
    pruned or not) kind of them, so a path the GPU would take cannot go untried on CPU."""
    kinds = lambda variants: {(v, impl, rate > 0) for v, rate, impl in variants}  # noqa: E731
    assert set(PLAN.main_variants) <= set(gpu_suite.GPU_PLAN.main_variants)
    assert kinds(PLAN.main_variants) == kinds(gpu_suite.GPU_PLAN.main_variants)


@pytest.mark.parametrize("op", ["w4a16", "bcq"])
def test_packed_matmul_rows_time_the_kernels(dry_run, op):
    report = dry_run[1][f"{op}.json"]
    rows = report["rows"]
    paths = {"w4a16": lambda b: ["pallas"], "bcq": lambda b: ["lut", "dequant"] if b == 1 else ["dequant"]}[op]
    assert [(r["kin"], r["n"], r["batch"], r["path"]) for r in rows] == [
        (k, n, b, p) for k, n in PLAN.kernel_shapes for b in PLAN.kernel_batches for p in paths(b)]
    for r in rows:
        assert finite_positive(r["kernel_us"], r["bf16_dot_us"], r["dequant_dot_us"], r["kernel_GBps"],
                               r["dequant_dot_GBps"], r["bf16_dot_GBps"], r["kernel_frac_copy_bw"],
                               r["dequant_dot_frac_copy_bw"], r["bf16_dot_frac_copy_bw"],
                               r["kernel_time_over_bf16_dot"], r["kernel_time_over_dequant_dot"])
        assert r["kernel_frac_copy_bw"] == pytest.approx(r["kernel_GBps"] / report["copy_bandwidth_GBps"])
        assert r["max_rel_err_vs_reference"] <= BF16_REL
        # the timed program's calls all went to the kernel: one dispatch per call, none fell back
        want = {f"{op}/pallas": PLAN.kernel_calls}
        if op == "bcq":
            want[f"bcq-{'lut' if r['path'] == 'lut' else 'dequant'}/pallas"] = PLAN.kernel_calls
        assert r["ran"] == want


def test_rope_rows_time_the_kernel(dry_run):
    rows = dry_run[1]["rope.json"]["rows"]
    assert [(r["batch"], r["tokens"], r["pairs"]) for r in rows] == [
        (b, t, p) for b, t in PLAN.rope_shapes for p in PLAN.rope_pairs]
    for r in rows:
        assert finite_positive(r["kernel_us"], r["xla_us"], r["kernel_GBps"], r["kernel_frac_copy_bw"])
        assert r["max_rel_err"] <= BF16_REL
        assert r["ran"] == {"rope/pallas": PLAN.kernel_calls}


@pytest.mark.parametrize("section", ["smoke", "main"])
def test_decode_variants_finite_and_pallas_really_ran(dry_run, section):
    decode = dry_run[1]["decode.json"]
    sec = decode[section]
    variants = PLAN.smoke_variants if section == "smoke" else PLAN.main_variants
    assert [(v["variant"], v["rate"], v["impl"]) for v in sec["variants"]] == list(variants)
    layers = sec["layers"]
    for v in sec["variants"]:
        assert v["status"] == "done"
        assert finite_positive(v["prefill_s"], v["total_s"], v["ms_per_output_token"], v["tokens_per_s"],
                               v["speedup_vs_bf16"], v["param_bytes"], v["program_bytes"]["peak_estimate"],
                               *v["compile_s"].values(), *v["lower_s"].values())
        assert set(v["compile_s"]) == {"prefill", "full"}
        assert len(v["generated"]) == sec["new_tokens"] and all(0 <= t < sec["vocab_size"] for t in v["generated"])
        assert v["prefill_token_matches"] is True  # the prefill program computes the full program's first step
        counts = v["ran"]["counts"]
        if v["impl"] == "pallas":
            # every packed product of a decode step (q, k, v, o, gate, up, down per layer, the head)
            # went to the W4A16 kernel, RoPE to the fused kernel, nothing fell back to XLA
            assert counts.get("w4a16/pallas", 0) >= 7 * layers + 1, counts
            assert counts.get("rope/pallas", 0) >= layers, counts
            assert not any(k.endswith("/fallback") for k in counts), v["ran"]
            assert v["interpret"] is True  # CPU: interpret mode
        else:
            assert not any(k.endswith("/pallas") for k in counts), counts
    by = {(v["variant"], v["rate"], v["impl"]): v for v in sec["variants"]}
    # W4 stores under a third of bf16's bytes and pruning shrinks it
    if ("w4", 0.0, "xla") in by:
        assert by[("w4", 0.0, "xla")]["param_bytes"] < 0.35 * by[("bf16", 0.0, "xla")]["param_bytes"]
        assert by[("w4", 0.35, "pallas")]["param_bytes"] < by[("w4", 0.0, "xla")]["param_bytes"]
        assert 0 <= by[("w4", 0.0, "pallas")]["tokens_equal_to_xla"]["fraction"] <= 1
        assert by[("w4", 0.0, "pallas")]["speedup_vs_xla"] == pytest.approx(
            by[("w4", 0.0, "pallas")]["tokens_per_s"] / by[("w4", 0.0, "xla")]["tokens_per_s"])


def test_spent_budget_skips_and_records_every_remaining_step(tmp_path):
    """Budget 0: nothing runs, every step is recorded as skipped with the reason, and the decode
    variants appear in decode.json as skipped (never silently absent)."""
    assert gpu_suite.main(["--out", str(tmp_path), "--tiny", "--budget-s", "0"]) == 0
    suite = json.loads((tmp_path / "suite.json").read_text())
    steps = suite["steps"]
    assert steps and all(s["status"] == "skipped" for s in steps)
    assert all("budget exhausted" in s["reason"] or s["reason"] == "setup did not complete" for s in steps)
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert [(v["variant"], v["rate"], v["impl"], v["status"]) for v in decode["main"]["variants"]] == [
        (*v, "skipped") for v in PLAN.main_variants]
    w4a16 = json.loads((tmp_path / "w4a16.json").read_text())
    assert w4a16["rows"] == [] and [s["shape"] for s in w4a16["skipped"]] == [list(s) for s in PLAN.kernel_shapes]
    assert not (tmp_path / "probe.json").exists()


def test_step_over_its_estimate_is_skipped_and_failures_are_recorded(tmp_path):
    suite = gpu_suite.Suite(tmp_path, budget_s=3600, tiny=True)
    assert suite.run("fits", lambda: 1) == ("done", 1)
    assert suite.run("too long", lambda: 1, estimate_s=1e6) == ("skipped", None)

    def boom():
        raise RuntimeError("kernel exploded")

    assert suite.run("fails", boom) == ("failed", None)
    steps = {s["name"]: s for s in json.loads((tmp_path / "suite.json").read_text())["steps"]}
    assert steps["fits"]["status"] == "done"
    assert steps["too long"]["status"] == "skipped" and "estimated 1000000 s" in steps["too long"]["reason"]
    assert steps["fails"]["status"] == "failed" and "kernel exploded" in steps["fails"]["error"]


def test_steps_selects_a_subset_and_records_the_rest(tmp_path):
    assert gpu_suite.main(["--out", str(tmp_path), "--tiny", "--steps", "probe"]) == 0
    steps = {s["name"]: s for s in json.loads((tmp_path / "suite.json").read_text())["steps"]}
    assert steps["probe"]["status"] == "done"
    assert all(steps[n]["status"] == "skipped" and "not selected" in steps[n]["reason"]
               for n in ("smoke", "w4a16", "bcq", "rope", "decode"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json", "suite.json"]
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path), "--steps", "probe,kernels"])
