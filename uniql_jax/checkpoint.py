"""One Orbax checkpoint per compressed model, restorable at any stored pruning rate.

DESIGN.md, "Elastic layout": every prunable axis is its own array axis and sorting
puts the kept channels first, so the model a rate keeps is, array by array, a
*leading box* of the full-rank arrays (``compress/prune.py``). A checkpoint stores
the full-rank (sorted, optionally fine-tuned and quantized) arrays once, chunked
along their prunable axes, and ``load(path, rate)`` asks Orbax/TensorStore for the
leading boxes only (a smaller ``global_shape``): only the chunks that intersect the
kept part are read from disk.

On-disk layout of ``path`` (a directory; other files in it are left alone)::

    uniql.json        the manifest and commit point: format version, config, rate
                      table, quantization summary, user meta and provenance, the
                      param tree layout (packed containers with their static fields),
                      per-array storage layout and checksums, and the size (plus the
                      sha256 of every metadata file) of every file of the data folder
    params-<id>/      the Orbax (OCDBT) checkpoint of the raw arrays

Raw arrays: every dense leaf, and every array field of a packed quantized leaf
(``QArray.codes``, ``QArray.scales``, ``BCQArray.planes``, ...; any type that
``prune.PACKED_SLICERS`` knows) under the key ``"blocks/3/up/codes"``. The static
fields of packed leaves (bits, group size, axis, logical shape) are JSON in the
layout, so ``load`` rebuilds the containers and the abstract full-rank tree without
reading any array; the target of a rate is ``slice_to_config`` of that tree, traced
with ``jax.eval_shape`` (one source of truth for what a rate keeps: the pruner).

Chunking: a prunable axis of size ``n`` whose sizes over the whole table share the
divisor ``g`` is stored split as ``(n // g, g)`` and Orbax chunks the outer axis one
step at a time (``SaveArgs.shard_axes``), so every stored size is a whole number of
chunks and a rate reads exactly the chunks it keeps; other axes are chunked to at
most ``chunk_bytes`` per chunk. TensorStore coalesces reads across gaps of less than
about 4 KiB, so arrays whose chunks are smaller than that (tiny test models) are read
whole; at LLM sizes chunks are far larger and the bytes read follow the bytes kept.

Integrity: ``save`` records a CRC-32 of every raw array's leading box at every stored
rate (and full rank), so ``load`` checks exactly the bytes it read without reading
more; file sizes are checked before any read (truncation), Orbax/OCDBT metadata files
are checked against their sha256, and the manifest carries the sha256 of its own body.
Any failure is a ``CheckpointError`` naming the file or array.

Rates: ``load(path, rate)`` accepts ``None`` (full rank), 0 (full rank even if the
table has no 0 entry) and the table's rates (to 1e-6). Anything else is a
``RateError``: outside [0, max stored rate], or inside but not stored, in which case
the message names the nearest stored rate; rates are never silently rounded.
``ElasticModel`` keeps the full-rank params in memory and switches rates in-process.

Atomicity: the arrays go to a fresh ``params-<id>`` folder (Orbax itself writes it
under a temporary name and renames it when complete), every file is fsynced, then the
manifest is replaced atomically (``os.replace``); only then are older ``params-*``
folders deleted. An interrupted save leaves the previous manifest pointing at the
previous, untouched arrays; a first save interrupted before its manifest leaves a
folder without ``uniql.json``, which ``load`` refuses.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.compress.prune import PACKED_SLICERS, lookup_rate, slice_to_config
from uniql_jax.config import ModelConfig, block_from_dict, block_to_dict, config_from_dict, config_to_dict
from uniql_jax.inference import forward
from uniql_jax.paths import user_path

log = logging.getLogger(__name__)

FORMAT = "uniql-jax-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "uniql.json"
DATA_PREFIX = "params-"
DEFAULT_CHUNK_BYTES = 1 << 20  # Orbax warns below 1 MiB; prunable axes are chunked finer anyway
RATE_TOLERANCE = 1e-6  # the one used by prune.lookup_rate


class CheckpointError(ValueError):
    """A missing, malformed, corrupted or truncated checkpoint."""


class RateError(ValueError):
    """A pruning rate outside the stored range or not stored in the checkpoint's table."""


