"""Compression and evaluation across processes (uniql_jax.distributed, docs/distributed.md).

The multi-process tests start real jobs on localhost: N processes of
`python -m experiments.compress` / `experiments.evaluate`, each with 2 CPU devices
(XLA_FLAGS), joined by `jax.distributed` (gloo collectives), against the same command in
one process with as many devices. Equality asserted:

* 2 processes x 2 devices vs 1 process x 4 devices (the same data-parallel layout):
  bit-identical, everything: rate table, every stored array (packed codes, scales,
  norms, float weights), report perplexities. Calibration statistics are added in a fixed
  order (`distributed.ordered_psum`), per-window NLLs are summed on the host in window
  order, so nothing depends on how devices are spread over processes.
* vs 1 process x 2 devices (another per-device batch: float reassociation in the sums):
  the table and perplexities within tolerance; codes may differ near rounding boundaries.

The collective checkpoint save / sharded load and the lm-eval backend run small jobs of
`tests.multiprocess_jobs` on the same launcher. (Slightly over 400 lines on purpose: every
multi-process test shares the launch helpers and the module's reference run.)
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from uniql_jax import distributed

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO.parent / "shared" / "data" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- launching jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(devices: int, cache: Path | None) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if cache is not None:  # GPTQ / sort programs compiled by the first job are reused by the next ones
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def start(module: str, args: list[str], *, processes: int, devices: int, log_dir: Path, timeout_s: int = 60,
          cache: Path | None = None) -> list[subprocess.Popen]:
    """`processes` processes of `python -m module args` (one: no distributed flags), logs in log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for i in range(processes):
        extra = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                           "--process-id", str(i), "--distributed-timeout", str(timeout_s)]
        out = open(log_dir / f"p{i}.out", "w")
        err = open(log_dir / f"p{i}.err", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args, *extra], cwd=REPO,
                                      env=job_env(devices, cache), stdout=out, stderr=err))
    return procs


