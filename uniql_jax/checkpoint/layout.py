"""The param tree of a checkpoint <-> its raw arrays, and how each raw array is stored.

Elastic layout (docs/method.md, "Deployment"): every prunable axis is its own array axis and sorting
puts the kept channels first, so the model a rate keeps is, array by array, a
*leading box* of the full-rank arrays (``compress/prune.py``).

Raw arrays: every dense leaf, and every array field of a packed quantized leaf
(``QArray.codes``, ``QArray.scales``, ``BCQArray.planes``, ...; any type that
``formats.packed.PACKED_TYPES`` lists) under the key ``"blocks/3/up/codes"``. The static
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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniql_jax.checkpoint.manifest import CheckpointError
from uniql_jax.compress.prune import slice_to_config
from uniql_jax.config import ModelConfig
from uniql_jax.quant.formats import bcq, packed, qarray
from uniql_jax.quant.formats.packed import is_packed

DEFAULT_CHUNK_BYTES = 1 << 20  # Orbax warns below 1 MiB; prunable axes are chunked finer anyway


# ---------------------------------------------------------------------------
# Param trees <-> raw arrays
# ---------------------------------------------------------------------------


def class_name(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


PACKED_TYPES = {class_name(cls): cls for cls in packed.PACKED_TYPES}
# Where the types lived before the formats package (checkpoints written then still load).
PACKED_TYPES.update({"uniql_jax.quant.qarray:QArray": qarray.QArray,
                     "uniql_jax.quant.bcq:BCQArray": bcq.BCQArray})


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
    if is_packed(tree):
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
    if is_packed(tree):
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
# Storage: split prunable axes, chunk them
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


def stored_spec(spec, shape: tuple[int, ...], splits: list[tuple[int, int]], axis_sizes: dict) -> tuple:
    """The PartitionSpec entries of the stored array (`stored_shape`) of a `shape` laid out by `spec`.

    An axis that is not split keeps its mesh axes. A split axis ``n -> (n // g, g)`` puts them
    on the inner part ``g`` when it divides: that choice depends on ``g`` and the mesh only, not
    on ``n``, so the full-rank array a collective save writes and the leading box of every rate
    a sharded load reads are sharded alike, and the chunks (which divide the written shards)
    divide the shards read. Else on the outer part when ``n // g`` divides, else the stored
    axis is replicated. `axis_sizes`: {mesh axis name: size}.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    by_axis = dict(splits)
    out = []
    for axis, (n, names) in enumerate(zip(shape, entries)):
        g = by_axis.get(axis)
        if g is None or g == 1 or names is None:
            out.extend((names,) if g is None or g == 1 else (None, None))
            continue
        size = math.prod(axis_sizes[a] for a in (names if isinstance(names, tuple) else (names,)))
        if g % size == 0:
            out.extend((None, names))
        elif (n // g) % size == 0:
            out.extend((names, None))
        else:
            out.extend((None, None))
    return tuple(out)


def shape_key(shape) -> str:
    return "x".join(str(int(n)) for n in shape) or "scalar"


def leading_box(x: np.ndarray, shape) -> np.ndarray:
    return x[tuple(slice(0, n) for n in shape)]
