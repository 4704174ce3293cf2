"""The lm-eval backend `uniql` against lm-eval's own `hf` backend (HFLM, PyTorch) on the HF export of the
same parameters: a local multiple-choice cloze task and a rolling log-likelihood task over held-out
TinyStories, offline. max_length=128 makes long contexts left-truncated and long documents span several
rolling windows, so both of HFLM's truncation paths are exercised."""

import shutil

import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

import uniql_jax.harness as harness
from converters import hf
from uniql_jax import data
from uniql_jax.accuracy import write_text_tasks
from uniql_jax.paths import DEFAULTS, TINYSTORIES

MAX_LEN = 128
LLAMA = DEFAULTS / "llama"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    docs = data.load_documents(TINYSTORIES, part="heldout")
    assert write_text_tasks(folder, docs, name="stories", n_items=16) == ["stories_cloze", "stories_rolling"]
    return folder


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    """hf.save of the embedded llama default (1 M parameters), with its tokenizer."""
    folder = tmp_path_factory.mktemp("hf_llama")
    cfg, params = hf.load(LLAMA)
    hf.save(cfg, params, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA / name, folder / name)
    return folder


def _evaluate(lm, tasks_dir):
    return lm_eval.simple_evaluate(model=lm, tasks=["stories_cloze", "stories_rolling"], log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir)), bootstrap_iters=0)


@pytest.fixture(scope="module")
def both(tasks_dir, hf_export):
    from lm_eval.models.huggingface import HFLM

    ours = get_model("uniql").create_from_arg_string(f"pretrained={LLAMA},max_length={MAX_LEN},batch_size=4")
    reference = HFLM(pretrained=str(hf_export), max_length=MAX_LEN, batch_size=4, device="cpu", dtype="float32")
    return ours, _evaluate(ours, tasks_dir), reference, _evaluate(reference, tasks_dir)


def _loglikelihoods(out, task):
    """Per document (in doc order), the log-likelihood of every request (each choice / the whole text)."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return np.array([[r[0][0] if isinstance(r[0], (tuple, list)) else r[0] for r in s["resps"]] for s in samples])


def test_loglikelihoods_and_accuracy_equal_lm_evals_hf_backend(both):
    ours_lm, ours, _, ref = both
    for task in ("stories_cloze", "stories_rolling"):
        got, want = _loglikelihoods(ours, task), _loglikelihoods(ref, task)
        assert got.shape == want.shape and got.size >= 16
        np.testing.assert_allclose(got, want, rtol=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["stories_cloze"][metric] == ref["results"]["stories_cloze"][metric]
    by_doc = [[s[m] for m in ("acc", "acc_norm")] for s in sorted(ours["samples"]["stories_cloze"], key=lambda s: s["doc_id"])]
    assert by_doc == [[s[m] for m in ("acc", "acc_norm")] for s in sorted(ref["samples"]["stories_cloze"], key=lambda s: s["doc_id"])]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["stories_rolling"][metric] == pytest.approx(ref["results"]["stories_rolling"][metric], rel=1e-4)
    # the test has teeth: documents longer than max_length (several rolling windows, truncated contexts),
    # and choices the model tells apart
    texts = [s["doc"]["text"] for s in ours["samples"]["stories_rolling"]]
    assert max(len(ours_lm.tok_encode(t)) for t in texts) > 2 * MAX_LEN
    cloze = _loglikelihoods(ours, "stories_cloze")
    assert np.all(np.ptp(cloze, axis=1) > 1.0)


def test_each_bucket_compiles_once(both, tasks_dir):
    lm, first, _, _ = both
    assert set(lm.compiles) <= {16, 32, 64, 128} and len(lm.compiles) >= 2
    assert all(n == 1 for n in lm.compiles.values()), lm.compiles
    assert sum(lm.batches.values()) > 3 * len(lm.compiles)  # many batches, one program per bucket
    before = lm.compile_count()
    again = _evaluate(lm, tasks_dir)
    assert lm.compile_count() == before  # a second run compiles nothing
    np.testing.assert_array_equal(_loglikelihoods(again, "stories_cloze"), _loglikelihoods(first, "stories_cloze"))


def test_greedy_flag_and_generate_until_equal_hf(both):
    lm, _, reference, _ = both
    docs = data.load_documents(TINYSTORIES, part="heldout")[:3]
    gen = [Instance("generate_until", {}, (d[:80], {"until": ["."], "max_gen_toks": 12}), 0) for d in docs]
    gen += [Instance("generate_until", {}, ("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 20}), 0)]
    out = lm.generate_until(gen)
    assert out == reference.generate_until(gen)
    assert any(len(o) > 5 for o in out)
    # the continuation the model generates greedily is flagged greedy, a changed one is not
    ll = [Instance("loglikelihood", {}, ("Once upon a time", out[-1]), 0),
          Instance("loglikelihood", {}, ("Once upon a time", " zebra"), 0),
          Instance("loglikelihood", {}, ("", "Once upon a time"), 0)]
    got, want = lm.loglikelihood(ll), reference.loglikelihood(ll)
    assert [g[1] for g in got] == [w[1] for w in want] and got[0][1] and not got[1][1]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4)


def test_bucket_lengths():
    assert [harness.bucket_length(n, min_bucket=16, max_length=100) for n in (1, 16, 17, 33, 64, 65, 100)] == \
        [16, 16, 32, 64, 64, 100, 100]


def test_lm_eval_command_line_through_the_thin_wrapper(both, tasks_dir):
    """`python -m uniql_jax.harness run ...` is lm-eval's own CLI with `uniql` registered: batch_size in
    model_args wins over the CLI's default --batch_size, and its accuracy is the in-process one."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tasks_dir.parent / "cli_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "uniql_jax.harness", "run", "--model", "uniql", "--model_args",
         f"pretrained={LLAMA},max_length={MAX_LEN},batch_size=4", "--tasks", "stories_cloze",
         "--include_path", str(tasks_dir), "--output_path", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results*.json")
    got = json.loads(result_file.read_text())["results"]["stories_cloze"]
    want = both[1]["results"]["stories_cloze"]
    assert got["acc,none"] == want["acc,none"] and got["acc_norm,none"] == want["acc_norm,none"]


TWO_DEVICES = """
import json, sys, jax
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
import uniql_jax.harness  # noqa: F401  (registers "uniql")
assert jax.device_count() == int(sys.argv[2]), jax.devices()
lm = get_model("uniql").create_from_arg_string(f"pretrained={sys.argv[1]},max_length=128,batch_size=2")
texts = ["Once upon a time, there was a little girl named Lily.", "She liked to play in the park with her dog.",
         "One day, the sun was very hot.", "Tom saw a big red ball and he was happy.", "The end."]
reqs = [Instance("loglikelihood", {}, (texts[i], " " + texts[(i + 1) % 5]), i) for i in range(5)]
print(json.dumps([[float(ll), bool(g)] for ll, g in lm.loglikelihood(reqs)]))
"""


def test_two_devices_give_the_same_loglikelihoods():
    """The backend splits each batch over the "data" mesh of all local devices: 2 CPU devices score
    every request as 1 device does (each row computed on its own device, so to float tolerance)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    results = []
    for n in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(LLAMA), str(n)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one, two = np.array(results[0]), np.array(results[1])
    np.testing.assert_allclose(two[:, 0], one[:, 0], rtol=1e-5)
    assert (two[:, 1] == one[:, 1]).all() and len(set(one[:, 0])) == 5
