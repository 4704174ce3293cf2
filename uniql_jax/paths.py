"""Where a user's path enters the library: made absolute once, before Orbax or TensorStore see it.

Orbax refuses relative checkpoint paths ("Checkpoint path should be absolute"), and a
relative path stored in a manifest or report means nothing from another working
directory. Every public entry point that takes a folder (``uq.save``, ``uq.load``,
``ElasticModel.from_checkpoint``, the fine-tuning resume folder, the command-line
``--out`` / ``--ckpt``) passes it through ``user_path`` first.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """`path` with ``~`` expanded, made absolute against the current working directory (not resolved:
    symlinks are kept as the user named them)."""
    return Path(os.path.expanduser(os.fspath(path))).absolute()
