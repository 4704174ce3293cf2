"""Where a user's path enters the library: made absolute once, before Orbax or TensorStore see it.

Orbax refuses relative checkpoint paths ("Checkpoint path should be absolute"), and a
relative path stored in a manifest or report means nothing from another working
directory. Every public entry point that takes a folder (``uq.save``, ``uq.load``,
``ElasticModel.from_checkpoint``, the fine-tuning resume folder, the command-line
``--out`` / ``--ckpt``) passes it through ``user_path`` first.

Also where the repository keeps its own inputs: the embedded tiny models (``DEFAULTS``) and the
shared data folder beside the checkout (TinyStories, stories260K), the defaults of the command
line tools and benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """`path` with ``~`` expanded, made absolute against the current working directory (not resolved:
    symlinks are kept as the user named them)."""
    return Path(os.path.expanduser(os.fspath(path))).absolute()


REPO = Path(__file__).resolve().parents[1]
DEFAULTS = REPO / "experiments" / "defaults"  # the embedded tiny model of each arch (<arch>/config.json)
SHARED_DATA = REPO.parent / "shared" / "data"
STORIES260K = SHARED_DATA / "stories260K"  # llama2.c's stories260K.bin and tok512.bin
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_valid_900.txt"  # default calibration / evaluation text


class InputError(ValueError):
    """Bad input from the caller (a missing default model or data file, a model of another arch, a
    tokenizer the request cannot use): the command line reports it as one line, exit status 2."""
