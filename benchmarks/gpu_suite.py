"""Every GPU measurement of the project in one budgeted run (issue 22).

    python -m benchmarks.gpu_suite --out DIR [--budget-s 450]     # on the GPU (H200), < 8 min
    python -m benchmarks.gpu_suite --out DIR --tiny               # dry run: tiny shapes, CPU, interpret mode
    python -m benchmarks.gpu_suite --out DIR --steps probe,decode # a subset (e.g. a second call)
    OUT=DIR benchmarks/gpu_suite.sh                               # the device wrapper (adds suite.log)

Steps, in order of value per second of device time; each result is written to DIR as JSON as
soon as it exists, so a run killed by its time limit still leaves every figure measured so far:

1. ``probe.json``: copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s),
   ``benchmarks.benchmark.device_probe``: the ceilings every later figure is compared with.
2. ``decode.json`` section "smoke": whole-model decode of the small "tiny" Llama shape (bf16,
   W4 XLA, W4 Pallas at 0 and 35 %): seconds of device time that show early whether the
   model path, the Pallas kernels and the compiled decode loop work on this device at all.
3. ``w4a16.json``, ``bcq.json``: the packed-weight GEMV micro-benchmarks of
   ``pallas_kernels/{w4a16,bcq}/bench.py`` (``bench_util.bench_packed_matmul``) at the
   Llama-3.1-8B shapes 4096x4096, 4096x14336, 14336x4096, 4096x1024, batch 1 and 16: the Pallas
   kernel, XLA dequantize + dot and XLA's plain bf16 dot in the same run, plus each one's
   bandwidth as a fraction of the probe's copy bandwidth and the kernel / bf16-dot time ratio.
   Written after each shape.
4. ``rope.json``: the fused RoPE kernel against XLA (``pallas_kernels/rope/bench.py``), decode
   and prefill shapes, unpruned and pruned heads.
5. ``decode.json`` section "main": end-to-end decode (batch 1, prompt 512, 128 new tokens,
   ``benchmarks.benchmark.bench_variant``) at the Llama-3.1-8B shape (random weights), in
   this order: bf16, W4 0 %, W4 35 %, W4 0 % Pallas (against the XLA W4 0 % before it), then
   W4 15 %, 25 % and Pallas at 35 %, 15 %, 25 %. Per variant: trace/lower and compile time of
   each program apart from run time, prefill, ms per output token, tokens/s, XLA's memory
   analysis of the program (its own peak) and the process's peak device memory (monotone).

``suite.json`` is the manifest: one entry per step with status "done", "skipped" (with the
reason) or "failed" (with the error); rewritten after every step. Every Pallas figure records
what the dispatchers ran (``pallas_kernels.common.dispatch_log``: "w4a16/pallas",
"w4a16/fallback", ...), so a silent fallback to XLA cannot pass for a kernel timing. The device
returns at most 8 files: this writes 6 (7 with the wrapper's log).

Budget. The default ``--budget-s 450`` (7.5 min, measured from interpreter start) keeps the run
inside 8 minutes and leaves room for a rerun in a 15-minute device lease (machine start and
transfers included). Before each step the time left is compared with an estimate (the measured
cost of the previous step of the same kind); a step that does not fit is skipped and recorded as
skipped with the reason, never dropped silently. The order above comes from these estimates:

* compile dominates the cost of whole-model decode. On the 2-core CPU, with abstract arrays
  (``benchmarks/cpu-compile-budget-llama3_8b.json``, ``python -m benchmarks.cpu_compile_budget
  --rates 0,0.15,0.25,0.35``, load average 3.6-6.2), each 32-layer Llama-3.1-8B program traces
  and lowers in 0.7-2.2 s; XLA compiles the prefill program in 1.6 s (bf16) / 3.3-4.0 s (W4) and
  the 128-token decode program in 9.4 s (bf16) / 12.7-13.1 s (W4, every rate): ~11 s per bf16
  variant, ~17-20 s per W4 variant (on a quieter CPU, load ~1.5: 3.5 s and 8.8-10.5 s for the
  decode programs). Exporting each Pallas W4 program for cuda takes 0.7-1.6 s, with every one of
  the 225 packed products per decode step on a Triton kernel (no fallback). A GPU compile adds
  GEMM autotuning and Triton/ptxas, so we plan ~20-60 s per 8B variant (two programs), ~1 s of
  running each: the nine variants need ~3-9 min, the micro-benchmarks (~60 compiles of one small
  program each) ~1-2 min. Hence the value order: the headline comparison (bf16, W4 0 %, W4 35 %,
  Pallas vs XLA at W4 0 %) first, the intermediate rates last, where a slow compile skips them.
* running the 8B decode is cheap: 128 tokens read ~16 GB (bf16) or ~4 GB (W4) of weights each,
  i.e. ~0.5 s and ~0.15 s at ~4.3 TB/s per timed repeat.

``--tiny`` runs every step with tiny shapes on whatever backend is there (on CPU the kernels run
in Pallas interpret mode): it proves the script end to end in under a minute of CPU, and its
timings mean nothing. ``tests/benchmarks/test_gpu_suite.py`` runs it.

Length: one file over the house's ~400 lines on purpose. The code is ~420 lines, a quarter of it
this docstring's budget rationale; the steps share one `Suite` (budget, estimates, manifest) and
one plan, and are read in the order they run: split into modules, the budget logic would sit
apart from the steps it schedules. The measuring code itself lives elsewhere
(``benchmarks.benchmark``, ``pallas_kernels/*/bench.py``).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from interpreter start (imports included)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT_BUDGET_S = 450.0
FILES = ("suite.json", "probe.json", "w4a16.json", "bcq.json", "rope.json", "decode.json")

# (variant, rate, impl), in order of value
DECODE_VARIANTS = (("bf16", 0.0, "xla"), ("w4", 0.0, "xla"), ("w4", 0.35, "xla"), ("w4", 0.0, "pallas"),
                   ("w4", 0.15, "xla"), ("w4", 0.25, "xla"), ("w4", 0.35, "pallas"), ("w4", 0.15, "pallas"),
                   ("w4", 0.25, "pallas"))
SMOKE_VARIANTS = (("bf16", 0.0, "xla"), ("w4", 0.0, "xla"), ("w4", 0.0, "pallas"), ("w4", 0.35, "pallas"))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU plan or the tiny CPU dry run."""

    probe_mb: int
    matmul_n: int | None
    kernel_shapes: tuple  # (Kin, N) of the packed-matmul micro-benchmarks
    kernel_batches: tuple
    kernel_repeats: int
    kernel_calls: int  # kernel calls per timed program (bench_util.time_calls)
    rope_shapes: tuple  # (batch, tokens)
    rope_pairs: tuple  # kept rotary pairs per head
    smoke: dict  # decode section "smoke": shape, layers (None: all), prompt_len, new_tokens
    smoke_variants: tuple
    main: dict  # decode section "main"
    main_variants: tuple
    decode_repeats: int
    compiler_options: dict | None  # XLA options of the decode programs (CPU dry run: fast compile)


