"""Shared plumbing of the command-line tools: argument parsing with one-line errors, the exit-status
policy (`main_guard`), staged output folders, rate lists, logging, and the plots and tables they write.

The work itself is the library's (``uniql_jax.pipeline``, ``uniql_jax.accuracy``, ``uniql_jax.data``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from uniql_jax.paths import InputError


def setup_logging():
    """Our progress messages at INFO on stderr; other libraries' chatter only from WARNING up."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("compress", "evaluate", "uniql_jax"):
        logging.getLogger(name).setLevel(logging.INFO)


class UsageError(InputError):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, no usage dump)."""

    def error(self, message):
        raise UsageError(message)


def main_guard(run):
    """Run `run()`; every failure ends in one line on stderr, never a bare traceback.

    Bad input (usage, input, checkpoint, rate or data errors, an unusable path) exits with
    status 2; anything else is a bug: status 1, its traceback written to a log file
    the line names. Notes attached to the exception (e.g. where partial output was
    kept) are appended to the line.
    """
    from converters import hf
    from uniql_jax import checkpoint, data
    from uniql_jax.host_memory import return_freed_arrays_to_os

    return_freed_arrays_to_os()  # before the model is loaded: freed blocks leave the resident set
    try:
        return run()
    except (InputError, hf.CheckpointError, checkpoint.CheckpointError, checkpoint.RateError, data.DataError) as e:
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


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool, *, writer: bool = True):
    """Write into a hidden sibling folder, rename it into place only on success.

    Across processes every process enters it and gets the same folder (named after process
    0's pid, broadcast); only the `writer` (process 0) checks `out`, makes, renames or deletes
    anything, the others only write into it (a collective checkpoint save).

    An existing `out` (with `overwrite`) is renamed aside, the new folder renamed in,
    and only then is the old one deleted: `out` never holds a partly deleted or partly
    written folder (between the two renames it is briefly absent).

    On failure `out` is left as it was. What the failed step had already written
    (e.g. report.json, written before the checkpoint) is not thrown away silently: it
    is kept as ``<out>.incomplete`` and a note on the exception says where (or that
    nothing was written). An interrupt discards it.
    """
    import numpy as np

    from uniql_jax import distributed

    out = Path(out)
    pid = int(np.asarray(distributed.broadcast_from_main(np.int32(os.getpid()))))  # one process: its own
    tmp = out.parent / f".{out.name}.partial-{pid}"
    if not writer:
        yield tmp
        return
    if out.exists() and not overwrite:
        raise UsageError(f"output directory {out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
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


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


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
