"""`experiments.evaluate --tasks`: lm-eval accuracy at several rates of one loaded checkpoint (the rate switched
in-process), equal to the backend over `uq.load` at that rate; unknown or unreachable tasks are one-line
errors (exit 2) naming the task and --tasks-dir."""

import json

import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

import uniql_jax as uq
from experiments import evaluate
from uniql_jax import data, harness
from uniql_jax.accuracy import write_text_tasks
from uniql_jax.paths import TINYSTORIES
from uniql_jax.pipeline import load_saved_tokenizer


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_text_tasks(folder, data.load_documents(TINYSTORIES, part="heldout"), name="stories", n_items=8)
    (folder / "unreachable.yaml").write_text(  # a hub dataset: unreachable offline (the tests run offline)
        "task: unreachable_task\ndataset_path: no-such-org/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: c\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    return folder


def test_accuracy_at_two_rates_from_one_load(tiny_run, tasks_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rows, compiles = evaluate.run(["--ckpt", str(tiny_run), "--rates", "0.35,0", "--tasks", "stories_cloze",
                                   "--tasks-dir", str(tasks_dir), "--out", str(out), "--json", "--batch-size", "4"])
    assert [r["rate"] for r in rows] == [0.0, 0.35]  # the dense rate first
    assert all(r["metric"] == {"stories_cloze": "acc"} and r["n"] == {"stories_cloze": 8} for r in rows)
    assert all(r["average"] == r["accuracy"]["stories_cloze"] for r in rows)
    assert compiles >= 2
    assert json.loads(capsys.readouterr().out) == rows
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["rates"] == rows and saved["tasks"] == ["stories_cloze"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the in-process rate equals the backend over the model uq.load reads at that rate
    tok = load_saved_tokenizer(tiny_run)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    for row in rows:
        cfg, params = uq.load(tiny_run / "checkpoint", rate=row["rate"])
        lm = harness.UniQLM(cfg=cfg, params=params, tokenizer=tok, batch_size=4)
        res = lm_eval.simple_evaluate(model=lm, tasks=["stories_cloze"], limit=8, bootstrap_iters=0,
                                      task_manager=manager)
        assert res["results"]["stories_cloze"]["acc,none"] == row["accuracy"]["stories_cloze"]


def test_registered_backend_switches_rates_like_load(tiny_run):
    lm = get_model("uniql").create_from_arg_string(f"ckpt={tiny_run},rate=0.35,batch_size=2")
    requests = [Instance("loglikelihood", {}, ("Once upon a time", " there was a girl."), 0),
                Instance("loglikelihood", {}, ("", "The dog ran."), 0)]
    at_035 = lm.loglikelihood(requests)
    lm.set_rate(0.0)
    at_0 = lm.loglikelihood(requests)
    tok = load_saved_tokenizer(tiny_run)
    for rate, got in ((0.35, at_035), (0.0, at_0)):
        cfg, params = uq.load(tiny_run / "checkpoint", rate=rate)
        want = harness.UniQLM(cfg=cfg, params=params, tokenizer=tok).loglikelihood(requests)
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)
    assert not np.allclose([g[0] for g in at_0], [g[0] for g in at_035])  # the rate changed the model


@pytest.mark.parametrize("task, why", [("no_such_task", "neither in lm-eval's registry nor in --tasks-dir"),
                                       ("unreachable_task", "its data could not be loaded")])
def test_missing_task_is_a_one_line_error(tiny_run, tasks_dir, tmp_path, capsys, task, why):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--ckpt", str(tiny_run), "--rates", "0", "--tasks", f"stories_cloze,{task}",
                       "--tasks-dir", str(tasks_dir), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert repr(task) in err and why in err and "--tasks-dir" in err
    assert not (tmp_path / "out").exists()  # nothing written