GPU_PLAN = Plan(probe_mb=1024, matmul_n=8192, kernel_shapes=((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)),
                kernel_batches=(1, 16), kernel_repeats=10, kernel_calls=32,
                rope_shapes=((1, 1), (16, 1), (1, 512)), rope_pairs=(64, 40),
                smoke=dict(shape="tiny", layers=None, prompt_len=64, new_tokens=16), smoke_variants=SMOKE_VARIANTS,
                main=dict(shape="llama3_8b", layers=None, prompt_len=512, new_tokens=128, prior_s=30.0),
                main_variants=DECODE_VARIANTS,
                decode_repeats=3, compiler_options=None)
TINY_PLAN = Plan(probe_mb=4, matmul_n=128, kernel_shapes=((256, 64), (128, 32)), kernel_batches=(1, 16),
                 kernel_repeats=1, kernel_calls=2, rope_shapes=((1, 1), (2, 3)), rope_pairs=(12,),
                 smoke=dict(shape="tiny", layers=1, prompt_len=8, new_tokens=3),
                 smoke_variants=(("bf16", 0.0, "xla"), ("w4", 0.35, "pallas")),
                 main=dict(shape="tiny", layers=1, prompt_len=8, new_tokens=3),
                 # every code path of the GPU plan's nine (bf16; W4 through XLA and the kernel, whole
                 # and pruned) once: the 0.15 / 0.25 twins add only time to a CPU dry run
                 main_variants=DECODE_VARIANTS[:4] + (("w4", 0.35, "pallas"),),
                 decode_repeats=1, compiler_options={"xla_backend_optimization_level": 0})


