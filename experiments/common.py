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


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, no usage dump)."""

    def error(self, message):
        raise UsageError(message)


def main_guard(run):
    """Run `run()`; turn every bad-input error into one line on stderr and exit status 2."""
    from converters.hf import CheckpointError

    try:
        return run()
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


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


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a document with a leading BOS where the tokenizer has one."""
    if hasattr(tokenizer, "BOS"):  # llama2.c tokenizer
        return tokenizer.encode(text, bos=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool):
    """Write into a hidden sibling folder, rename it into place only on success."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"output directory {out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


class Timer:
    """Wall time per named stage, logged as it ends."""

    def __init__(self, log=print):
        self.timings, self.log = {}, log

    @contextlib.contextmanager
    def stage(self, name: str):
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.log(f"[{name}] done in {self.timings[name]:.1f} s")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def eval_stream(spec: str | None, tokenizer):
    """1-D token stream for evaluation: a text file or dataset id (default: held-out TinyStories)."""
    import numpy as np

    path = Path(spec) if spec else TINYSTORIES
    if not path.is_file():
        raise UsageError(f"evaluation data {path} is not a readable file")
    paragraphs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    held_out = paragraphs[int(0.9 * len(paragraphs)):] if spec is None else paragraphs
    return np.asarray([t for p in held_out for t in encode(tokenizer, p)], np.int32)
