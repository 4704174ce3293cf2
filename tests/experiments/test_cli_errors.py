"""Command-line tools: one-line errors with exit status 2 and nothing half-written."""

import json
import os
import subprocess
import sys

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
