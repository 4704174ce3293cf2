"""End to end on each shipped default model (issue 10, "Must show"):

compress -> save -> load at 0, 15, 25 and 35 % in a fresh process -> the perplexity
equals the one `compress` reported.

`experiments.compress.run` runs in-process with cheap settings (8 calibration windows
of 64 tokens, a few held-out stories as evaluation text). One fresh interpreter then
reads the run folder with the library alone (`uq.load(path, rate=r)`, the tokenizer
stored beside the checkpoint, no `experiments` import) and computes each rate's
perplexity the way compress does (`uq.perplexity` on the evaluation file's token
stream, compress's seq_len and batch size). The four rates' perplexities differ, so a
load that returned another rate's model, lost the quantization or a permutation
would not match.

CPU cost (measured on the shared 2-core machine, see the README notes): nemotron_h
with GPTQ (Mamba2 + attention + MLP blocks, the default quantizer) stays in the
default tier; the other archs, round-to-nearest, are marked slow.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments import compress
from uniql_jax.paths import DEFAULTS, TINYSTORIES
from tests.conftest import REPO

RATES = (0.0, 0.15, 0.25, 0.35)
SEQ_LEN = 64
BATCH_SIZE = 4  # evaluate_rates' default, the batch compress evaluates with

# arch -> quantizer; slow ones marked
CASES = [
    # nemotron_h with GPTQ in the default tier: the README's quick start, verbatim (test_readme_quick_start_...)
    pytest.param("nemotron_h", "gptq", id="nemotron_h-gptq", marks=pytest.mark.slow),
    pytest.param("llama", "rtn", id="llama-rtn", marks=pytest.mark.slow),
    pytest.param("qwen2", "rtn", id="qwen2-rtn", marks=pytest.mark.slow),
    pytest.param("mamba2", "rtn", id="mamba2-rtn", marks=pytest.mark.slow),
    pytest.param("bamba", "rtn", id="bamba-rtn", marks=pytest.mark.slow),
]

# Run in a fresh interpreter: the library alone, no experiments import.
RELOAD = textwrap.dedent("""
    import json, sys
    import uniql_jax as uq
    from converters import hf
    from uniql_jax import data
    from uniql_jax.compress.allocate import param_count
    from uniql_jax.quant.formats.packed import deployed_bytes

    run, eval_file, seq_len, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rates = [float(r) for r in sys.argv[5].split(",")]
    part = {} if len(sys.argv) < 7 else {"part": sys.argv[6]}
    tokens = data.load_tokens(eval_file, hf.load_tokenizer(run + "/tokenizer"), **part)
    rows = []
    for r in rates:
        cfg, params = uq.load(run + "/checkpoint", rate=r)
        ppl = uq.perplexity(cfg, params, tokens, seq_len=seq_len, batch_size=batch_size)
        rows.append({"rate": r, "ppl": ppl, "params": param_count(cfg), "param_bytes": deployed_bytes(params)})
    assert not any(m == "experiments" or m.startswith("experiments.") for m in sys.modules)
    print(json.dumps({"rows": rows, "n_tokens": int(len(tokens))}))
