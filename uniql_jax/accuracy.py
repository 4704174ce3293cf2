"""lm-eval accuracy of an elastic model at every rate, and task definitions over local text.

`accuracy_report` runs lm-eval's ``simple_evaluate`` once per rate over one in-memory
``ElasticModel`` through the `uniql` backend (``uniql_jax.harness.UniQLM``; the rate is switched
in-process, so each distinct block shape compiles once for all rates); `accuracy_table` prints its
rows (rates) by columns (tasks and their average). `write_text_tasks` writes lm-eval YAML task
definitions over JSON lines made from plain-text documents, for machines without network.
`python -m experiments.evaluate --tasks ...` and `experiments.compress --tasks ...` call these.
"""

from __future__ import annotations

import time
from pathlib import Path

from uniql_jax.paths import InputError

# tasks whose accuracy is conventionally reported length-normalized (lm-eval's acc_norm)
ACC_NORM_TASKS = frozenset({"hellaswag", "arc_challenge", "openbookqa"})


def task_accuracy(rows_by_task: dict, task: str) -> tuple[str, float, float | None]:
    """(metric name, value, standard error) reported for a task: acc_norm for ACC_NORM_TASKS, else acc,
    else the task's first metric (e.g. word_perplexity of a rolling task)."""
    metrics = {k.split(",")[0]: v for k, v in rows_by_task.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    order = ("acc_norm", "acc") if task in ACC_NORM_TASKS else ("acc", "acc_norm")
    name = next((m for m in order if m in metrics), next(iter(metrics), None))
    if name is None:
        raise ValueError(f"task {task}: no numeric metric in {sorted(rows_by_task)}")
    stderr = rows_by_task.get(f"{name}_stderr,none")
    return name, float(metrics[name]), stderr if isinstance(stderr, (int, float)) else None


def accuracy_rows(lm, rates, names, manager, *, num_fewshot=None, limit=None, log=print) -> list[dict]:
    """One lm-eval run per rate over the same in-memory model (`lm.set_rate`), in the order given; `limit`:
    the first N documents of each task (a value < 1: that fraction), None: all.

    Row: {"rate", "accuracy": {task: value}, "metric": {task: name}, "stderr": {task: se}, "n": {task: docs},
    "average" (mean of the accuracy metrics; perplexities excluded), "seconds"}."""
    import lm_eval

    rows = []
    for r in rates:
        start = time.perf_counter()
        lm.set_rate(r)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, num_fewshot=num_fewshot,
                                      limit=None if limit is None else (int(limit) if limit >= 1 else limit),
                                      bootstrap_iters=1000, log_samples=False, verbosity="ERROR")
        row = {"rate": r, "accuracy": {}, "metric": {}, "stderr": {}, "n": {}}
        for task in names:
            for leaf in ([task] if task in out["results"] else sorted(out["group_subtasks"].get(task, []))):
                metric, value, se = task_accuracy(out["results"][leaf], leaf)
                row["accuracy"][leaf], row["metric"][leaf], row["stderr"][leaf] = value, metric, se
                row["n"][leaf] = out.get("n-samples", {}).get(leaf, {}).get("effective")
        accs = [v for t, v in row["accuracy"].items() if row["metric"][t].startswith("acc")]
        row["average"] = sum(accs) / len(accs) if accs else None
        row["seconds"] = round(time.perf_counter() - start, 1)
        log(f"rate {r:.2f}: " + ", ".join(f"{t} {row['metric'][t]} {v:.4f}" for t, v in row["accuracy"].items())
            + (f"; average {row['average']:.4f}" if row["average"] is not None else "") + f" ({row['seconds']:.0f} s)")
        rows.append(row)
    return rows


