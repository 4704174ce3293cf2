"""Peak host memory per stage of `compress` on a real model, handing the float model over or not.

    python -m benchmarks.compress_memory [--model ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--calib-samples 8] [--windows 4] [--seq-len 512] [--out benchmarks/cpu-compress-memory-smollm2.json]

Each setting runs `pipeline.compress` (GPTQ W4, rates 0 and 0.35) in its own process, with a
thread sampling the process's resident memory every 0.2 s, and reports the largest value seen
in each stage (the baseline evaluation counts towards "convert" and the 16-bit evaluation of
the rates towards "allocate"). Settings: `consume_inputs=False` (the library default: the
caller keeps its float model, so sorting and quantizing hold a second copy while they replace
blocks), `consume_inputs=True` (every replaced block is freed), and that plus
`host_memory.return_freed_arrays_to_os()` (what `experiments.compress` does: freed arrays
leave the resident set). The model's float32 bytes and the memory of the imports alone are
recorded beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time

from benchmarks.real_model import REPO, SMOLLM2, WIKITEXT2_TEST, WIKITEXT2_VALID


SETTINGS = ("keep", "consume", "consume+allocator")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.compress_memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOLLM2), help="HF folder or .gguf (default: the shared SmolLM2-135M)")
    p.add_argument("--calib", default=str(WIKITEXT2_VALID))
    p.add_argument("--eval", default=str(WIKITEXT2_TEST))
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--windows", type=int, default=4, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "cpu-compress-memory-smollm2.json"))
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    return p


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    stage, peaks = ["imports"], {}

    def sample():
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss_mb())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    if args.child == "consume+allocator":
        from uniql_jax.host_memory import return_freed_arrays_to_os

        assert return_freed_arrays_to_os()
    import jax

    from uniql_jax import pipeline

    time.sleep(0.5)
    stage[0] = "convert"
    config = pipeline.CompressConfig(arch="llama", model=args.model, calib=args.calib, eval=args.eval,
                                     calib_samples=args.calib_samples, seq_len=args.seq_len, eval_windows=args.windows,
                                     rates=(0.0, 0.35))
    inputs = pipeline.load_inputs(config)
    weights = int(sum(x.size * 4 for x in jax.tree.leaves(inputs.params)))
    stages = pipeline.Timer.stage

    @contextlib.contextmanager
    def tracked(self, name):
        stage[0] = name
        with stages(self, name):
            yield

    pipeline.Timer.stage = tracked
    t0 = time.perf_counter()
    consume = args.child != "keep"
    _, _, _, report = pipeline.compress(config, inputs, consume_inputs=consume)
    time.sleep(0.5)
    return {"setting": args.child, "consume_inputs": consume, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_mb_per_stage": {k: round(v) for k, v in peaks.items()}, "peak_mb": round(max(peaks.values())),
            "float32_weight_mb": round(weights / 2**20), "ppl_w4": [r["ppl"] for r in report["rates"]]}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for setting in SETTINGS:
        cmd = [sys.executable, "-m", "benchmarks.compress_memory", "--child", setting, "--model", args.model,
               "--calib", args.calib, "--eval", args.eval, "--calib-samples", str(args.calib_samples),
               "--windows", str(args.windows), "--seq-len", str(args.seq_len)]
        print("running", setting, flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            sys.exit(f"{setting} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out = {"model": args.model, "calib_samples": args.calib_samples, "windows": args.windows, "seq_len": args.seq_len,
           "quantizer": "gptq", "rates": [0.0, 0.35], "host": platform.node(), "cpus": os.cpu_count(),
           "settings": rows, "same_result": all(r["ppl_w4"] == rows[0]["ppl_w4"] for r in rows)}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