""")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """(calibration, evaluation) text files: the first training stories, the last held-out ones."""
    from uniql_jax import data

    folder = tmp_path_factory.mktemp("text")
    calib, evaluation = folder / "calib.txt", folder / "eval.txt"
    calib.write_text("\n\n".join(data.load_documents(TINYSTORIES, part="train")[:40]))
    evaluation.write_text("\n\n".join(data.load_documents(TINYSTORIES, part="heldout")[-8:]))
    return calib, evaluation


@pytest.mark.parametrize("arch, quantizer", CASES)
def test_compress_then_load_in_a_fresh_process_reproduces_the_reported_perplexity(arch, quantizer, text_files,
                                                                                  tmp_path):
    assert (DEFAULTS / arch / "config.json").is_file(), f"no shipped default for {arch}"
    calib, evaluation = text_files
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")  # --overwrite must replace the whole folder
    returned = compress.run([
        "--arch", arch, "--out", str(out), "--overwrite", "--quantizer", quantizer, "--calib", str(calib),
        "--calib-samples", "8", "--seq-len", str(SEQ_LEN), "--rates", ",".join(map(str, RATES)),
        "--eval", str(evaluation)])
    assert returned == out
    assert not (out / "stale.txt").exists()
    assert {p.name for p in out.iterdir()} == {"checkpoint", "tokenizer", "report.json", "report.png"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left beside it

    report = json.loads((out / "report.json").read_text())
    assert report["arch"] == arch and report["quantizer"] == quantizer and report["seq_len"] == SEQ_LEN
    reported = {row["rate"]: row for row in report["rates"]}
    assert sorted(reported) == list(RATES)
    ppls = [reported[r]["ppl"] for r in RATES]
    assert all(math.isfinite(p) and 1 < p < 1024 for p in ppls), ppls
    assert len(set(ppls)) == len(RATES), ppls  # every rate is a different model: a mix-up would show
    sizes = [reported[r]["param_bytes"] for r in RATES]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert sizes[0] < 0.5 * report["baseline"]["param_bytes"]  # quantized well below 16 bits

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(evaluation), str(SEQ_LEN), str(BATCH_SIZE),
         ",".join(map(str, RATES))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reloaded["n_tokens"] // SEQ_LEN >= 16  # enough windows that the figure means something
    for row in reloaded["rows"]:
        want = reported[row["rate"]]
        assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-5, abs=0), (row, want)
        assert (row["params"], row["param_bytes"]) == (want["params"], want["param_bytes"]), (row, want)


def readme_quick_start() -> str:
    """The compress command of the README's quick start, exactly as printed (after the install)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    install, command = block.split(" && ")
    assert install == "pip install -e ." and command.startswith("python -m experiments.compress"), block
    return command


def test_readme_quick_start_verbatim_from_a_fresh_directory(tmp_path):
    """Issue 17: the README's main job, typed as printed in an empty working directory (default --out
    runs/<arch>-<timestamp>, relative), then the run folder used through relative paths only: uq.load at
    two rates in a fresh interpreter, experiments.evaluate --ckpt runs/..., experiments.generate."""
    command = readme_quick_start()
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("nemotron_h-"), runs  # nothing staged left beside it
    run = Path("runs") / runs[0].name  # relative to tmp_path, the working directory of every command below
    assert {p.name for p in (tmp_path / run).iterdir()} == {"checkpoint", "tokenizer", "report.json", "report.png"}
    report = json.loads((tmp_path / run / "report.json").read_text())
    reported = {row["rate"]: row for row in report["rates"]}
    assert sorted(reported) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35]
    assert report["quantizer"] == "gptq" and report["bits"] == 4
    assert reported[0.35]["param_bytes"] < reported[0.0]["param_bytes"] < 0.5 * report["baseline"]["param_bytes"]

    rates = (0.0, 0.25)
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(run), str(TINYSTORIES), str(report["seq_len"]), str(BATCH_SIZE),
         ",".join(map(str, rates)), "heldout"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row["rate"] for row in reloaded["rows"]] == list(rates)
    for row in reloaded["rows"]:
        want = reported[row["rate"]]
        assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-5, abs=0), (row, want)
        assert (row["params"], row["param_bytes"]) == (want["params"], want["param_bytes"]), (row, want)

    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--ckpt", str(run), "--rates", "0.35",
                           "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    # evaluate's own batch size: the same windows, summed in another order
    assert row["ppl"] == pytest.approx(reported[0.35]["ppl"], rel=1e-4), (row, reported[0.35])

    proc = subprocess.run([sys.executable, "-m", "experiments.generate", "--ckpt", str(run), "--rate", "0.25",
                           "--prompt", "Once upon a time", "--max-new-tokens", "12"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.strip()
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 10, text
