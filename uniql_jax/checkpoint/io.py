"""Save a checkpoint, read what it holds, and load it at a stored pruning rate reading only what it keeps.

A checkpoint stores the full-rank (sorted, optionally fine-tuned and quantized)
arrays once, chunked along their prunable axes (`layout`), and ``load(path, rate)``
asks Orbax/TensorStore for the leading boxes only (a smaller ``global_shape``): only
the chunks that intersect the kept part are read from disk. The folder, its manifest
and their integrity checks are `manifest`'s; the rates a checkpoint accepts, `rates`'.
``ReadCounter`` measures the bytes a load reads.

Across processes (docs/distributed.md) both are collective: every process calls ``save``
with the same arguments and writes only the shards its devices own of the leaves that are
global ``jax.Array`` s (e.g. params placed by ``distributed.put_params``); leaves every process
holds whole (numpy, or arrays on local devices) are written once, by process 0. ``load(...,
mesh=...)`` gives every process the arrays laid out over the mesh, each reading only the
chunks of its own devices' shards.

(Slightly over 400 lines on purpose: save and load, in one process and across processes, share
the storage layout, the digest rule and the relayout helpers.)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uniql_jax import distributed
from uniql_jax.checkpoint.layout import (
    DEFAULT_CHUNK_BYTES, abstract_tree, chunked_axes, describe, leading_box, map_raw, rate_target, raw_arrays,
    raw_shapes, shape_key, storage_splits, stored_shape, stored_spec,
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


@functools.lru_cache(maxsize=None)
def _reshaper(shape: tuple[int, ...], sharding: NamedSharding):
    return jax.jit(lambda x: x.reshape(shape), out_shardings=sharding)


def _relayout(x: jax.Array, shape: tuple[int, ...], spec: tuple) -> jax.Array:
    """A global array reshaped to `shape` (between logical and stored shapes), laid out by `spec` on its mesh.

    Collective across the mesh's processes; moves bits only (between devices where the two
    layouts differ, e.g. a split axis sharded on its inner part: `layout.stored_spec`)."""
    if not isinstance(x.sharding, NamedSharding):
        raise ValueError(f"a multi-process array needs a NamedSharding (place params with distributed.put_params), "
                         f"got {type(x.sharding).__name__}")
    return _reshaper(tuple(shape), NamedSharding(x.sharding.mesh, PartitionSpec(*spec)))(x)


def _is_global(x) -> bool:
    """A jax.Array spread over devices of several processes (each process holds only its shards)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _data_name() -> str:
    """A fresh name for the data folder; across processes process 0's (they all write into it)."""
    if jax.process_count() == 1:
        return f"{DATA_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    mine = np.asarray([int(time.time()), secrets.randbits(31)], np.int32)
    stamp, token = (int(v) for v in np.asarray(distributed.broadcast_from_main(mine)))
    return f"{DATA_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}-{token:08x}"


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

    Several processes (``jax.process_count() > 1``): a collective, every process calls it with
    the same arguments and the same `path` (a file system they all see). A leaf that is a global
    ``jax.Array`` (over several processes' devices, a ``NamedSharding``) is written shard by
    shard, each process writing the shards its devices own (Orbax's multi-process save: one
    replica of each shard; a replicated leaf once); its stored axes are laid out by
    `layout.stored_spec`, and the TensorStore chunks divide each shard, so the storage splits
    still hold. A leaf every process holds whole (numpy, an array on local devices) is
    written by process 0. The manifest's CRC-32 of every leading box needs the box's values:
    each global leaf is all-gathered (`distributed.to_host`), one leaf at a time, its digests
    computed and the copy dropped, so a process holds at most one whole raw array (the
    largest: e.g. an embedding) on its host beyond its own shards, and every sharded leaf
    crosses the network once. The digests are thus those one process would record, bit for
    bit. After Orbax has finalized the data folder (its own barriers) process 0 alone writes
    the manifest, then every process waits for it; a process that fails before leaves no
    manifest (the others fail in the next collective).
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
    collective = jax.process_count() > 1
    for key, x in leaves.items():
        shapes = [s[key] for s in kept.values() if key in s]
        splits = storage_splits(full_shapes[key], shapes)
        sharded = collective and _is_global(x)
        host = distributed.to_host(x) if sharded else np.asarray(jax.device_get(x))  # sharded: an all-gather
        digests = {shape_key(s): crc32(leading_box(host, s)) for s in {full_shapes[key], *shapes}}
        if sharded:
            host = None  # the gathered copy goes now: one whole leaf at a time
        arrays[key].update(splits=[list(s) for s in splits], crc32=digests)
        if math.prod(full_shapes[key]) == 0:  # nothing to store; TensorStore has no 0-sized dimensions
            continue
        node, args_node = storage, save_args
        *parents, leaf = key.split("/")
        for part in parents:
            node, args_node = node.setdefault(part, {}), args_node.setdefault(part, {})
        disk_shape = stored_shape(full_shapes[key], splits)
        if sharded:  # each process writes its own shards (Orbax: one replica of each)
            spec = stored_spec(x.sharding.spec, full_shapes[key], splits, dict(x.sharding.mesh.shape))
            node[leaf] = _relayout(x, disk_shape, spec)
        else:
            node[leaf] = host.reshape(disk_shape)  # a view; Orbax writes numpy as is
        args_node[leaf] = ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=chunked_axes(splits))

    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    data_name = _data_name()
    t1 = time.perf_counter()
    # Across processes a collective: numpy leaves are written by process 0, global arrays shard by shard.
    ocp.PyTreeCheckpointer(use_compression=compress).save(path / data_name, storage, save_args=save_args)
    del storage
    t2 = time.perf_counter()
    distributed.barrier("checkpoint.save: arrays written")
    if distributed.is_main():
        _write_manifest_body(path, data_name, params, table, kept, meta, config_json, layout, arrays, full_shapes)
    distributed.barrier("checkpoint.save: committed")
    log.info("saved %s: prepare %.2fs, orbax %.2fs, commit %.2fs", path, t1 - t0, t2 - t1, time.perf_counter() - t2)
    return path


