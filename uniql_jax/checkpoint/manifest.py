"""Integrity of a checkpoint folder: its manifest, file records, checksums, atomic commit.

On-disk layout of a checkpoint ``path`` (a directory; other files in it are left alone)::

    uniql.json        the manifest and commit point: format version, config, rate
                      table, quantization summary, user meta and provenance, the
                      param tree layout (packed containers with their static fields),
                      per-array storage layout and checksums, and the size (plus the
                      sha256 of every metadata file) of every file of the data folder
    params-<id>/      the Orbax (OCDBT) checkpoint of the raw arrays

Integrity: ``save`` records a CRC-32 of every raw array's leading box at every stored
rate (and full rank), so ``load`` checks exactly the bytes it read without reading
more; file sizes are checked before any read (truncation), Orbax/OCDBT metadata files
are checked against their sha256, and the manifest carries the sha256 of its own body.
Any failure is a ``CheckpointError`` naming the file or array.

Atomicity: the arrays go to a fresh ``params-<id>`` folder (Orbax itself writes it
under a temporary name and renames it when complete), every file is fsynced, then the
manifest is replaced atomically (``os.replace``); only then are older ``params-*``
folders deleted. An interrupted save leaves the previous manifest pointing at the
previous, untouched arrays; a first save interrupted before its manifest leaves a
folder without ``uniql.json``, which ``load`` refuses.

Also here: the provenance the manifest records (library versions, quantization summary).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import zlib
from pathlib import Path

import jax
import numpy as np

from uniql_jax.quant.formats.packed import is_packed

FORMAT = "uniql-jax-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "uniql.json"
DATA_PREFIX = "params-"


class CheckpointError(ValueError):
    """A missing, malformed, corrupted or truncated checkpoint."""


# ---------------------------------------------------------------------------
# Checksums, file records, fsync
# ---------------------------------------------------------------------------


def crc32(x) -> str:
    """CRC-32 of an array's bytes (C order) as 8 hex digits."""
    buf = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(buf):08x}"


def is_data_file(rel: str) -> bool:
    """OCDBT data / b-tree node files (``.../d/<hash>``): large; checked by size and array CRCs."""
    return "d" in rel.split("/")[:-1]


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(p: Path, directory: bool = False):
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_records(data_dir: Path) -> dict:
    """{relative path: {"size", ["sha256"]}} of every file, each fsynced (durable before the commit)."""
    records = {}
    for root, dirs, files in os.walk(data_dir):
        for name in files:
            p = Path(root) / name
            rel = p.relative_to(data_dir).as_posix()
            _fsync_path(p)
            rec = {"size": p.stat().st_size}
            if not is_data_file(rel):
                rec["sha256"] = _sha256_file(p)
            records[rel] = rec
        _fsync_path(Path(root), directory=True)
    return records


def verify_files(data_dir: Path, records: dict):
    """Every recorded file present with its size (and sha256 for metadata files); reads no array data."""
    if not data_dir.is_dir():
        raise CheckpointError(f"the checkpoint's array folder {data_dir} is missing")
    for rel, rec in sorted(records.items()):
        p = data_dir / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        size = p.stat().st_size
        if size != rec["size"]:
            raise CheckpointError(f"checkpoint file {p} is truncated or corrupted: {size} bytes, "
                                  f"{rec['size']} recorded at save time")
        if "sha256" in rec and _sha256_file(p) != rec["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupted: its sha256 differs from the one recorded at save time")


# ---------------------------------------------------------------------------
# The manifest: atomic write, verified read, stale data folders
# ---------------------------------------------------------------------------


def _canonical(body) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(path: Path, body: dict):
    """Atomically replace ``path/uniql.json`` (write a temporary file, fsync, rename, fsync the folder)."""
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "body_sha256": hashlib.sha256(_canonical(body)).hexdigest(),
           "body": body}
    tmp = path / f".{MANIFEST}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    _fsync_path(path, directory=True)


def read_manifest(path: Path) -> dict:
    """The verified manifest body of a checkpoint folder; CheckpointError on anything wrong."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: it does not exist")
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a uniql-jax checkpoint: {MANIFEST} is missing "
                              "(a save interrupted before its commit leaves this state)")
    try:
        doc = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"malformed checkpoint manifest {mpath}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("body"), dict):
        raise CheckpointError(f"malformed checkpoint manifest {mpath}: not a {FORMAT} manifest")
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {doc.get('version')!r}; "
                              f"this uniql-jax reads version {FORMAT_VERSION}")
    if hashlib.sha256(_canonical(doc["body"])).hexdigest() != doc.get("body_sha256"):
        raise CheckpointError(f"checkpoint manifest {mpath} is corrupted: its content does not match its sha256")
    return doc["body"]


def remove_stale(path: Path, keep: str):
    """Delete data folders (and temporary files) of earlier or interrupted saves."""
    for entry in path.iterdir():
        stale_data = entry.name.startswith(DATA_PREFIX) and entry.name != keep
        stale_tmp = entry.name.startswith(f".{MANIFEST}.tmp-")
        if stale_data and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif stale_data or stale_tmp:
            entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "numpy", "uniql-jax"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:  # the source tree's commit when run from a checkout (best effort)
        out["uniql-jax-git"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["uniql-jax-git"] = None
    return out


def quantization_summary(tree) -> dict:
    """Per packed type: how many leaves, and the sets of their bits / group sizes; dense leaf count."""
    summary = {"dense_arrays": 0, "packed": {}}

    def visit(node):
        if is_packed(node):
            entry = summary["packed"].setdefault(type(node).__name__, {"count": 0, "bits": set(), "group_size": set()})
            entry["count"] += 1
            for f in ("bits", "group_size"):
                if hasattr(node, f):
                    entry[f].add(int(getattr(node, f)))
        elif hasattr(node, "shape"):
            summary["dense_arrays"] += 1
        return node

    jax.tree.map(visit, tree, is_leaf=is_packed)
    for entry in summary["packed"].values():
        entry["bits"], entry["group_size"] = sorted(entry["bits"]), sorted(entry["group_size"])
    return summary
