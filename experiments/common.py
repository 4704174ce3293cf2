"""Shared plumbing of the command-line tools: one-line errors, model resolution, run folders."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = Path(__file__).resolve().parent / "defaults"
SHARED_DATA = REPO.parent / "shared" / "data"
STORIES260K = SHARED_DATA / "stories260K"
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_valid_900.txt"


def setup_logging():
    """Our progress messages at INFO on stderr; other libraries' chatter only from WARNING up."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("compress", "evaluate", "uniql_jax"):
        logging.getLogger(name).setLevel(logging.INFO)


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, no usage dump)."""

    def error(self, message):
        raise UsageError(message)


def main_guard(run):
    """Run `run()`; every failure ends in one line on stderr, never a bare traceback.

    Bad input (usage, checkpoint, rate or data errors, an unusable path) exits with
    status 2; anything else is a bug: status 1, its traceback written to a log file
    the line names. Notes attached to the exception (e.g. where partial output was
    kept) are appended to the line.
    """
    from converters import hf
    from uniql_jax import checkpoint, data

    try:
        return run()
    except (UsageError, hf.CheckpointError, checkpoint.CheckpointError, checkpoint.RateError, data.DataError) as e:
        print(f"error: {e}{_notes(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:
            _report_bug(e)
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        print(f"error: {where}: {e.strerror or type(e).__name__}{_notes(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug: one line here, the traceback in a file
        _report_bug(e)


def _notes(e: BaseException) -> str:
    return "".join(f"; {n}" for n in getattr(e, "__notes__", ()))


def _report_bug(e: BaseException):
    import tempfile
    import traceback

    log_file = Path(tempfile.gettempdir()) / f"uniql-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_file.write_text(f"argv: {sys.argv}\n\n" + "".join(traceback.format_exception(e)))
    first = (str(e).splitlines() or [""])[0][:300]
    print(f"error: {type(e).__name__}: {first}{_notes(e)} (an internal error: traceback in {log_file})", file=sys.stderr)
    sys.exit(1)


def parse_rates(text: str) -> list[float]:
    try:
        rates = sorted({round(float(r), 6) for r in text.split(",") if r.strip()})
    except ValueError:
        raise UsageError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates or rates[0] < 0 or rates[-1] >= 1:
        raise UsageError(f"--rates must lie in [0, 1), got {text!r}")
    return rates


def default_model(arch: str) -> Path:
    """The embedded default checkpoint of an arch (stories260K stands in for llama until it exists)."""
    folder = DEFAULTS / arch
    if (folder / "config.json").is_file():
        return folder
    if arch == "llama":
        if not (STORIES260K / "stories260K.bin").is_file():
            raise UsageError(f"no embedded default for llama and {STORIES260K} is absent; pass --model")
        return STORIES260K / "stories260K.bin"
    raise UsageError(f"no embedded default model for arch {arch!r} yet; pass --model")


def load_model(arch: str, model: str | None):
    """(cfg, params, tokenizer, source) for --arch/--model; arch mismatches are errors."""
    from converters import hf, llama2c

    source = Path(model) if model else default_model(arch)
    if str(source).endswith(".bin") and Path(source).is_file():
        cfg, params = llama2c.load(source)
        tok_file = Path(source).parent / "tok512.bin"
        tokenizer = llama2c.load_tokenizer(tok_file) if tok_file.is_file() else None
    else:
        cfg, params = hf.load(source)
        tokenizer = hf.load_tokenizer(source)
    if cfg.arch != arch:
        raise UsageError(f"--model {source} is a {cfg.arch} checkpoint, not {arch}")
    return cfg, params, tokenizer, str(source)


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool):
    """Write into a hidden sibling folder, rename it into place only on success.

    An existing `out` (with `overwrite`) is renamed aside, the new folder renamed in,
    and only then is the old one deleted: `out` never holds a partly deleted or partly
    written folder (between the two renames it is briefly absent).

    On failure `out` is left as it was. What the failed step had already written
    (e.g. report.json, written before the checkpoint) is not thrown away silently: it
    is kept as ``<out>.incomplete`` and a note on the exception says where (or that
    nothing was written). An interrupt discards it.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"output directory {out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        if isinstance(e, Exception) and any(tmp.iterdir()):
            kept = out.parent / f"{out.name}.incomplete"
            shutil.rmtree(kept, ignore_errors=True)
            tmp.rename(kept)
            e.add_note(f"{out} was not written; the partial output is in {kept}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception):
                e.add_note(f"nothing was written to {out}")
        raise
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


class Timer:
    """Wall time per named stage, logged as it ends."""

    def __init__(self, log=print):
        self.timings, self.log = {}, log

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()  # logged when done: a failing first stage prints only its error
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.log(f"[{name}] done in {self.timings[name]:.1f} s")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")



def token_source(spec: str | None, tokenizer, part: str):
    """1-D token stream of a text file or dataset id; default: TinyStories (train or held-out part)."""
    from uniql_jax import data

    if spec:
        return data.load_tokens(spec, tokenizer)
    if not TINYSTORIES.is_file():
        raise UsageError(f"the default data {TINYSTORIES} is absent; pass --calib / --eval")
    return data.load_tokens(TINYSTORIES, tokenizer, part=part)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Store the model's tokenizer beside a checkpoint so evaluate / generate need no source model."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "pieces"):  # llama2.c: its own binary format
        import struct

        blob = struct.pack("<i", max(len(p) for p in tokenizer.pieces))
        for piece, score in zip(tokenizer.pieces, tokenizer.scores):
            blob += struct.pack("<fi", score, len(piece)) + piece
        (folder / "tokenizer.bin").write_bytes(blob)
    else:
        tokenizer.save_pretrained(folder)


def load_saved_tokenizer(ckpt: Path):
    from converters import hf, llama2c

    folder = Path(ckpt) / "tokenizer"
    if (folder / "tokenizer.bin").is_file():
        return llama2c.load_tokenizer(folder / "tokenizer.bin")
    if folder.is_dir():
        return hf.load_tokenizer(folder)
    raise UsageError(f"{ckpt}: no tokenizer stored beside the checkpoint")


def plot_report(report: dict, path: Path) -> None:
    """Perplexity and parameter bytes against pruning rate, one line per evaluated variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {f"{report['quantizer']} {report['bits']}-bit" if report["quantizer"] != "none" else "16-bit": report["rates"]}
    if "rates_16bit" in report:
        series["16-bit (sorted, before quantization)"] = report["rates_16bit"]
    if "rates_before_finetune" in report:
        series["before fine-tuning"] = report["rates_before_finetune"]
    accuracy = report.get("accuracy")  # lm-eval accuracy per rate (compress --tasks)
    fig, axes = plt.subplots(1, 3 if accuracy else 2, figsize=(15 if accuracy else 10, 4))
    ax_ppl, ax_mb = axes[:2]
    if accuracy:
        plot_accuracy(axes[2], accuracy["rates"], f"lm-eval accuracy ({report['quantizer']} {report['bits']}-bit)")
    for name, rows in series.items():
        rates = [r["rate"] for r in rows]
        ax_ppl.plot(rates, [r["ppl"] for r in rows], marker="o", label=name)
        ax_mb.plot(rates, [r["param_bytes"] / 1e6 for r in rows], marker="o", label=name)
    base = report["baseline"]
    ax_ppl.axhline(base["ppl"], color="gray", ls="--", label="uncompressed")
    ax_mb.axhline(base["param_bytes"] / 1e6, color="gray", ls="--", label="uncompressed (16-bit)")
    ax_ppl.set(xlabel="pruning rate", ylabel="perplexity", title=f"{report['arch']}: perplexity")
    ax_mb.set(xlabel="pruning rate", ylabel="parameter MB", title="parameter bytes")
    for ax in (ax_ppl, ax_mb):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- lm-eval accuracy

# tasks whose accuracy is conventionally reported length-normalized (lm-eval's acc_norm)
ACC_NORM_TASKS = frozenset({"hellaswag", "arc_challenge", "openbookqa"})
TASKS_DIR_HINT = "pass --tasks-dir DIR holding an lm-eval YAML task definition over local JSON lines"


def add_task_args(p) -> None:
    """--tasks / --num-fewshot / --limit / --tasks-dir, shared by evaluate and compress."""
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (e.g. hellaswag,piqa,arc_easy,arc_challenge,"
                                   "winogrande): accuracy at every rate")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: each task's own, usually 0)")
    p.add_argument("--limit", type=float, help="evaluate the first N documents of each task (a value < 1: that fraction)")
    p.add_argument("--tasks-dir", help="folder of lm-eval YAML task definitions (e.g. over local JSON lines), "
                                       "searched before lm-eval's registry")


def load_tasks(args):
    """(task names, TaskManager) of --tasks, each task built once here so that a task that is unknown or whose
    data cannot be read is a one-line UsageError naming it (before any model work)."""
    import logging

    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks is empty")
    if args.tasks_dir and not Path(args.tasks_dir).is_dir():
        raise UsageError(f"--tasks-dir {args.tasks_dir}: no such directory")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be positive, got {args.limit}")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = None
    if args.tasks_dir:  # only local tasks: skip indexing lm-eval's whole registry (seconds)
        manager = TaskManager(include_path=str(Path(args.tasks_dir).resolve()), include_defaults=False)
        if not all(name in manager.all_tasks for name in names):
            manager = TaskManager(include_path=str(Path(args.tasks_dir).resolve()))
    manager = manager or TaskManager()
    for name in names:
        try:
            manager.load([name])
        except KeyError:
            raise UsageError(f"task {name!r} is neither in lm-eval's registry nor in --tasks-dir "
                             f"({args.tasks_dir or 'not given'}); {TASKS_DIR_HINT}") from None
        except Exception as e:  # the dataset could not be reached or read
            first = (str(e).splitlines() or [""])[0][:200]
            raise UsageError(f"task {name!r}: its data could not be loaded ({type(e).__name__}: {first}); "
                             f"offline, {TASKS_DIR_HINT}") from None
    return names, manager


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


def accuracy_rows(lm, rates, names, manager, args, log=print) -> list[dict]:
    """One lm-eval run per rate over the same in-memory model (`lm.set_rate`), in the order given.

    Row: {"rate", "accuracy": {task: value}, "metric": {task: name}, "stderr": {task: se}, "n": {task: docs},
    "average" (mean of the accuracy metrics; perplexities excluded), "seconds"}."""
    import lm_eval

    rows = []
    for r in rates:
        start = time.perf_counter()
        lm.set_rate(r)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, num_fewshot=args.num_fewshot,
                                      limit=None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit),
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


def accuracy_report(elastic, tokenizer, rates, names, manager, args, log=print) -> dict:
    """lm-eval accuracy at every rate of an ElasticModel (one in-memory model, rates switched in-process):
    {"tasks", "num_fewshot", "limit", "rates": accuracy_rows, "compiles": {bucket length: programs}}."""
    from uniql_jax import harness

    if hasattr(tokenizer, "pieces"):
        raise UsageError("a llama2.c tokenizer: --tasks needs a transformers tokenizer")
    lm = harness.UniQLM(elastic=elastic, tokenizer=tokenizer, batch_size=getattr(args, "batch_size", 8))
    rows = accuracy_rows(lm, rates, names, manager, args, log=log)
    return {"tasks": list(names), "num_fewshot": args.num_fewshot, "limit": args.limit, "rates": rows,
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


def plot_accuracy(ax, rows, title="accuracy") -> None:
    """Accuracy (%) against pruning rate, one line per accuracy task and the average."""
    rates = [r["rate"] for r in rows]
    for task, metric in rows[0]["metric"].items():
        if metric.startswith("acc"):
            ax.plot(rates, [100 * r["accuracy"][task] for r in rows], marker="o", label=f"{task} ({metric})")
    if rows[0]["average"] is not None:
        ax.plot(rates, [100 * r["average"] for r in rows], marker="s", color="black", lw=2, label="average")
    ax.set(xlabel="pruning rate", ylabel="accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_accuracy_plot(rows, path: Path, title="accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_accuracy(ax, rows, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
