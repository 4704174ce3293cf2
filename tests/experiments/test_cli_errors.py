"""Command-line tools: one-line errors with exit status 2 and nothing half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and not l.startswith(" ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_arch(tmp_path):
    proc = run_cli("experiments.compress", "--arch", "gpt5", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "gpt5")
    assert not (tmp_path / "o").exists()


def test_model_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "m").mkdir()
    proc = run_cli("experiments.compress", "--arch", "llama", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "config.json")
    assert not (tmp_path / "o").exists() and not any(p.name.startswith(".o") for p in tmp_path.iterdir())


def test_existing_output_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    proc = run_cli("experiments.compress", "--arch", "llama", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "exists")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("rates", ["0,abc", "0,1.5", "-0.1"])
def test_bad_rates(tmp_path, rates):
    proc = run_cli("experiments.compress", "--arch", "llama", "--rates", rates, "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--rates")


def test_unreadable_eval_data(tmp_path):
    proc = run_cli("experiments.compress", "--arch", "llama", "--eval", str(tmp_path / "none.txt"),
                   "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "none.txt")
    assert not (tmp_path / "o").exists()


def assert_no_hidden_siblings(folder):
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_arch_mismatch(tmp_path):
    proc = run_cli("experiments.compress", "--arch", "mamba2", "--model", "experiments/defaults/llama",
                   "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "llama checkpoint, not mamba2")
    assert not (tmp_path / "o").exists()
    assert_no_hidden_siblings(tmp_path)


def test_failed_run_with_overwrite_keeps_the_old_output(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    proc = run_cli("experiments.compress", "--arch", "llama", "--overwrite", "--eval", str(tmp_path / "none.txt"),
                   "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "none.txt")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    assert_no_hidden_siblings(tmp_path)


# --- the output folder: replaced only by a complete new one (the success path of --overwrite runs in
# test_e2e_defaults.py, which compresses into a folder holding a stale file)


def test_staged_output_failure_keeps_the_old_folder(tmp_path):
    from experiments.common import staged_output

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="stage failed") as failure:
        with staged_output(tmp_path / "o", overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half-written")
            assert not (tmp_path / "o" / "half.txt").exists()  # nothing lands in --out while writing
            raise RuntimeError("stage failed")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]
    assert_no_hidden_siblings(tmp_path)
    # what was written is not thrown away silently: kept beside --out, and the error says where
    assert (tmp_path / "o.incomplete" / "half.txt").read_text() == "half-written"
    assert any(str(tmp_path / "o.incomplete") in note for note in failure.value.__notes__)


def test_failed_save_after_the_work_keeps_the_report_and_says_where(tmp_path, monkeypatch, capsys):
    """Issue 17: a save that fails after every stage ran: one line naming the failure and where the
    report is, exit status 1 with the traceback in a log file (a bug), nothing in --out."""
    from experiments import compress
    from uniql_jax import checkpoint
    from uniql_jax.paths import TINYSTORIES

    def broken_save(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(checkpoint, "save", broken_save)
    monkeypatch.setattr("uniql_jax.save", broken_save)
    text = tmp_path / "t.txt"
    text.write_text(open(TINYSTORIES).read()[:20000])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        compress.main(["--arch", "llama", "--out", "o", "--quantizer", "none", "--calib", "t.txt", "--eval", "t.txt",
                       "--calib-samples", "2", "--seq-len", "16", "--rates", "0,0.35"])
    assert exit_.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if line.startswith("error")]  # the rest: progress lines
    assert len(err) == 1 and "disk on fire" in err[0] and str(tmp_path / "o.incomplete") in err[0], err
    log_file = Path(err[0].split("traceback in ")[1].rstrip(")"))
    assert "broken_save" in log_file.read_text()
    assert not (tmp_path / "o").exists()
    kept = {p.name for p in (tmp_path / "o.incomplete").iterdir()}
    assert {"report.json", "report.png", "tokenizer"} <= kept, kept
    assert json.loads((tmp_path / "o.incomplete" / "report.json").read_text())["rates"][1]["rate"] == 0.35


def test_staged_output_replaces_the_whole_folder(tmp_path, monkeypatch):
    import shutil

    from experiments import common

    (tmp_path / "o" / "sub").mkdir(parents=True)
    (tmp_path / "o" / "sub" / "old.txt").write_text("old")
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **kw):  # whenever the old folder is deleted, --out is already the complete new one
        if Path(path).exists() and ".replaced-" in str(path):
            seen.append(sorted(p.name for p in (tmp_path / "o").iterdir()))
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(common.shutil, "rmtree", rmtree)
    with common.staged_output(tmp_path / "o", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["new.txt"]
    assert seen == [["new.txt"]]  # the old folder was set aside whole, then deleted
    assert_no_hidden_siblings(tmp_path)


# --- evaluate / generate on a damaged or mismatched checkpoint (tiny_run: tests/experiments/conftest.py)


def damaged_copy(tiny_run, tmp_path, damage):
    import shutil

    from tests.helpers import largest_data_file

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    victim = largest_data_file(run / "checkpoint")
    raw = bytearray(victim.read_bytes())
    victim.write_bytes(damage(raw))
    return run


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def test_evaluate_truncated_checkpoint(tiny_run, tmp_path):
    run = damaged_copy(tiny_run, tmp_path, lambda raw: bytes(raw[: len(raw) // 2]))
    before = listing(run)
    proc = run_cli("experiments.evaluate", "--ckpt", str(run))
    assert_one_line_error(proc, "truncated")
    assert listing(run) == before


def test_generate_corrupted_checkpoint(tiny_run, tmp_path):
    def flip(raw):
        for i in range(len(raw) // 3, len(raw) // 3 + 64):
            raw[i] ^= 0xFF
        return bytes(raw)

    run = damaged_copy(tiny_run, tmp_path, flip)
    proc = run_cli("experiments.generate", "--ckpt", str(run), "--rate", "0.25", "--prompt", "Once")
    assert_one_line_error(proc, "corrupted")


def test_evaluate_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "nockpt").mkdir()
    proc = run_cli("experiments.evaluate", "--ckpt", str(tmp_path / "nockpt"))
    assert_one_line_error(proc, "not a uniql-jax checkpoint")
    assert list((tmp_path / "nockpt").iterdir()) == []


def test_evaluate_rate_out_of_range(tiny_run):
    before = listing(tiny_run)
    proc = run_cli("experiments.evaluate", "--ckpt", str(tiny_run), "--rates", "0,0.5")
    assert_one_line_error(proc, "rate 0.5 is outside [0, 0.35]")
    assert listing(tiny_run) == before


def test_generate_rate_not_in_table_names_the_nearest(tiny_run):
    proc = run_cli("experiments.generate", "--ckpt", str(tiny_run), "--rate", "0.32", "--prompt", "Once")
    assert_one_line_error(proc, "rate 0.32 is not stored", "stored: 0, 0.15, 0.25, 0.35", "(0.35)")


# --- a real model (--model): the arch comes from the checkpoint, the data never silently default to TinyStories


def test_neither_arch_nor_model(tmp_path):
    proc = run_cli("experiments.compress", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--arch", "--model")


def test_arch_read_from_a_gguf_file_and_an_explicit_one_must_agree(tmp_path, shared_data):
    gguf = shared_data / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    proc = run_cli("experiments.compress", "--model", str(gguf), "--arch", "mamba2", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "llama checkpoint, not mamba2")
    assert not (tmp_path / "o").exists()


def test_model_without_calibration_data_offline_asks_for_calib(tmp_path):
    """Offline and not cached, the WikiText-2 default of --model cannot load: one line naming --calib."""
    proc = run_cli("experiments.compress", "--model", "experiments/defaults/llama", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "no --calib given", "wikitext", "pass --calib")
    assert not (tmp_path / "o").exists()
    assert_no_hidden_siblings(tmp_path)


@pytest.mark.parametrize("args,needle", [
    (["--quantizer", "uniquan", "--quantizer-option", "stepz=3"], "stepz"),
    (["--quantizer", "uniquan", "--quantizer-option", "steps=many"], "steps"),
    (["--quantizer", "uniquan", "--quantizer-option", "steps"], "KEY=VALUE"),
    (["--quantizer", "gptq", "--quantizer-option", "steps=3"], "no options"),
    (["--quantizer", "uniquan", "--zero-point"], "--zero-point"),
    (["--quantizer", "rtn", "--act-order"], "--act-order"),
])
def test_bad_quantizer_settings(tmp_path, args, needle):
    proc = run_cli("experiments.compress", "--arch", "llama", *args, "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "o").exists()


def test_quantizer_options_parse_to_the_driver_types():
    from experiments.compress import quantizer_options

    assert quantizer_options("uniquan", ["steps=7", "lr=0.002", "head_steps=0"]) == (
        ("steps", 7), ("lr", 0.002), ("head_steps", 0))
