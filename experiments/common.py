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
    fig, (ax_ppl, ax_mb) = plt.subplots(1, 2, figsize=(10, 4))
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