def wait_all(procs, log_dir: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
    finally:
        for p in procs:  # ours, by pid
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def run_job(module, args, *, processes, devices, log_dir, timeout=900, cache=None) -> float:
    """Run a job to completion; wall time of the whole job (start to last exit)."""
    t0 = time.perf_counter()
    procs = start(module, args, processes=processes, devices=devices, log_dir=log_dir, cache=cache)
    codes = wait_all(procs, log_dir, timeout)
    wall = time.perf_counter() - t0
    if any(codes):
        logs = "\n".join(f"--- process {i} (rc {c}):\n" + (log_dir / f"p{i}.err").read_text()[-3000:]
                         for i, c in enumerate(codes))
        raise AssertionError(f"{module} failed: {codes}\n{logs}")
    return wall


# gloo's connection notice, written by its C++ threads: two of them can interleave mid-line
# ("[Gloo] Rank [Gloo] Rank 0 is connected ...\n1 is connected ..."), so the pieces are removed
GLOO_NOTICE = re.compile(r"\[Gloo\] Rank |\d+ is connected to \d+ peer ranks\. "
                         r"Expected number of connected peer ranks is : \d+\n?")


def printed(path: Path) -> str:
    """A process's stdout without gloo's own connection notices."""
    return GLOO_NOTICE.sub("", path.read_text())


def load_run(folder: Path):
    from uniql_jax import checkpoint
    from uniql_jax.checkpoint.layout import raw_arrays

    info = checkpoint.read_info(folder / "checkpoint")
    _, params = checkpoint.load(folder / "checkpoint")
    raw = {k: np.asarray(v) for k, v in raw_arrays(params).items()}
    report = json.loads((folder / "report.json").read_text())
    return info, raw, report


def job_results(log_dir: Path, processes: int) -> list[dict]:
    """The JSON line each process of a `tests.multiprocess_jobs` job printed last."""
    return [json.loads(printed(log_dir / f"p{i}.out").strip().splitlines()[-1]) for i in range(processes)]


def manifest_without_provenance(folder: Path) -> dict:
    """A checkpoint's manifest body less what differs between two saves of the same model (the data
    folder's name and files, creation time, versions, argv)."""
    from uniql_jax import checkpoint

    body = dict(checkpoint.read_info(folder).body)
    for key in ("data", "files", "provenance"):
        body.pop(key)
    return body


def data_bytes_by_writer(folder: Path) -> dict[str, int]:
    """Bytes of the OCDBT data files of a checkpoint, per folder that holds them ("." or ocdbt.process_<i>)."""
    from tests.helpers import data_dir

    out: dict[str, int] = {}
    for f in data_dir(folder).rglob("*"):
        if f.is_file() and f.parent.name == "d":
            writer = f.parent.parent.relative_to(data_dir(folder)).as_posix()
            out[writer] = out.get(writer, 0) + f.stat().st_size
    return out


def ppl_rows(report) -> dict:
    return {key: [r["ppl"] for r in report[key]] for key in ("rates_16bit", "rates")} | {
        "baseline": [report["baseline"]["ppl"]]}


COMPRESS_ARGS = ["--arch", "llama", "--calib-samples", "8", "--seq-len", "32", "--rates", "0,0.25",
                 "--eval-windows", "8", "--quantizer", "gptq"]


# ----------------------------------------------------------------------------- the runtime, in one process


def test_one_process_needs_no_runtime():
    rt = distributed.initialize()  # nothing passed, no cluster here: nothing started
    assert rt.process_count == 1 and rt.how == "single process"
    with pytest.raises(ValueError, match="--coordinator"):
        distributed.initialize(coordinator="127.0.0.1:1")  # incomplete explicit job: refused before any start


def fake_mesh(processes: int, local: int, model: int = 1):
    devs = np.asarray([SimpleNamespace(process_index=p, id=p * local + d) for p in range(processes)
                       for d in range(local)], dtype=object).reshape(-1, model)
    return SimpleNamespace(devices=devs, axis_names=("data", "model"), shape={"data": devs.shape[0], "model": model})


@pytest.mark.parametrize("processes,local,model", [(1, 4, 1), (2, 2, 1), (4, 2, 2), (2, 4, 2)])
def test_process_rows_partition_every_step(processes, local, model):
    """Every row is fed by exactly one process, and row r sits on data shard (r mod step) // per_shard
    whatever the process count (the layout of one process with as many devices)."""
    mesh = fake_mesh(processes, local, model)
    n, per_step = 48, 8 * mesh.shape["data"] // math.gcd(8, mesh.shape["data"])
    n = n // per_step * per_step or per_step
    shares = [distributed.process_rows(n, per_step, mesh, process=p) for p in range(processes)]
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(n))
    per_shard = per_step // mesh.shape["data"]
    for p, rows in enumerate(shares):
        shard = (rows % per_step) // per_shard
        assert all(mesh.devices[s, 0].process_index == p for s in shard)
        assert np.all(np.diff(rows) > 0)  # in row order: the step loop walks them front to back


def test_weight_spec_prefers_the_output_dim_and_falls_back():
    from jax.sharding import PartitionSpec as P

    assert distributed.weight_spec("q", (8192, 64, 128), 8) == P(None, None, "model")  # output dim
    assert distributed.weight_spec("o", (64, 128, 8192), 8) == P(None, None, "model")
    assert distributed.weight_spec("w", (1024, 1001), 8) == P("model")  # 1001 % 8 != 0: the input dim
    assert distributed.weight_spec("norm", (8192,), 8) == P()  # vectors stay replicated
    assert distributed.weight_spec("w", (7, 9), 8) == P()  # nothing divides
    assert distributed.weight_spec("w", (1024, 1024), 1) == P()


# ----------------------------------------------------------------------------- 2 processes on localhost


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, compile_cache):
    """compress in 1 process with 4 devices (populates the compile cache), timed."""
    root = tmp_path_factory.mktemp("ref")
    wall = run_job("experiments.compress", COMPRESS_ARGS + ["--out", str(root / "run")], processes=1, devices=4,
                   log_dir=root / "logs", cache=compile_cache)
    return root / "run", wall