def accuracy_report(elastic, tokenizer, rates, names, manager, *, num_fewshot=None, limit=None, batch_size: int = 8,
                    log=print) -> dict:
    """lm-eval accuracy at every rate of an ElasticModel (one in-memory model, rates switched in-process):
    {"tasks", "num_fewshot", "limit", "rates": accuracy_rows, "compiles": {bucket length: programs}}."""
    from uniql_jax import harness

    if hasattr(tokenizer, "pieces"):
        raise InputError("a llama2.c tokenizer: --tasks needs a transformers tokenizer")
    lm = harness.UniQLM(elastic=elastic, tokenizer=tokenizer, batch_size=batch_size)
    rows = accuracy_rows(lm, rates, names, manager, num_fewshot=num_fewshot, limit=limit, log=log)
    return {"tasks": list(names), "num_fewshot": num_fewshot, "limit": limit, "rates": rows,
            "compiles": {str(k): v for k, v in sorted(lm.compiles.items())}}


def accuracy_table(rows) -> str:
    """Rows rates, columns tasks (accuracy in %, perplexities as they are) and the average."""
    tasks = list(rows[0]["accuracy"])
    width = max([10] + [len(t) + 1 for t in tasks])
    lines = [f"{'rate':>6}" + "".join(f"{t:>{width}}" for t in tasks) + f"{'average':>{width}}",
             f"{'':>6}" + "".join(f"{rows[0]['metric'][t]:>{width}}" for t in tasks) + f"{'(acc)':>{width}}"]
    for row in rows:
        cells = [f"{100 * v:.2f}" if row["metric"][t].startswith("acc") else f"{v:.3f}" for t, v in row["accuracy"].items()]
        avg = "-" if row["average"] is None else f"{100 * row['average']:.2f}"
        lines.append(f"{row['rate']:>6.2f}" + "".join(f"{c:>{width}}" for c in cells) + f"{avg:>{width}}")
    return "\n".join(lines)


def write_text_tasks(folder, documents: list[str], *, name: str = "stories", n_items: int = 200,
                     n_choices: int = 4, seed: int = 0) -> list[str]:
    """lm-eval task definitions over local JSON lines built from plain-text documents (no network).

    Writes into `folder` (give it to ``TaskManager(include_path=...)`` / ``--tasks-dir``):

    * ``{name}_cloze``: multiple choice (acc, acc_norm). Context: the first 1 to 3 sentences of a
      document; choices: its true next sentence among `n_choices - 1` next sentences of other
      documents (a HellaSwag-style cloze). A model that learned the text ranks the true one first
      more often than 1 / n_choices.
    * ``{name}_rolling``: loglikelihood_rolling over whole documents (word / byte perplexity, bits
      per byte), the path wikitext takes.

    Returns the task names. The JSON lines sit beside the YAMLs, referenced by absolute path.
    """
    import json
    import random
    import re

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    split = [[s for s in re.split(r"(?<=[.!?])\s+", d.strip()) if s] for d in documents]
    usable = [i for i, sents in enumerate(split) if len(sents) >= 2]
    if len(usable) < n_choices:
        raise ValueError(f"need at least {n_choices} documents of 2 or more sentences, got {len(usable)}")
    items = []
    for i in usable[:n_items]:
        k = rng.randrange(1, min(4, len(split[i])))
        others = rng.sample([j for j in usable if j != i], n_choices - 1)
        choices = [split[i][k]] + [split[j][rng.randrange(1, len(split[j]))] for j in others]
        order = list(range(n_choices))
        rng.shuffle(order)
        items.append({"context": " ".join(split[i][:k]), "choices": [choices[o] for o in order],
                      "label": order.index(0)})
    rolling = [{"text": d.strip()} for d in documents[:n_items] if d.strip()]
    specs = {
        f"{name}_cloze": (items, "output_type: multiple_choice\ndoc_to_text: context\n"
                                 "doc_to_choice: choices\ndoc_to_target: label\n"
                                 "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        f"{name}_rolling": (rolling, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                                     "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
                                     "  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
    }
    for task, (rows, body) in specs.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")
    return list(specs)