# ---------------------------------------------------------------------------
# Param trees <-> raw arrays
# ---------------------------------------------------------------------------


def class_name(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


PACKED_TYPES = {class_name(cls): cls for cls in PACKED_SLICERS}


def _is_packed(x) -> bool:
    return type(x) in PACKED_SLICERS


def _field_split(cls) -> tuple[list[str], list[str]]:
    """(array fields, static fields) of a packed dataclass, in declaration order."""
    fields = dataclasses.fields(cls)
    return ([f.name for f in fields if not f.metadata.get("static")],
            [f.name for f in fields if f.metadata.get("static")])


def _check_key(key) -> str:
    if not isinstance(key, str) or not key or "/" in key or "." in key:
        raise ValueError(f"param dict keys must be non-empty strings without '/' or '.', got {key!r}")
    return key


def map_raw(fn, tree, prefix: tuple[str, ...] = ()):
    """The tree with every raw array ``x`` replaced by ``fn("a/b/field", x)``.

    Dict / list / tuple / None nodes are kept, packed leaves are rebuilt with
    ``dataclasses.replace`` (static fields unchanged), anything with a shape and a
    dtype (arrays, ``ShapeDtypeStruct``) is a raw array.
    """
    if isinstance(tree, dict):
        return {k: map_raw(fn, v, prefix + (_check_key(k),)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        out = [map_raw(fn, v, prefix + (str(i),)) for i, v in enumerate(tree)]
        return out if isinstance(tree, list) else tuple(out)
    if tree is None:
        return None
    if _is_packed(tree):
        arrays, _ = _field_split(type(tree))
        return dataclasses.replace(tree, **{f: fn("/".join(prefix + (f,)), getattr(tree, f)) for f in arrays})
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return fn("/".join(prefix), tree)
    raise ValueError(f"unsupported param leaf at {'/'.join(prefix) or '<root>'}: {type(tree).__name__} "
                     f"(known packed types: {', '.join(PACKED_TYPES)})")


def raw_arrays(tree) -> dict[str, Any]:
    """{key: raw array} of a param tree (see `map_raw`)."""
    out = {}
    map_raw(lambda k, x: out.__setitem__(k, x), tree)
    return out


def describe(tree):
    """JSON layout of a param tree: containers, packed types with their static fields."""
    if isinstance(tree, dict):
        return {"dict": {k: describe(v) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {type(tree).__name__: [describe(v) for v in tree]}
    if tree is None:
        return {"none": True}
    if _is_packed(tree):
        _, static = _field_split(type(tree))
        values = {f: _jsonable(getattr(tree, f)) for f in static}
        return {"packed": class_name(type(tree)), "static": values}
    return {"array": True}


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.integer):
        return int(value)
    raise ValueError(f"static field value {value!r} is not JSON-serializable")


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def abstract_tree(layout, arrays: dict, prefix: tuple[str, ...] = ()):
    """The param tree of a layout with ``ShapeDtypeStruct`` raw arrays (full-rank shapes)."""
    def sds(key):
        meta = arrays[key]
        return jax.ShapeDtypeStruct(tuple(meta["shape"]), jnp.dtype(meta["dtype"]))

    if "dict" in layout:
        return {k: abstract_tree(v, arrays, prefix + (k,)) for k, v in layout["dict"].items()}
    if "list" in layout or "tuple" in layout:
        out = [abstract_tree(v, arrays, prefix + (str(i),)) for i, v in enumerate(layout.get("list", layout.get("tuple")))]
        return out if "list" in layout else tuple(out)
    if "none" in layout:
        return None
    if "packed" in layout:
        cls = PACKED_TYPES.get(layout["packed"])
        if cls is None:
            raise CheckpointError(f"unknown packed type {layout['packed']!r} (known: {', '.join(PACKED_TYPES)})")
        array_fields, static_fields = _field_split(cls)
        if set(layout["static"]) != set(static_fields):
            raise CheckpointError(f"{layout['packed']} at {'/'.join(prefix)}: static fields {sorted(layout['static'])} "
                                  f"!= {sorted(static_fields)}")
        kw = {f: sds("/".join(prefix + (f,))) for f in array_fields}
        kw.update({f: _tupled(v) for f, v in layout["static"].items()})
        return cls(**kw)
    if "array" in layout:
        return sds("/".join(prefix))
    raise CheckpointError(f"malformed layout node at {'/'.join(prefix) or '<root>'}: {sorted(layout)}")


def rate_target(cfg_small: ModelConfig, abstract_full):
    """Abstract params (``ShapeDtypeStruct`` leaves) that `slice_to_config` keeps for a config."""
    return jax.eval_shape(lambda p: slice_to_config(cfg_small, p), abstract_full)


def raw_shapes(tree) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(n) for n in x.shape) for k, x in raw_arrays(tree).items()}


# ---------------------------------------------------------------------------
# Storage: split prunable axes, chunk them, checksum leading boxes
# ---------------------------------------------------------------------------


def storage_splits(full_shape: tuple[int, ...], kept_shapes: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """[(axis, g)] for every axis some kept shape shrinks: g = gcd of all its sizes.

    Storing axis ``n`` as ``(n // g, g)`` makes every kept size a whole number of
    ``g``-wide chunks, so a leading box is read without partial chunks.
    """
    splits = []
    for axis, n in enumerate(full_shape):
        sizes = {s[axis] for s in kept_shapes} | {n}
        if len(sizes) > 1:
            splits.append((axis, math.gcd(*sizes)))
    return splits


def stored_shape(shape: tuple[int, ...], splits: list[tuple[int, int]]) -> tuple[int, ...]:
    """The on-disk shape of a (leading box) shape: each split axis n -> (n // g, g)."""
    by_axis = dict(splits)
    out = []
    for axis, n in enumerate(shape):
        g = by_axis.get(axis)
        if g is None or g == 1:
            out.append(n)
        else:
            if n % g:
                raise CheckpointError(f"size {n} of axis {axis} is not a multiple of its stored chunk {g}")
            out.extend((n // g, g))
    return tuple(out)


def chunked_axes(splits: list[tuple[int, int]]) -> tuple[int, ...]:
    """Axes of the stored shape that Orbax chunks one step at a time (the outer part of each split)."""
    out, shift = [], 0
    for axis, g in sorted(splits):
        out.append(axis + shift)
        shift += g != 1
    return tuple(out)


def shape_key(shape) -> str:
    return "x".join(str(int(n)) for n in shape) or "scalar"


def leading_box(x: np.ndarray, shape) -> np.ndarray:
    return x[tuple(slice(0, n) for n in shape)]


def crc32(x) -> str:
    """CRC-32 of an array's bytes (C order) as 8 hex digits."""
    buf = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(buf):08x}"


# ---------------------------------------------------------------------------
# Rate table
# ---------------------------------------------------------------------------


def table_to_json(table: dict) -> list:
    return [{"rate": float(r), "blocks": [block_to_dict(b) for b in blocks]} for r, blocks in sorted(table.items())]


def table_from_json(entries) -> dict:
    if not isinstance(entries, list):
        raise ValueError("the rate table must be a list")
    return {float(e["rate"]): tuple(block_from_dict(b) for b in e["blocks"]) for e in entries}


def check_table(cfg: ModelConfig, table: dict) -> dict:
    """Normalized {float rate: tuple of blocks}; raises ValueError on a table that does not fit `cfg`."""
    out = {}
    for rate, blocks in table.items():
        r = float(rate)
        if not 0.0 <= r < 1.0:
            raise ValueError(f"table rate {rate!r} is outside [0, 1)")
        blocks = tuple(blocks)
        if len(blocks) != len(cfg.blocks) or any(
            b.kind != c.kind or b.layer != c.layer for b, c in zip(blocks, cfg.blocks)
        ):
            raise ValueError(f"table rate {r:g}: its blocks do not match the config's block kinds and layers")
        out[r] = blocks
    return out


def resolve_rate(cfg: ModelConfig, table: dict, rate) -> tuple[ModelConfig, float | None]:
    """(config at `rate`, the stored rate it matched); ``None`` is the full-rank model.

    Rates are never rounded: a rate inside [0, max stored] that is not in the table is
    an error naming the nearest stored rate. Rate 0 is the full-rank model even when
    the table has no entry for it.
    """
    if rate is None:
        return cfg, None
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise RateError(f"rate must be a number, got {rate!r}") from None
    top = max(table, default=0.0)
    if not math.isfinite(r) or r < -RATE_TOLERANCE or r > top + RATE_TOLERANCE:
        raise RateError(f"rate {r:g} is outside [0, {top:g}], the range of rates stored in this checkpoint")
    try:
        return cfg.with_blocks(lookup_rate(table, r)), float(min(table, key=lambda s: abs(s - r)))
    except KeyError:
        if abs(r) <= RATE_TOLERANCE:
            return cfg, 0.0
        nearest = min(table, key=lambda s: abs(s - r))
        stored = ", ".join(f"{s:g}" for s in sorted(table))
        raise RateError(f"rate {r:g} is not stored in this checkpoint (stored: {stored}); rates are not rounded "
                        f"to the nearest stored one ({nearest:g}): pass a stored rate") from None


# ---------------------------------------------------------------------------
# I/O accounting
# ---------------------------------------------------------------------------


def _tensorstore_bytes_read() -> int:
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(int(v.get("value", 0)) for m in metrics for v in m["values"])


def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class ReadCounter:
    """Bytes this process reads from files while the ``with`` block runs.

    * ``tensorstore``: TensorStore's own counter of bytes its file kvstore read, i.e.
      the array data and OCDBT index Orbax reads. Counted at the read call, so it does
      not depend on the page cache, and nothing else in the process adds to it.
    * ``rchar``: the kernel's count of bytes returned by read syscalls of the whole
      process (/proc/self/io; Linux only, else None): also the manifest and Orbax's JSON
      metadata, and anything other threads read meanwhile. Page-cache hits count too.
    """

    def __enter__(self):
        self.tensorstore = self.rchar = None
        self._ts0, self._rc0 = _tensorstore_bytes_read(), _rchar()
        return self

    def __exit__(self, *exc):
        self.tensorstore = _tensorstore_bytes_read() - self._ts0
        rc = _rchar()
        self.rchar = None if rc is None or self._rc0 is None else rc - self._rc0
        return False


# ---------------------------------------------------------------------------
# Files: records, fsync, atomic manifest
# ---------------------------------------------------------------------------


def _is_data_file(rel: str) -> bool:
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
            if not _is_data_file(rel):
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


def _remove_stale(path: Path, keep: str):
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


def _versions() -> dict:
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
        if _is_packed(node):
            entry = summary["packed"].setdefault(type(node).__name__, {"count": 0, "bits": set(), "group_size": set()})
            entry["count"] += 1
            for f in ("bits", "group_size"):
                if hasattr(node, f):
                    entry[f].add(int(getattr(node, f)))
        elif hasattr(node, "shape"):
            summary["dense_arrays"] += 1
        return node

    jax.tree.map(visit, tree, is_leaf=_is_packed)
    for entry in summary["packed"].values():
        entry["bits"], entry["group_size"] = sorted(entry["bits"]), sorted(entry["group_size"])
    return summary


def _nbytes(shapes: dict, arrays: dict) -> int:
    return int(sum(math.prod(s) * jnp.dtype(arrays[k]["dtype"]).itemsize for k, s in shapes.items()))


# ---------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------


def save(path, cfg: ModelConfig, params, *, table: dict | None = None, meta: dict | None = None,
         chunk_bytes: int = DEFAULT_CHUNK_BYTES, compress: bool = True) -> Path:
    """Write (cfg, full-rank params, rate table, meta) as one checkpoint folder, atomically.

    `params` is the sorted full-rank model (dense and/or packed leaves); `table` is
    ``{rate: per-block sizes}`` (``uq.allocate``); `meta` is free JSON provenance, e.g.
    ``{"model": ..., "data": ..., "seed": ..., "quantizer": ..., "bits": 4, "group_size": 128}``;
    versions, creation time and a quantization summary are added. `chunk_bytes` bounds
    a chunk along non-prunable axes; `compress` is Orbax's zstd. Returns the folder.
    """
    import orbax.checkpoint as ocp

    t0 = time.perf_counter()
    path = user_path(path)
    table = check_table(cfg, dict(table or {}))
    meta = dict(meta or {})
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serializable: {e}") from None
    config_json = config_to_dict(cfg)
    json.dumps(config_json)  # fails early on a non-JSON `extra`
    layout = describe(params)
    leaves = raw_arrays(params)
    arrays = {k: {"shape": list(map(int, x.shape)), "dtype": jnp.dtype(x.dtype).name} for k, x in leaves.items()}

    # What every stored rate keeps, from the pruner itself; also validates params against cfg and table.
    abstract = abstract_tree(layout, arrays)
    full_shapes = {k: tuple(a["shape"]) for k, a in arrays.items()}
    try:
        cfg_shapes = raw_shapes(rate_target(cfg, abstract))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"params do not have the structure of cfg's params: {e}") from None
    if cfg_shapes != full_shapes:
        wrong = sorted(k for k in full_shapes if cfg_shapes.get(k) != full_shapes[k])
        raise ValueError(f"params do not have the full-rank shapes of cfg: {', '.join(wrong[:5])}")
    kept = {}
    for r, blocks in table.items():
        try:
            kept[r] = raw_shapes(rate_target(cfg.with_blocks(blocks), abstract))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"table rate {r:g} does not fit the params: {e}") from None

    storage, save_args = {}, {}
    for key, x in leaves.items():
        shapes = [s[key] for s in kept.values() if key in s]
        splits = storage_splits(full_shapes[key], shapes)
        host = np.asarray(jax.device_get(x))
        digests = {shape_key(s): crc32(leading_box(host, s)) for s in {full_shapes[key], *shapes}}
        arrays[key].update(splits=[list(s) for s in splits], crc32=digests)
        if host.size == 0:  # nothing to store; TensorStore has no 0-sized dimensions
            continue
        node, args_node = storage, save_args
        *parents, leaf = key.split("/")
        for part in parents:
            node, args_node = node.setdefault(part, {}), args_node.setdefault(part, {})
        node[leaf] = host.reshape(stored_shape(full_shapes[key], splits))  # a view; Orbax writes numpy as is
        args_node[leaf] = ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=chunked_axes(splits))

    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    data_name = f"{DATA_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    t1 = time.perf_counter()
    if jax.process_count() > 1:  # one writer (this process; every process holds the same host values)
        only_me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                     active_processes={jax.process_index()})
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress, multiprocessing_options=only_me),
                         multiprocessing_options=only_me).save(path / data_name, storage, save_args=save_args)
    else:
        ocp.PyTreeCheckpointer(use_compression=compress).save(path / data_name, storage, save_args=save_args)
    t2 = time.perf_counter()
    body = {
        "data": data_name,
        "config": config_json,
        "table": table_to_json(table),
        "rates": [{"rate": r, "param_bytes": _nbytes(s, arrays)} for r, s in sorted(kept.items())],
        "param_bytes": _nbytes(full_shapes, arrays),
        "quantization": quantization_summary(params),
        "meta": meta,
        "provenance": {"created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "versions": _versions(), "argv": sys.argv},
        "layout": layout,
        "arrays": arrays,
        "files": file_records(path / data_name),
    }
    _commit(path, body)
    _remove_stale(path, keep=data_name)
    log.info("saved %s: prepare %.2fs, orbax %.2fs, commit %.2fs", path, t1 - t0, t2 - t1, time.perf_counter() - t2)
    return path


def _commit(path: Path, body: dict):
    """The commit point of `save` (its own function so that tests can interrupt a save right before it)."""
    write_manifest(path, body)


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its manifest alone (no array is read)."""

    path: Path
    cfg: ModelConfig  # full rank
    table: dict  # {rate: per-block sizes}
    meta: dict  # as given to save
    provenance: dict  # creation time, versions
    quantization: dict  # per packed type: count, bits, group sizes
    param_bytes: int  # stored bytes at full rank
    rate_bytes: dict  # {rate: stored bytes kept at that rate}
    body: dict = dataclasses.field(repr=False)  # the whole verified manifest body

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(sorted(self.table))


def read_info(path) -> CheckpointInfo:
    """The verified manifest of a checkpoint; CheckpointError if missing or malformed."""
    path = user_path(path)
    body = read_manifest(path)
    try:
        return CheckpointInfo(
            path=path,
            cfg=config_from_dict(body["config"]),
            table=table_from_json(body["table"]),
            meta=body["meta"],
            provenance=body["provenance"],
            quantization=body["quantization"],
            param_bytes=int(body["param_bytes"]),
            rate_bytes={float(e["rate"]): int(e["param_bytes"]) for e in body["rates"]},
            body=body,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed checkpoint manifest {path / MANIFEST}: {type(e).__name__}: {e}") from None


def restore_raw(data_dir: Path, targets: dict, arrays: dict) -> dict:
    """{key: host numpy array} of the leading boxes `targets` {key: shape} of the stored raw arrays.

    Restored to the host CPU device: un-splitting stored axes is then a free numpy
    view (no per-shape XLA reshape), and checksums read host memory.
    """
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    item, restore_args, out = {}, {}, {}
    for key, shape in targets.items():
        meta = arrays[key]
        dtype = jnp.dtype(meta["dtype"])
        if len(shape) != len(meta["shape"]) or any(n > m for n, m in zip(shape, meta["shape"])):
            raise CheckpointError(f"array {key}: a rate needs shape {shape}, more than the stored {tuple(meta['shape'])}")
        if math.prod(shape) == 0:
            out[key] = np.zeros(shape, dtype)
            continue
        disk_shape = stored_shape(shape, [tuple(s) for s in meta["splits"]])
        node, args_node = item, restore_args
        *parents, leaf = key.split("/")
        for part in parents:
            node, args_node = node.setdefault(part, {}), args_node.setdefault(part, {})
        node[leaf] = jax.ShapeDtypeStruct(disk_shape, dtype)
        # strict=False: a smaller global shape is a leading box of the stored array.
        args_node[leaf] = ocp.ArrayRestoreArgs(global_shape=disk_shape, strict=False, dtype=dtype, sharding=sharding)
    if item:
        restored = ocp.PyTreeCheckpointer().restore(
            data_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        for key, shape in targets.items():
            if key not in out:
                node = restored
                for part in key.split("/"):
                    node = node[part]
                out[key] = np.asarray(node).reshape(shape)
    return out


def load(path, rate=None, *, verify: bool = True, device=None) -> tuple[ModelConfig, Any]:
    """(cfg, params) of a checkpoint at a stored pruning `rate` (None: full rank), reading only what it keeps.

    Equal, bit for bit, to ``prune(cfg, full_params, rate, table)`` of the saved
    model. Raises `RateError` for a rate outside [0, max stored] or not stored
    (never rounded), `CheckpointError` for a missing, malformed, truncated or
    corrupted checkpoint. `verify` checks the CRC of every array read.
    """
    t0 = time.perf_counter()
    info = read_info(path)
    small, _ = resolve_rate(info.cfg, info.table, rate)
    body = info.body
    try:
        arrays, layout, data_dir = body["arrays"], body["layout"], info.path / body["data"]
        target = rate_target(small, abstract_tree(layout, arrays))
        shapes = raw_shapes(target)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"malformed checkpoint manifest {info.path / MANIFEST}: {type(e).__name__}: {e}") from None
    verify_files(data_dir, body["files"])
    t1 = time.perf_counter()
    try:
        raw = restore_raw(data_dir, shapes, arrays)
    except CheckpointError:
        raise
    except Exception as e:  # TensorStore / Orbax failures surface as many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"could not read the arrays of checkpoint {info.path} (corrupted or truncated?): "
                              f"{type(e).__name__}: {first}") from e
    t2 = time.perf_counter()
    if verify:
        for key, x in raw.items():
            want = arrays[key]["crc32"].get(shape_key(shapes[key]))
            if want is None:
                raise CheckpointError(f"array {key}: no checksum recorded for shape {shapes[key]}")
            if crc32(x) != want:
                raise CheckpointError(f"checkpoint {info.path} is corrupted: array {key} fails its CRC-32 "
                                      "recorded at save time")
    placed = jax.device_put(raw, device or jax.local_devices()[0])  # one batched host -> device transfer (this process's)
    params = map_raw(lambda k, _: placed[k], target)
    log.info("loaded %s at rate %s: manifest %.2fs, restore %.2fs, verify %.2fs", info.path, rate,
             t1 - t0, t2 - t1, time.perf_counter() - t2)
    return small, params


# ---------------------------------------------------------------------------
# Switching rates in a running process
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RateEntry:
    cfg: ModelConfig  # the config at this rate
    target: Any  # abstract params at this rate (the pruner's target)
    changed: dict  # {raw key: kept shape} of the raw arrays this rate shrinks
    slicer: Any  # jitted {key: full array} -> {key: leading box}, over `changed` only
    forward: Any  # jitted (params, tokens) -> logits


class ElasticModel:
    """A model held at full rank in memory whose pruning rate is switched in-process.

    A rate is applied like `load` applies it to the files: the pruner's abstract
    target (``slice_to_config`` traced with ``jax.eval_shape``) gives each raw array's
    kept shape and the leading boxes are cut, here from the in-memory full-rank arrays
    (no checkpoint I/O). Per rate, one compiled function cuts the arrays that rate
    shrinks (the others are the full-rank arrays themselves, not copies) and one
    compiled forward runs the model; both are kept, so switching back to a rate costs
    no tracing or compilation. ``traces`` counts traces per rate.
    """

    def __init__(self, cfg: ModelConfig, params, table: dict, *, rate=None, impl: str = "xla"):
        self.full_cfg, self.full_params = cfg, params
        self.table = check_table(cfg, table)
        self.impl = impl
        self.traces: collections.Counter = collections.Counter()
        self._full_raw = raw_arrays(params)
        self._abstract_full = jax.eval_shape(lambda p: p, params)
        self._entries: dict = {}  # stored rate (None: full rank) -> _RateEntry
        self.set_rate(rate)

    @classmethod
    def from_checkpoint(cls, path, *, rate=None, impl: str = "xla", device=None) -> "ElasticModel":
        """Read the full-rank model once; every later rate comes from memory."""
        info = read_info(path)
        cfg, params = load(path, None, device=device)
        return cls(cfg, params, info.table, rate=rate, impl=impl)

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(sorted(self.table))

    def _entry(self, rate) -> _RateEntry:
        small, key = resolve_rate(self.full_cfg, self.table, rate)
        entry = self._entries.get(key)
        if entry is None:
            target = rate_target(small, self._abstract_full)
            changed = {k: s for k, s in raw_shapes(target).items() if s != tuple(self._full_raw[k].shape)}

            def cut(arrays):
                self.traces[key] += 1  # runs only while tracing
                return {k: leading_box(arrays[k], s) for k, s in changed.items()}

            def run(params, tokens):
                self.traces[key] += 1
                return forward(small, params, tokens, impl=self.impl)

            entry = self._entries[key] = _RateEntry(small, target, changed, jax.jit(cut), jax.jit(run))
        return entry, key

    def set_rate(self, rate):
        """Switch to a stored rate (None: full rank); returns (cfg, params) at that rate."""
        entry, key = self._entry(rate)
        self.params = None  # drop the previous rate's arrays before cutting the next
        cut = entry.slicer({k: self._full_raw[k] for k in entry.changed}) if entry.changed else {}
        self.rate, self.cfg = key, entry.cfg
        self.params = map_raw(lambda k, _: cut.get(k, self._full_raw[k]), entry.target)
        return self.cfg, self.params

    def forward(self, tokens) -> jax.Array:
        """Logits float32 [B, T, V] of int32 tokens [B, T] at the current rate."""
        return self._entries[self.rate].forward(self.params, tokens)