def test_two_processes_compress_bit_identical_to_one_process(tmp_path, reference_run, compile_cache):
    """2 processes x 2 devices == 1 process x 4 devices, bit for bit: the table, every stored array
    (codes, scales, float weights), every perplexity of the report; only process 0 wrote."""
    ref, ref_wall = reference_run
    out = tmp_path / "run"
    wall = run_job("experiments.compress", COMPRESS_ARGS + ["--out", str(out)], processes=2, devices=2,
                   log_dir=tmp_path / "logs", cache=compile_cache)
    info_a, raw_a, rep_a = load_run(ref)
    info_b, raw_b, rep_b = load_run(out)
    assert info_a.table == info_b.table
    assert set(raw_a) == set(raw_b)
    differ = [k for k in raw_a if not (raw_a[k].dtype == raw_b[k].dtype and np.array_equal(raw_a[k], raw_b[k]))]
    assert not differ, f"arrays not bit-identical: {differ}"
    assert any(k.endswith("codes") for k in raw_a)  # GPTQ codes among them
    assert ppl_rows(rep_a) == ppl_rows(rep_b)
    # the collective save recorded the same manifest (config, table, layout, storage splits, CRC-32 per box)
    assert manifest_without_provenance(ref / "checkpoint") == manifest_without_provenance(out / "checkpoint")
    # process 0 printed the table, process 1 printed nothing; nothing but the run folder was written
    assert "rate" in printed(tmp_path / "logs" / "p0.out")
    assert printed(tmp_path / "logs" / "p1.out").strip() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "run"]
    print(f"\ncompress wall time: 1 process x 4 devices {ref_wall:.1f} s (cold compile cache), "
          f"2 processes x 2 devices {wall:.1f} s (warm)")


def test_two_processes_evaluate_the_saved_checkpoint(tmp_path, reference_run, compile_cache):
    """experiments.evaluate on 2 processes: every process loads the checkpoint, the windows are split over
    the 4 global devices; process 0 prints the perplexities of the compress report, bit for bit."""
    ref, _ = reference_run
    run_job("experiments.evaluate", ["--ckpt", str(ref), "--json"], processes=2, devices=2,
            log_dir=tmp_path / "logs", cache=compile_cache)
    rows = json.loads(printed(tmp_path / "logs" / "p0.out"))
    report = json.loads((ref / "report.json").read_text())
    assert [r["ppl"] for r in rows] == [r["ppl"] for r in report["rates"]]
    assert printed(tmp_path / "logs" / "p1.out").strip() == ""