def _write_manifest_body(path: Path, data_name: str, params, table, kept, meta, config_json, layout, arrays,
                         full_shapes):
    """The manifest of a written data folder, committed; then the older data folders go (one writer)."""
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


def restore_raw(data_dir: Path, targets: dict, arrays: dict, *, mesh: Mesh | None = None) -> dict:
    """{key: array} of the leading boxes `targets` {key: shape} of the stored raw arrays.

    Without `mesh`: host numpy arrays, restored to the host CPU device (un-splitting stored
    axes is then a free numpy view, no per-shape XLA reshape; checksums read host memory).
    With `mesh`: global ``jax.Array`` s on it, laid out by `sharding_specs`; every process
    reads only the chunks of its own devices' shards (a collective: all processes call it).
    """
    import orbax.checkpoint as ocp

    if mesh is not None and not distributed.is_multiprocess(mesh):  # one process reads everything: read once
        specs = sharding_specs(targets, mesh)
        host = restore_raw(data_dir, targets, arrays)
        return {key: jax.device_put(x, NamedSharding(mesh, specs[key])) for key, x in host.items()}
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    specs = sharding_specs(targets, mesh) if mesh is not None else {}
    item, restore_args, out = {}, {}, {}
    for key, shape in targets.items():
        meta = arrays[key]
        dtype = jnp.dtype(meta["dtype"])
        if len(shape) != len(meta["shape"]) or any(n > m for n, m in zip(shape, meta["shape"])):
            raise CheckpointError(f"array {key}: a rate needs shape {shape}, more than the stored {tuple(meta['shape'])}")
        if math.prod(shape) == 0:
            out[key] = np.zeros(shape, dtype)
            if mesh is not None:
                out[key] = distributed.put(out[key], NamedSharding(mesh, specs[key]))
            continue
        splits = [tuple(s) for s in meta["splits"]]
        disk_shape = stored_shape(shape, splits)
        if mesh is not None:
            sharding = NamedSharding(mesh, PartitionSpec(*stored_spec(specs[key], shape, splits, dict(mesh.shape))))
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
                out[key] = np.asarray(node).reshape(shape) if mesh is None else _relayout(node, shape, specs[key])
    return out


def sharding_specs(shapes: dict, mesh: Mesh) -> dict:
    """{key: PartitionSpec} of raw arrays {key: shape} on `mesh`: `distributed.weight_spec` over its "model"
    axis (as `distributed.put_params` places params), replicated over the others."""
    n_model = dict(mesh.shape).get(distributed.MODEL, 1)
    return {key: distributed.weight_spec(key, tuple(shape), n_model) for key, shape in shapes.items()}


def load(path, rate=None, *, verify: bool = True, device=None, mesh: Mesh | None = None) -> tuple[ModelConfig, Any]:
    """(cfg, params) of a checkpoint at a stored pruning `rate` (None: full rank), reading only what it keeps.

    Equal, bit for bit, to ``prune(cfg, full_params, rate, table)`` of the saved
    model. Raises `RateError` for a rate outside [0, max stored] or not stored
    (never rounded), `CheckpointError` for a missing, malformed, truncated or
    corrupted checkpoint. `verify` checks the CRC of every array read.

    `device`: where the arrays go (default: this process's first device). `mesh` instead: the
    arrays as global ``jax.Array`` s on it, each weight sharded over its "model" axis by
    `distributed.weight_spec` (what ``distributed.put_params`` would give) and replicated over
    the rest; across processes a collective, every process reading from disk only the chunks
    of its own devices' shards of the rate's leading boxes (on a checkpoint saved collectively
    with the same sharding the chunks divide the shards; a chunk straddling two shards is read
    by both). With `verify` and a mesh over several processes, each array is all-gathered
    (`distributed.to_host`; one array at a time, no extra disk read) and the whole box checked
    against its recorded CRC-32 on every process: sound, every byte any process read is
    checked, and all processes agree on the verdict; it costs one copy of the largest array
    on each host and one all-gather per array (``verify=False`` skips it).
    """
    if mesh is not None and device is not None:
        raise ValueError("pass device= (one device) or mesh= (sharded over a mesh), not both")
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
        raw = restore_raw(data_dir, shapes, arrays, mesh=mesh)
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
            if crc32(distributed.to_host(x) if mesh is not None else x) != want:  # sharded: an all-gather
                raise CheckpointError(f"checkpoint {info.path} is corrupted: array {key} fails its CRC-32 "
                                      "recorded at save time")
    if mesh is None:
        placed = jax.device_put(raw, device or jax.local_devices()[0])  # one batched host -> device transfer (this process's)
    else:
        placed = raw  # already on the mesh
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
