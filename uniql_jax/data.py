"""Real text -> documents -> token streams -> calibration windows.

A *source* is a local text file or a Hugging Face dataset id
``NAME[:CONFIG][@SPLIT]`` (e.g. ``wikitext:wikitext-2-raw-v1@test``,
``roneneldan/TinyStories@validation``). Local files never touch the network; a
dataset id is served from the local `datasets` cache when ``HF_DATASETS_OFFLINE``
/ ``HF_HUB_OFFLINE`` is set, and fails at once with a clear ``DataError`` when it
is not cached or the Hub cannot be reached (instead of `datasets`' retry loop).

Documents. The shared TinyStories file separates paragraphs by blank lines and
does not mark story boundaries. A document is therefore a *story as detected by
its opening*: a new document starts at every blank-line-separated paragraph
that opens like a TinyStories story ("Once upon a time", "Once there was",
"There once", "Long ago", ...; ``STORY_OPENER``). Text is kept verbatim
(paragraphs inside a document keep their blank lines). Stories that open
otherwise stay attached to the preceding document: a document may hold more
than one story, never part of a story split in two (except a file that begins
mid-story). Text without such openings (WikiText, code, ...) is one document.
The held-out part is the *last* fraction of documents (``holdout``).

Token stream. Each document is encoded on its own with the tokenizer's own
convention for a sequence start (a BOS token where the tokenizer adds one;
llama2.c tokenizers: ``encode(doc, bos=True)``, as llama2.c pretokenizes
TinyStories) and the documents are concatenated; a tokenizer that adds nothing
at a sequence start gets documents joined by a blank line instead. The stream
holds only real tokens: no padding, no end-of-text filler.
"""

from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path

import numpy as np

# A paragraph that opens a TinyStories story (checked on the shared validation file:
# 792 openings in ~900 stories; the rest open mid-plot and join the preceding document).
STORY_OPENER = re.compile(
    r"(Once upon a time|One upon a time|Once there (was|were|lived|is)|Once,|Once |There once|There was once"
    r"|Long,? long ago|Long ago|A long time ago)")

# A dataset id: NAME or OWNER/NAME, optional :CONFIG, optional @SPLIT.
DATASET_ID = re.compile(r"^(?P<name>[\w.-]+(/[\w.-]+)?)(:(?P<config>[\w.-]+))?(@(?P<split>[\w.\[\]:%+-]+))?$")
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md", ".tokens", ".jsonl", ".json", ".csv")

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")


class DataError(ValueError):
    """Text or tokens that cannot be read or used (the message names the problem)."""


# ----------------------------------------------------------------------------- sources


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def hf_offline() -> bool:
    """Whether `datasets` / `huggingface_hub` are in offline mode (cache only)."""
    return _env_true("HF_DATASETS_OFFLINE") or _env_true("HF_HUB_OFFLINE")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connection to the Hub endpoint succeeds (skipped, i.e. True, behind a proxy)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def is_dataset_id(source: str) -> bool:
    """A string that names a dataset rather than a (missing) file."""
    s = str(source)
    return (bool(DATASET_ID.match(s)) and not s.lower().endswith(TEXT_SUFFIXES)
            and not s.startswith((".", "~")) and not Path(s).exists())