def test_collective_save_and_sharded_load_across_two_processes(tmp_path, compile_cache):
    """A model sharded over a "model" axis that spans both processes (2 processes x 2 devices, model axis 4):

    * saved collectively, each process writes the shards it owns (both processes' OCDBT folders hold
      a large share of the data), and the checkpoint equals the one 1 process x 4 devices saves:
      every array at every rate bit-identical, the same manifest apart from provenance;
    * loaded with ``mesh=``, each process reads at most 60 % of what a whole load of the rate reads
      (TensorStore's byte counter), and the arrays, all-gathered, are the whole load's bit for bit,
      for its own checkpoint and for the one written by a single process."""
    from uniql_jax import checkpoint
    from uniql_jax.checkpoint.layout import raw_arrays

    one, two = tmp_path / "one", tmp_path / "two"
    args = ["checkpoint", "--model-axis", "4"]
    walls = {"one": run_job("tests.multiprocess_jobs", args + ["--out", str(one)], processes=1, devices=4,
                            log_dir=tmp_path / "logs-one", timeout=300, cache=compile_cache),
             "two": run_job("tests.multiprocess_jobs", args + ["--out", str(two), "--also", str(one)], processes=2,
                            devices=2, log_dir=tmp_path / "logs-two", timeout=300, cache=compile_cache)}
    results = job_results(tmp_path / "logs-two", 2)
    info = checkpoint.read_info(two)
    assert sorted(map(float, results[0]["rates"])) == sorted(info.rates)
    for res in results:
        assert res["also_identical"] is True
        for rate, counts in res["rates"].items():
            assert counts["identical"], (res["process"], rate)
            assert 0 < counts["mine"] <= 0.6 * counts["whole"], (res["process"], rate, counts)
    for rate in info.rates:  # every stored array, bit-identical to the single-process save
        a = raw_arrays(checkpoint.load(one, rate)[1])
        b = raw_arrays(checkpoint.load(two, rate)[1])
        assert set(a) == set(b)
        assert all(a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    assert manifest_without_provenance(one) == manifest_without_provenance(two)
    written = {k: v for k, v in data_bytes_by_writer(two).items() if k.startswith("ocdbt.process_")}
    assert set(written) == {"ocdbt.process_0", "ocdbt.process_1"}, written  # (the root: OCDBT's merged index)
    assert min(written.values()) > 0.4 * sum(written.values()), written  # each wrote about its half
    print("\nbytes read per process (sharded / whole): " + "; ".join(
        f"p{res['process']} rate {rate}: {c['mine']} / {c['whole']} ({c['mine'] / c['whole']:.0%})"
        for res in results for rate, c in res["rates"].items())
        + f"; data written per process: {written}; wall: 1 x 4 {walls['one']:.1f} s, 2 x 2 {walls['two']:.1f} s")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """The offline local lm-eval tasks of tests/test_harness.py (a cloze and a rolling log-likelihood task)."""
    from uniql_jax import data
    from uniql_jax.accuracy import write_text_tasks
    from uniql_jax.paths import TINYSTORIES

    folder = tmp_path_factory.mktemp("tasks")
    write_text_tasks(folder, data.load_documents(TINYSTORIES, part="heldout"), name="stories", n_items=8)
    return folder


@pytest.mark.slow
def test_lm_eval_backend_on_two_processes_equals_one_process(tmp_path, tasks_dir, compile_cache):
    """lm-eval's simple_evaluate through the `uniql` backend on 2 processes x 2 devices (every process
    runs the same requests, each feeds only its rows of every batch, the scores come back all-gathered)
    vs 1 process x 4 devices: every process gets every request's log-likelihood, equal to the one
    process's (the same per-device batches), in request order. (Slow: about 90 s on 2 shared cores, mostly
    start-up and compilation of 3 processes.)"""
    from uniql_jax.paths import DEFAULTS

    args = ["harness", "--model", str(DEFAULTS / "llama"), "--tasks-dir", str(tasks_dir)]
    walls = {}
    for name, processes, devices in (("one", 1, 4), ("two", 2, 2)):
        walls[name] = run_job("tests.multiprocess_jobs", args, processes=processes, devices=devices,
                              log_dir=tmp_path / name, timeout=300, cache=compile_cache)
    (one,) = job_results(tmp_path / "one", 1)
    two = job_results(tmp_path / "two", 2)
    assert set(one["loglikelihoods"]) == {"stories_cloze", "stories_rolling"}
    for res in two:
        assert res["batches"] == one["batches"]  # the same batches, each split over the 2 processes
        for task, want in one["loglikelihoods"].items():
            got = res["loglikelihoods"][task]
            assert [len(r) for r in got] == [len(r) for r in want]
            np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-5)
    assert len({x for r in one["loglikelihoods"]["stories_cloze"] for x in r}) > 8  # distinct scores, not zeros
    print(f"\nlm-eval backend wall time: 1 x 4 {walls['one']:.1f} s, 2 x 2 {walls['two']:.1f} s; identical: "
          f"{all(r['loglikelihoods'] == one['loglikelihoods'] for r in two)}")


@pytest.mark.slow
def test_two_processes_evaluate_tasks_reading_the_checkpoint_sharded(tmp_path, reference_run, tasks_dir,
                                                                   compile_cache):
    """experiments.evaluate --tasks with --model-axis 4 on 2 processes x 2 devices: the checkpoint is read
    sharded over both processes, lm-eval runs through the backend on the global mesh, and only process 0
    prints and writes accuracy.json, whose accuracies equal those of 1 process x 4 devices. (Slow: two
    lm-eval runs of about a minute each on 2 cores, after the module's reference compress.)"""
    ref, _ = reference_run
    rows, walls = {}, {}
    for name, processes, devices in (("one", 1, 4), ("two", 2, 2)):
        out = tmp_path / name
        walls[name] = run_job("experiments.evaluate", ["--ckpt", str(ref), "--tasks", "stories_cloze,stories_rolling",
                                                       "--tasks-dir", str(tasks_dir), "--model-axis", "4", "--out",
                                                       str(out), "--json"],
                              processes=processes, devices=devices, log_dir=tmp_path / f"logs-{name}",
                              cache=compile_cache)
        rows[name] = json.loads((out / "accuracy.json").read_text())["rates"]
        assert json.loads(printed(tmp_path / f"logs-{name}" / "p0.out")) == rows[name]
        assert sorted(p.name for p in out.iterdir()) == ["accuracy.json", "accuracy.png"]
    assert printed(tmp_path / "logs-two" / "p1.out").strip() == ""  # process 1 printed nothing
    assert [r["rate"] for r in rows["two"]] == [r["rate"] for r in rows["one"]] and len(rows["one"]) >= 2
    for a, b in zip(rows["one"], rows["two"]):
        assert a["accuracy"].keys() == b["accuracy"].keys()
        np.testing.assert_allclose(list(b["accuracy"].values()), list(a["accuracy"].values()), rtol=1e-5)
    print(f"\nevaluate --tasks --model-axis 4 wall time: 1 x 4 {walls['one']:.0f} s, 2 x 2 {walls['two']:.0f} s")