def write_json(path: Path, obj) -> None:
    """Atomic write (a reader or a kill never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class Suite:
    """Runs steps against a wall-clock budget and keeps the manifest ``suite.json`` current."""

    def __init__(self, out: Path, budget_s: float, tiny: bool, start: float = START):
        self.out, self.budget_s, self.start = out, float(budget_s), start
        out.mkdir(parents=True, exist_ok=True)
        self.manifest = {"budget_s": self.budget_s, "tiny": tiny, "argv": sys.argv[1:],
                         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "python": platform.python_version(), "steps": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self):
        self.manifest["elapsed_s"] = self.elapsed()
        write_json(self.out / "suite.json", self.manifest)

    def fits(self, estimate_s: float) -> str | None:
        """None if a step estimated at `estimate_s` fits in the budget, else why it does not."""
        left = self.left()
        if left <= 0:
            return f"budget exhausted: {self.elapsed():.0f} s elapsed of {self.budget_s:.0f} s"
        if estimate_s > left:
            return f"estimated {estimate_s:.0f} s > {left:.0f} s left of the {self.budget_s:.0f} s budget"
        return None

    def skip(self, name: str, reason: str, file: str | None = None):
        print(f"[{self.elapsed():6.1f} s] skip {name}: {reason}", file=sys.stderr, flush=True)
        self.manifest["steps"].append({"name": name, "status": "skipped", "reason": reason, "file": file,
                                       "at_s": self.elapsed()})
        self.save()

    def run(self, name: str, fn, *, estimate_s: float = 0.0, file: str | None = None):
        """fn() within the budget: (status, result); a failure is recorded, not raised."""
        reason = self.fits(estimate_s)
        if reason:
            self.skip(name, reason, file)
            return "skipped", None
        print(f"[{self.elapsed():6.1f} s] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        entry = {"name": name, "file": file, "at_s": self.elapsed()}
        try:
            result = fn()
            entry["status"] = "done"
        except Exception as e:  # noqa: BLE001 - recorded; later steps still run
            result = None
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
            print(entry["traceback"], file=sys.stderr, flush=True)
        entry["seconds"] = time.perf_counter() - t0
        self.manifest["steps"].append(entry)
        self.save()
        return entry["status"], result

    def seconds_of(self, prefix: str) -> list[float]:
        return [s["seconds"] for s in self.manifest["steps"] if s["status"] == "done" and s["name"].startswith(prefix)]


def environment() -> dict:
    import jax

    import pallas_kernels.common as kcommon

    dev = jax.devices()[0]
    return {"device": dev.device_kind, "backend": jax.default_backend(), "platform": dev.platform,
            "jax_version": jax.__version__, "jaxlib_version": _version("jaxlib"),
            "flax_version": _version("flax"), "interpret": kcommon.resolve_interpret(None),
            "device_count": jax.device_count()}


def _version(pkg):
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------- steps


def step_probe(suite: Suite, plan: Plan) -> dict | None:
    from benchmarks import benchmark

    def probe():
        result = {**environment(), **benchmark.device_probe(plan.probe_mb, plan.matmul_n)}
        write_json(suite.out / "probe.json", result)
        return result

    return suite.run("probe", probe, file="probe.json")[1]


def bandwidth_fields(row: dict, copy_GBps: float | None) -> dict:
    """Achieved bandwidth of the kernel and both XLA baselines, as fractions of the copy bandwidth."""
    moved = row["kernel_GBps"] * row["kernel_us"] * 1e3  # bytes the kernel row counts (weight, x, y)
    out = {"dequant_dot_GBps": moved / row["dequant_dot_us"] / 1e3,
           "kernel_time_over_bf16_dot": row["kernel_us"] / row["bf16_dot_us"],
           "kernel_time_over_dequant_dot": row["kernel_us"] / row["dequant_dot_us"]}
    if copy_GBps:
        out.update(kernel_frac_copy_bw=row["kernel_GBps"] / copy_GBps,
                   dequant_dot_frac_copy_bw=out["dequant_dot_GBps"] / copy_GBps,
                   bf16_dot_frac_copy_bw=row["bf16_dot_GBps"] / copy_GBps)
    return out


def bench_args(suite: Suite, plan: Plan, shapes, batches, repeats, calls):
    """The namespace `pallas_kernels.bench_util` expects from its CLI."""
    from pallas_kernels.common import on_gpu

    return argparse.Namespace(shapes=list(shapes), batches=list(batches), repeats=repeats, calls=calls,
                              small=plan is TINY_PLAN, interpret=not on_gpu(), out_dir=suite.out)


def step_packed_matmul(suite: Suite, plan: Plan, op: str, probe: dict | None):
    """One micro-benchmark step per shape; <op>.json rewritten after each."""
    from pallas_kernels import bench_util
    from pallas_kernels.bcq import bench as bcq_bench
    from pallas_kernels.w4a16 import bench as w4a16_bench

    module = {"w4a16": w4a16_bench, "bcq": bcq_bench}[op]
    copy = (probe or {}).get("copy_bandwidth_GBps")
    file = f"{op}.json"
    all_args = bench_args(suite, plan, plan.kernel_shapes, plan.kernel_batches, plan.kernel_repeats, plan.kernel_calls)
    notes = f"{module.__doc__.splitlines()[0]} Through pallas_kernels/{op}/bench.py."
    report = bench_util.report(op, all_args, [], notes=notes)
    report.update(copy_bandwidth_GBps=copy, planned_shapes=[list(s) for s in plan.kernel_shapes], skipped=[])
    for kin, n in plan.kernel_shapes:
        args = bench_args(suite, plan, [(kin, n)], plan.kernel_batches, plan.kernel_repeats, plan.kernel_calls)

        def one_shape():
            rows = bench_util.bench_packed_matmul(op, args, module.make_weight, module.kernels(args.interpret),
                                                  module.reference.matmul)
            for row in rows:
                row.update(bandwidth_fields(row, copy))
            report["rows"] += rows
            write_json(suite.out / file, report)
            return rows

        done = suite.seconds_of(f"{op} ")
        status, _ = suite.run(f"{op} {kin}x{n}", one_shape, estimate_s=max(done, default=0.0), file=file)
        if status != "done":
            last = suite.manifest["steps"][-1]
            report["skipped"].append({"shape": [kin, n], "status": status,
                                      "reason": last.get("reason") or last.get("error")})
            write_json(suite.out / file, report)


def step_rope(suite: Suite, plan: Plan, probe: dict | None):
    from pallas_kernels import bench_util
    from pallas_kernels.rope import bench as rope_bench

    copy = (probe or {}).get("copy_bandwidth_GBps")
    all_args = bench_args(suite, plan, plan.rope_shapes, (), plan.kernel_repeats, plan.kernel_calls)
    report = bench_util.report("rope", all_args, [], notes="Fused RoPE (q and k in one kernel) vs XLA reference, "
                                                             "through pallas_kernels/rope/bench.py.")
    report.update(copy_bandwidth_GBps=copy, skipped=[])
    for batch, tokens in plan.rope_shapes:
        args = bench_args(suite, plan, [(batch, tokens)], (), plan.kernel_repeats, plan.kernel_calls)

        def one_shape():
            rows = rope_bench.bench(args, plan.rope_pairs)
            for row in rows:
                if copy:
                    row.update(kernel_frac_copy_bw=row["kernel_GBps"] / copy, xla_frac_copy_bw=row["xla_GBps"] / copy)
            report["rows"] += rows
            write_json(suite.out / "rope.json", report)
            return rows

        estimate = max(suite.seconds_of("rope "), default=0.0)
        status, _ = suite.run(f"rope {batch}x{tokens}", one_shape, estimate_s=estimate, file="rope.json")
        if status != "done":
            report["skipped"].append({"shape": [batch, tokens], "status": status})
            write_json(suite.out / "rope.json", report)


def section_config(spec: dict):
    """(cfg, arch) of a decode section: a named shape of `benchmarks.benchmark`, optionally
    cut to its first `layers` layers."""
    from benchmarks import benchmark

    cfg = benchmark.shape_config("llama", spec["shape"])
    if spec.get("layers"):
        cfg = cfg.with_blocks(tuple(b for b in cfg.blocks if b.layer < spec["layers"]))
    return cfg


def estimate_variant(suite: Suite, section: str, impl: str, prior_s: float = 0.0) -> float:
    """Seconds a decode variant is expected to take: the last one of the same impl in this
    section, else 1.5x the last XLA one (Triton compiles come on top), else `prior_s` (the first
    8B variant: ~30 s, from the CPU compile budget)."""
    rows = [s for s in suite.manifest["steps"] if s["status"] == "done" and s["name"].startswith(f"decode {section} ")]
    same = [s["seconds"] for s in rows if s["name"].endswith(f" {impl}")]
    if same:
        return same[-1]
    xla = [s["seconds"] for s in rows if s["name"].endswith(" xla")]
    return 1.5 * xla[-1] if xla else prior_s


def step_decode(suite: Suite, plan: Plan, section: str, spec: dict, variants, decode_report: dict):
    """Whole-model decode variants of one section, each a suite step; decode.json after each."""
    import jax
    import jax.numpy as jnp

    import uniql_jax as uq
    from benchmarks import benchmark
    from pallas_kernels import common as kcommon
    from uniql_jax.compress.prune import prune
    from uniql_jax.pipeline import uniform_table
    from uniql_jax.quant.formats.packed import deployed_bytes
    from uniql_jax.quant.quantize import rtn_quantize_model

    cfg = section_config(spec)
    rates = sorted({r for v, r, _ in variants if v == "w4"})
    table = uniform_table(cfg, rates)
    out = {"shape": spec["shape"], "arch": cfg.arch, "layers": sum(b.kind == "attention" for b in cfg.blocks),
           "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "prompt_len": spec["prompt_len"],
           "new_tokens": spec["new_tokens"], "batch": 1, "repeats": plan.decode_repeats,
           "kept_sizes": {str(r): [dataclasses.asdict(b) for b in table[r][:2]] for r in rates},
           "setup": {}, "variants": []}
    decode_report[section] = out
    state: dict = {}

    def save():
        write_json(suite.out / "decode.json", decode_report)

    def setup():
        t0 = time.perf_counter()
        state["bf16"] = jax.block_until_ready(jax.jit(lambda: uq.init_params(cfg, 0, jnp.bfloat16))())
        state["prompt"] = jax.random.randint(jax.random.PRNGKey(0), (1, spec["prompt_len"]), 0, cfg.vocab_size,
                                             dtype=jnp.int32)
        out["setup"]["init_s"] = time.perf_counter() - t0
        save()

    def params_for(name, rate):
        if name == "bf16":
            return cfg, state["bf16"]
        if "w4" not in state:
            t0 = time.perf_counter()
            state["w4"] = jax.block_until_ready(rtn_quantize_model(cfg, state["bf16"], table, bits=4, group_size=128)[0])
            out["setup"]["quantize_s"] = time.perf_counter() - t0
            if not any(v == "bf16" for v, _, _ in variants[len(out["variants"]):]):
                state.pop("bf16")  # no bf16 variant left: free its weights (16 GB at 8B)
        if rate not in state.setdefault("pruned", {}):
            state["pruned"][rate] = prune(cfg, state["w4"], rate, table) if rate else (cfg, state["w4"])
        return state["pruned"][rate]

    status, _ = suite.run(f"decode {section} setup", setup, file="decode.json")
    bf16_row = None
    for name, rate, impl in variants:
        step = f"decode {section} {name} {rate:.2f} {impl}"
        row = {"variant": name, "rate": rate, "impl": impl}
        out["variants"].append(row)
        if status != "done":
            row.update(status="skipped", reason="setup did not complete")
            suite.skip(step, row["reason"], "decode.json")
            save()
            continue

        def run_variant():
            t0 = time.perf_counter()
            cfg_v, params_v = params_for(name, rate)
            row["param_bytes"] = deployed_bytes(params_v)
            row["prepare_s"] = time.perf_counter() - t0
            # live device bytes before compiling (this variant's weights, any cached pruned copies)
            row["bytes_in_use_before"] = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use")
            # fresh traces: the dispatch log counts at trace time, and an identical program
            # traced before (the smoke section) would otherwise come from the cache, uncounted
            jax.clear_caches()
            with kcommon.dispatch_log() as log:
                row.update(benchmark.bench_variant(cfg_v, params_v, state["prompt"], spec["new_tokens"], impl,
                                                   repeats=plan.decode_repeats, compiler_options=plan.compiler_options))
            row["ran"] = log.as_dict()
            row["interpret"] = kcommon.resolve_interpret(None) if impl == "pallas" else None
            return row

        estimate = estimate_variant(suite, section, impl, spec.get("prior_s", 0.0))
        v_status, _ = suite.run(step, run_variant, estimate_s=estimate, file="decode.json")
        last = suite.manifest["steps"][-1]
        row["status"] = v_status
        row["wall_s"] = last.get("seconds")
        if v_status != "done":
            row["reason"] = last.get("reason") or last.get("error")
        if v_status == "done" and name == "bf16":
            bf16_row = row
        if v_status == "done" and bf16_row is not None:
            row["speedup_vs_bf16"] = row["tokens_per_s"] / bf16_row["tokens_per_s"]
        if v_status == "done" and impl == "pallas":
            twin = next((r for r in out["variants"] if r["variant"] == name and r["rate"] == rate
                         and r["impl"] == "xla" and r.get("status") == "done"), None)
            if twin:
                row["speedup_vs_xla"] = row["tokens_per_s"] / twin["tokens_per_s"]
                # greedy tokens of the same weights: bf16 rounding may flip a near-tie on random
                # weights, so a late divergence is no error; no token matching at all would be
                same = [a == b for a, b in zip(row["generated"], twin["generated"])]
                row["tokens_equal_to_xla"] = {"leading": same.index(False) if False in same else len(same),
                                              "fraction": sum(same) / max(len(same), 1)}
        save()
    state.clear()


# ----------------------------------------------------------------------------------------- main


STEPS = ("probe", "smoke", "w4a16", "bcq", "rope", "decode")


def run(out: Path, *, tiny: bool, budget_s: float, steps=STEPS, start: float | None = None) -> dict:
    """Run the selected steps; the budget counts from `start` (default: now)."""
    plan = TINY_PLAN if tiny else GPU_PLAN
    suite = Suite(out, budget_s, tiny, start=time.perf_counter() if start is None else start)
    suite.manifest["plan"] = dataclasses.asdict(plan)
    suite.manifest["selected_steps"] = list(steps)
    suite.manifest["environment"] = environment()
    suite.save()
    for name in STEPS:
        if name not in steps:
            suite.skip(name, "not selected (--steps)")
    probe = step_probe(suite, plan) if "probe" in steps else None
    decode_report = {"probe": probe}
    if "smoke" in steps:
        step_decode(suite, plan, "smoke", plan.smoke, plan.smoke_variants, decode_report)
    for op in ("w4a16", "bcq"):
        if op in steps:
            step_packed_matmul(suite, plan, op, probe)
    if "rope" in steps:
        step_rope(suite, plan, probe)
    if "decode" in steps:
        step_decode(suite, plan, "main", plan.main, plan.main_variants, decode_report)
    suite.manifest["finished"] = True
    suite.save()
    counts = {s: sum(st["status"] == s for st in suite.manifest["steps"]) for s in ("done", "skipped", "failed")}
    print(f"[{suite.elapsed():6.1f} s] finished: {counts}; files in {out}", file=sys.stderr, flush=True)
    return suite.manifest


def main(argv=None, start: float | None = None) -> int:
    """The command line; `start` is when the budget began (the script passes interpreter start,
    an in-process call starts it now)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON results (created)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU dry run (interpret-mode kernels)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"wall-clock budget from interpreter start; later steps are skipped and recorded "
                         f"(default {DEFAULT_BUDGET_S:.0f})")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma list of the steps to run, e.g. to redo some in a second call "
                         f"(default {','.join(STEPS)}); the probe gives the micro-benchmarks' bandwidth fractions")
    args = ap.parse_args(argv)
    if not math.isfinite(args.budget_s):
        ap.error("--budget-s must be finite")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or any(s not in STEPS for s in steps):
        ap.error(f"--steps must list some of {','.join(STEPS)}, got {args.steps!r}")
    manifest = run(args.out, tiny=args.tiny, budget_s=args.budget_s, steps=steps, start=start)
    return 1 if any(s["status"] == "failed" for s in manifest["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], start=START))