def read_text(source) -> str:
    """The text of a local file (UTF-8) or of a dataset id's text column.

    Dataset rows are joined by blank lines (the usual WikiText evaluation text), so
    rows that are stories become paragraphs that `split_documents` sees open.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{source}: unreadable text file ({type(e).__name__})") from None
    if path.exists():
        raise DataError(f"{source}: not a text file")
    if not is_dataset_id(str(source)):
        raise DataError(f"{source}: no such file (and not a dataset id NAME[:CONFIG][@SPLIT])")
    return "\n\n".join(_dataset_rows(str(source)))


def _dataset_rows(dataset_id: str) -> list[str]:
    m = DATASET_ID.match(dataset_id)
    name, config, split = m["name"], m["config"], m["split"] or "train"
    offline = hf_offline()
    if not offline and not _hub_reachable():
        raise DataError(f"{dataset_id}: the Hugging Face Hub is unreachable; use a local text file, "
                        "or set HF_DATASETS_OFFLINE=1 to read a cached copy")
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # missing, not cached, bad split: one clear line
        why = ("HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        raise DataError(f"{dataset_id}: cannot load dataset ({why})") from None
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    column = "text" if "text" in columns else (columns[0] if columns else None)
    if column is None:
        raise DataError(f"{dataset_id}: no text column (columns: {', '.join(ds.column_names)})")
    return list(ds[column])


# ----------------------------------------------------------------------------- documents


def split_documents(text: str, opener: re.Pattern | None = STORY_OPENER) -> list[str]:
    """Documents of a text: a new one starts at each paragraph matching `opener` (module docstring).

    Paragraphs are separated by blank lines; the text of each document is kept
    verbatim (stripped at its ends). `opener=None` or a text without openings
    gives one document.
    """
    starts = [0]
    if opener is not None:
        for m in _PARAGRAPH_BREAK.finditer(text):
            if opener.match(text, m.end()):
                starts.append(m.end())
        if opener.match(text, len(text) - len(text.lstrip())):  # the text itself opens a story
            starts[0] = len(text) - len(text.lstrip())
    bounds = zip(starts, starts[1:] + [len(text)])
    return [d for d in (text[a:b].strip() for a, b in bounds) if d]


def holdout(documents: list[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held_out): the held-out part is the last ceil(fraction * n) documents."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"hold-out fraction must be in (0, 1), got {fraction}")
    n_out = math.ceil(round(len(documents) * fraction, 9))  # round: 30 * 0.1 is 3.0000000000000004
    if n_out < 1 or n_out >= len(documents):
        raise DataError(f"{len(documents)} documents cannot be split with a {fraction:.0%} hold-out")
    return documents[:-n_out], documents[-n_out:]


def load_documents(source, *, part: str = "all", fraction: float = 0.1) -> list[str]:
    """Documents of a source; part: "all", "train" (first 1 - fraction) or "heldout" (last fraction)."""
    docs = split_documents(read_text(source))
    if not docs:
        raise DataError(f"{source}: no text")
    if part == "all":
        return docs
    train, held = holdout(docs, fraction)
    if part == "train":
        return train
    if part == "heldout":
        return held
    raise DataError(f"part must be 'all', 'train' or 'heldout', got {part!r}")


# ----------------------------------------------------------------------------- tokens


def _is_llama2c(tokenizer) -> bool:
    return hasattr(tokenizer, "pieces") and hasattr(tokenizer, "BOS")


def encode_documents(documents: list[str], tokenizer) -> list[list[int]]:
    """Each document's ids, starting the way the tokenizer starts a sequence (module docstring)."""
    if _is_llama2c(tokenizer):
        return [tokenizer.encode(d, bos=True) for d in documents]
    probe = tokenizer("a")["input_ids"]
    adds_start = len(probe) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    if not adds_start:
        documents = [d + "\n\n" for d in documents[:-1]] + documents[-1:]
    return tokenizer(list(documents))["input_ids"]


def token_stream(documents: list[str], tokenizer) -> np.ndarray:
    """One int32 stream [N] of the documents' tokens, concatenated in order."""
    ids = encode_documents(documents, tokenizer)
    if not ids:
        raise DataError("no documents to tokenize")
    return np.concatenate([np.asarray(x, np.int32) for x in ids])


def load_tokens(source, tokenizer, *, part: str = "all", fraction: float = 0.1) -> np.ndarray:
    """`token_stream` of `load_documents(source, part=...)`."""
    return token_stream(load_documents(source, part=part, fraction=fraction), tokenizer)


def token_source(spec: str | None, tokenizer, part: str) -> np.ndarray:
    """1-D token stream of a text file or dataset id `spec`; None: the shared TinyStories text (its
    training or held-out `part`), the default data of the embedded models."""
    from uniql_jax.paths import TINYSTORIES, InputError

    if spec:
        return load_tokens(spec, tokenizer)
    if not TINYSTORIES.is_file():
        raise InputError(f"the default data {TINYSTORIES} is absent; pass --calib / --eval")
    return load_tokens(TINYSTORIES, tokenizer, part=part)


def calibration_windows(stream, num_samples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """int32 [num_samples, seq_len]: non-overlapping contiguous windows of real tokens, in stream order.

    The stream is cut into slots of `seq_len` after a random phase in
    [0, len % seq_len]; `num_samples` distinct slots are drawn without
    replacement with `numpy.random.default_rng(seed)`. A window never runs past
    the end (no padding, no filler) and the same seed gives the same windows.
    """
    stream = np.asarray(stream)
    if stream.ndim != 1:
        raise DataError(f"a token stream is 1-D, got shape {stream.shape}")
    if num_samples < 1 or seq_len < 1:
        raise DataError(f"need num_samples >= 1 and seq_len >= 1, got {num_samples}, {seq_len}")
    n_slots = len(stream) // seq_len
    if n_slots < num_samples:
        raise DataError(f"{len(stream)} tokens hold {n_slots} non-overlapping windows of {seq_len}, "
                        f"fewer than the {num_samples} asked for")
    rng = np.random.default_rng(seed)
    phase = int(rng.integers(0, len(stream) - n_slots * seq_len + 1))
    slots = np.sort(rng.choice(n_slots, size=num_samples, replace=False))
    return np.stack([stream[phase + s * seq_len: phase + (s + 1) * seq_len] for s in slots]).astype(np.int32)
