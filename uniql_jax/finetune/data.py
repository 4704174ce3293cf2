"""The fine-tuning text of masked LoRA (stage 3): Alpaca-style instruction records -> documents.

The sorted model is fine-tuned with masked LoRA over its nested pruning masks
(`finetune.lora`) on instruction data in the format of Alpaca (Taori et al., 2023,
github.com/tatsu-lab/stanford_alpaca: the prompt template of its `train.py`), or on plain
text. This module turns a file into documents (`uniql_jax.data` tokenizes them) and
splits off the held-out part that picks the best adapters (`FinetuneData`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from uniql_jax.data import DataError, holdout, load_documents, read_text, token_stream

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n{output}")


def alpaca_text(record: dict) -> str:
    """The Alpaca training text of one {instruction, input, output} record (or a {"text"} record)."""
    if "text" in record and "instruction" not in record:
        return str(record["text"])
    inp = str(record.get("input") or "").strip()
    return ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context" if inp else "",
        instruction=str(record["instruction"]).strip(),
        input=f"### Input:\n{inp}\n\n" if inp else "",
        output=str(record.get("output", "")).strip())


def _json_records(source, text: str) -> list:
    """The records of a JSON list or of JSON lines; DataError names the failing line."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not a JSON list ({e.msg} at line {e.lineno})") from e
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: not JSON lines ({e.msg} at line {lineno})") from e
    return records


def read_finetune_documents(source) -> list[str]:
    """Documents of a fine-tuning file: JSON lines / a JSON list of Alpaca-style records
    ({instruction, input, output} or {text}), one document each, or plain text split into
    documents as `data.load_documents` does. Raises data.DataError on unreadable input."""
    path = Path(str(source)).expanduser()
    if not (path.is_file() and path.suffix.lower() in (".jsonl", ".json")):
        return load_documents(source)
    records = _json_records(source, read_text(path))
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict) or
           not ({"instruction", "output"} <= set(r) or "text" in r)]
    if bad:
        raise DataError(f"{source}: record {bad[0]} has neither instruction/output nor text fields")
    docs = [alpaca_text(r) for r in records]
    if not docs:
        raise DataError(f"{source}: no records")
    return docs


def split_stream(tokens, fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) of a 1-D stream: the held-out part is its last ⌈fraction · windows⌉
    windows of `seq_len`, so no training window overlaps it."""
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens) // seq_len
    n_out = int(math.ceil(n * fraction))
    if not 0 < n_out < n:
        raise ValueError(f"{len(tokens)} tokens ({n} windows of {seq_len}) cannot be split with a "
                         f"{fraction:.0%} held-out part")
    cut = (n - n_out) * seq_len
    return tokens[:cut], tokens[cut:]


@dataclasses.dataclass(frozen=True, eq=False)
class FinetuneData:
    """The fine-tuning text and the held-out split that picks the best adapters.

    Give `source` (with `tokenizer`) or else `tokens`; keep both disjoint from the text the
    perplexity grid is measured on.
    """

    source: str | Path | None = None  # a JSON-lines / JSON Alpaca-style file or a text file
    tokens: Any = None  # or a 1-D token stream [N] (e.g. the calibration stream)
    tokenizer: Any = None  # the model's tokenizer: tokenizes `source`
    holdout: float = 0.1  # the held-out split: the last fraction of documents (source) or windows (tokens)

    def __post_init__(self):
        if self.source is None and self.tokens is None:
            raise ValueError("fine-tuning data needs `source` (with `tokenizer`) or `tokens`")
        if self.source is not None and self.tokenizer is None:
            raise ValueError("a fine-tuning source file needs the model's tokenizer")

    @property
    def name(self) -> str:
        return str(self.source) if self.source is not None else "token stream"

    def split(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(train tokens [N_train], held-out tokens [N_dev]): 1-D streams."""
        if self.source is not None:
            train_docs, dev_docs = holdout(read_finetune_documents(self.source), self.holdout)
            return token_stream(train_docs, self.tokenizer), token_stream(dev_docs, self.tokenizer)
        return split_stream(self.tokens, self.holdout, seq_len)
