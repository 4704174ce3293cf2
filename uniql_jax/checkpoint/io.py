"""Save a checkpoint, read what it holds, and load it at a stored pruning rate reading only what it keeps.

A checkpoint stores the full-rank (sorted, optionally fine-tuned and quantized)
arrays once, chunked along their prunable axes (`layout`), and ``load(path, rate)``
asks Orbax/TensorStore for the leading boxes only (a smaller ``global_shape``): only
the chunks that intersect the kept part are read from disk. The folder, its manifest
and their integrity checks are `manifest`'s; the rates a checkpoint accepts, `rates`'.
``ReadCounter`` measures the bytes a load reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.checkpoint.layout import (
    DEFAULT_CHUNK_BYTES, abstract_tree, chunked_axes, describe, leading_box, map_raw, rate_target, raw_arrays,
    raw_shapes, shape_key, storage_splits, stored_shape,
)
from uniql_jax.checkpoint.manifest import (
    DATA_PREFIX, MANIFEST, CheckpointError, crc32, file_records, quantization_summary, read_manifest, remove_stale,
    verify_files, versions, write_manifest,
)
from uniql_jax.checkpoint.rates import check_table, resolve_rate, table_from_json, table_to_json
from uniql_jax.config import ModelConfig, config_from_dict, config_to_dict
from uniql_jax.paths import user_path

log = logging.getLogger(__name__)


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
                       "versions": versions(), "argv": sys.argv},
        "layout": layout,
        "arrays": arrays,
        "files": file_records(path / data_name),
    }
    _commit(path, body)
    remove_stale(path, keep=data_name)
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