def test_a_dead_process_fails_the_job_without_a_checkpoint(tmp_path, compile_cache):
    """Process 1 is killed mid-run (after sorting): process 0 fails within the heartbeat timeout plus a
    margin, with an error on stderr, and leaves no output folder and no checkpoint anywhere."""
    out = tmp_path / "run"
    logs = tmp_path / "logs"
    heartbeat = 10
    procs = start("experiments.compress", COMPRESS_ARGS + ["--out", str(out)], processes=2, devices=2,
                  log_dir=logs, timeout_s=heartbeat, cache=compile_cache)
    try:
        deadline = time.monotonic() + 600
        while "[sort] done" not in (logs / "p0.err").read_text():
            assert procs[0].poll() is None and procs[1].poll() is None, "a process ended before the kill"
            assert time.monotonic() < deadline, "sorting never finished"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc0 = procs[0].wait(timeout=heartbeat + 120)
        failed_after = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err = (logs / "p0.err").read_text()
    assert rc0 != 0, err[-2000:]
    assert failed_after < heartbeat + 120
    tail = err[-4000:].lower()
    assert any(word in tail for word in ("error", "fatal", "terminat")), err[-2000:]
    assert not out.exists()
    assert not list(tmp_path.rglob("uniql.json")), "a checkpoint manifest was written"
    print(f"\nprocess 0 failed {failed_after:.1f} s after process 1 was killed (heartbeat {heartbeat} s); "
          f"last line: {err.strip().splitlines()[-1][:300]}")


@pytest.mark.slow
def test_two_processes_compress_smollm2_bit_identical(tmp_path, compile_cache):
    """SmolLM2-135M (GGUF, 30 layers) compressed on 2 processes x 2 devices and on 1 process x 4 devices,
    a few short calibration windows: the same table, bit-identical arrays and perplexities."""
    if not SMOLLM2.is_file():
        pytest.fail(f"{SMOLLM2} is required by this test")
    stories = REPO.parent / "shared" / "data" / "tinystories" / "tinystories_valid_900.txt"
    args = ["--model", str(SMOLLM2), "--calib", str(stories), "--eval", str(stories), "--calib-samples", "4",
            "--seq-len", "32", "--rates", "0,0.25", "--eval-windows", "4", "--quantizer", "gptq"]
    walls = {}
    for name, processes, devices in (("one", 1, 4), ("two", 2, 2)):
        walls[name] = run_job("experiments.compress", args + ["--out", str(tmp_path / name)], processes=processes,
                              devices=devices, log_dir=tmp_path / f"logs-{name}", timeout=3000, cache=compile_cache)
    info_a, raw_a, rep_a = load_run(tmp_path / "one")
    info_b, raw_b, rep_b = load_run(tmp_path / "two")
    assert info_a.table == info_b.table
    differ = [k for k in raw_a if not np.array_equal(raw_a[k], raw_b[k])]
    assert not differ, f"arrays not bit-identical: {differ[:10]}"
    assert ppl_rows(rep_a) == ppl_rows(rep_b)
    print(f"\nSmolLM2 compress wall time: 1 process x 4 devices {walls['one']:.0f} s (cold compile cache), "
          f"2 processes x 2 devices {walls['two']:.0f} s (warm)")
