"""Runtime start-up and meshes across processes and hosts (docs/distributed.md).

JAX's own runtime, nothing home-made: ``jax.distributed.initialize`` joins the processes
(explicit ``--coordinator HOST:PORT --num-processes N --process-id I``, or what JAX
detects by itself: Slurm, Open MPI, TPU pods); one process needs nothing. Then every
process sees every device (``jax.devices()``), addresses only its own
(``jax.local_devices()``), and runs the same program on one global `Mesh`:

* a ``data`` axis over processes x local devices: calibration windows and evaluation
  batches are split over it; statistics are reduced over it with ``psum`` (exact
  collective sums, so every process ends with the same numbers);
* a ``model`` axis for weights too large for one device: each linear weight is
  sharded FSDP-style along its output or its input dim (``weight_spec`` chooses per
  weight), and XLA inserts the gathers / reductions (``shard_map`` is manual over
  ``data`` only, automatic over ``model``).

Devices are ordered process-major along ``data`` (process 0's devices first), so row
``r`` of a global batch sits on the same data index whatever the process count: a
run on 2 processes x 2 devices computes on the same per-device batches, in the same
order, as one process with 4 devices (``process_rows``).

Multi-process rules the rest of the library follows: every process runs the same
calls in the same order with the same shapes (SPMD); a value every process needs
comes back through ``to_host`` (an all-gather when the array is not fully
addressable); files are written by process 0 only (``is_main``), the others wait at a
``barrier``.

(Slightly over 400 lines on purpose: runtime start-up, meshes, process-local rows,
ordered sums and model-axis specs are one contract; split, each part would need the
others' invariants restated.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"


# ----------------------------------------------------------------------------- runtime


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What `initialize` joined: this process, the process count, local and global devices."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    platform: str
    how: str  # "single process", "explicit", "auto-detected"

    def __str__(self):
        return (f"process {self.process_index}/{self.process_count} ({self.how}): {self.local_devices} local of "
                f"{self.global_devices} {self.platform} devices")


def _cluster_detected() -> bool:
    """Whether JAX's cluster detection would find a multi-process job here (Slurm, Open MPI, TPU pod, ...)."""
    from jax._src import clusters

    try:
        return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
                   if env.__name__ not in ("MultiSliceGceTpuCluster",))
    except Exception:  # a private API: if it moved, fall back to "not detected"
        return False


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               local_device_ids=None, initialization_timeout: int = 300, heartbeat_timeout: int = 100,
               shutdown_timeout: int = 300, cpu_collectives: str | None = "gloo", auto: bool = True) -> Runtime:
    """Start JAX's distributed runtime once per process and return where this process stands.

    * ``coordinator`` ("HOST:PORT" of process 0), ``num_processes``, ``process_id``: an explicit
      job (e.g. several processes on one machine, or hosts without a scheduler JAX knows);
    * none of them and ``auto``: JAX's own cluster detection (Slurm, Open MPI, TPU pods, ...) when
      it finds a job, else nothing to do (one process);
    * ``num_processes=1`` alone: one process, nothing started.

    ``heartbeat_timeout``: seconds after which a silent process is declared dead and every
    other process fails (with the coordination service's error) instead of waiting in a
    collective for ever; ``initialization_timeout`` bounds the wait for all processes to
    join. ``cpu_collectives``: the CPU backend's cross-process collectives ("gloo"; CPU only,
    ignored on accelerators). Idempotent: a second call returns the same `Runtime`.
    """
    from jax._src import distributed as _dist

    explicit = coordinator is not None or (num_processes or 1) > 1 or process_id is not None
    if _dist.global_state.client is not None:
        return runtime("explicit" if explicit else "auto-detected")
    if explicit or (auto and num_processes is None and _cluster_detected()):
        if explicit and (coordinator is None or num_processes is None or process_id is None):
            raise ValueError("an explicit job needs all of --coordinator HOST:PORT, --num-processes N, --process-id I")
        if cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        t0 = time.perf_counter()
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=initialization_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout,
                                   shutdown_timeout_seconds=shutdown_timeout)
        rt = runtime("explicit" if explicit else "auto-detected")
        log.info("%s; joined in %.1f s", rt, time.perf_counter() - t0)
        return rt
    return runtime("single process")


def runtime(how: str | None = None) -> Runtime:
    from jax._src import distributed as _dist

    how = how or ("single process" if _dist.global_state.client is None else "joined")
    return Runtime(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                   jax.devices()[0].platform, how)


def add_flags(parser) -> None:
    """--coordinator / --num-processes / --process-id / --model-axis / --distributed-timeout."""
    g = parser.add_argument_group("distributed (JAX runtime; nothing to pass for one process)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordination service (explicit multi-process "
                                         "job; without it Slurm / Open MPI / TPU pods are auto-detected)")
    g.add_argument("--num-processes", type=int, help="processes in the job (with --coordinator)")
    g.add_argument("--process-id", type=int, help="this process's index, 0..N-1 (with --coordinator)")
    g.add_argument("--model-axis", type=int, default=1,
                   help="devices per `model` mesh axis: each linear weight sharded over that many devices "
                        "(default 1: weights replicated, all devices on the `data` axis)")
    g.add_argument("--distributed-timeout", type=int, default=300,
                   help="seconds to wait for all processes to join, and after which a silent process is "
                        "declared dead (default 300)")


def initialize_from_args(args) -> Runtime:
    """`initialize` from the `add_flags` flags."""
    t = getattr(args, "distributed_timeout", 300)
    return initialize(args.coordinator, args.num_processes, args.process_id, initialization_timeout=t,
                      heartbeat_timeout=t)


def is_main() -> bool:
    """True on process 0: the one that prints tables and writes files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value):
    """process 0's value (a pytree of arrays / numbers) on every process (identity for one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)


# ----------------------------------------------------------------------------- meshes


def global_mesh(model: int = 1, devices=None) -> Mesh:
    """Mesh ("data", "model") over every device of every process (or `devices`), process-major.

    `model` devices per model group (they hold the shards of one weight, so keep a
    group inside one host: consecutive devices of one process when `model` divides the
    local device count); data = devices / model.
    """
    devs = list(jax.devices() if devices is None else devices)
    devs.sort(key=lambda d: (d.process_index, d.id))
    if model < 1 or len(devs) % model:
        raise ValueError(f"--model-axis {model} does not divide the {len(devs)} devices")
    return Mesh(np.asarray(devs, dtype=object).reshape(len(devs) // model, model), (DATA, MODEL))


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def is_multiprocess(mesh: Mesh) -> bool:
    return len({d.process_index for d in mesh.devices.flat}) > 1


def process_rows(n_rows: int, per_step: int, mesh: Mesh, process: int | None = None) -> np.ndarray:
    """Indices of the rows of a [n_rows, ...] batch (n_rows a multiple of per_step) that `process` feeds.

    Steps of `per_step` rows are split over the data axis in order; a process feeds the rows
    of its own data indices in every step (with several processes, a contiguous run per step
    because devices are process-major). For one process: all rows."""
    process = jax.process_index() if process is None else process
    if n_rows % per_step:
        raise ValueError(f"{n_rows} rows are not whole steps of {per_step}")
    nd = data_size(mesh)
    if per_step % nd:
        raise ValueError(f"a step of {per_step} rows does not divide over {nd} data shards")
    per_shard = per_step // nd
    by_data = np.moveaxis(mesh.devices, mesh.axis_names.index(DATA), 0).reshape(nd, -1)
    mine = [i for i, row in enumerate(by_data) if any(d.process_index == process for d in row)]
    within = np.concatenate([np.arange(i * per_shard, (i + 1) * per_shard) for i in mine]) if mine else np.zeros(0, int)
    return (np.arange(0, n_rows, per_step)[:, None] + within[None, :]).reshape(-1)


def global_batch(local_rows: np.ndarray, mesh: Mesh, spec=PartitionSpec(DATA)) -> jax.Array:
    """A global array from this process's rows (its data shards of one step, in order)."""
    sharding = NamedSharding(mesh, spec)
    local_rows = np.asarray(local_rows)
    if not is_multiprocess(mesh):
        return jax.device_put(local_rows, sharding)
    return jax.make_array_from_process_local_data(sharding, local_rows)


def put(value, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds whole (e.g. evaluation windows every process
    read): each process transfers only the slices of its own devices."""
    if not is_multiprocess(sharding.mesh) or (isinstance(value, jax.Array) and not value.is_fully_addressable):
        return jax.device_put(value, sharding)  # one process, or already global: a (re)sharding
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over "data" (axis 0), in order, on the host.

    Shards split along other axes too (over "model") are put back together."""
    if x.is_fully_addressable:
        return np.asarray(x)
    starts = sorted({s.index[0].start or 0 for s in x.addressable_shards})
    shard_rows = x.sharding.shard_shape(x.shape)[0]
    offset = {start: i * shard_rows for i, start in enumerate(starts)}
    out = np.empty((len(starts) * shard_rows,) + x.shape[1:], x.dtype)
    for s in x.addressable_shards:
        r0 = offset[s.index[0].start or 0]
        out[(slice(r0, r0 + shard_rows),) + tuple(s.index[1:])] = np.asarray(s.data)
    return out


def to_host(tree):
    """Every leaf as a numpy array holding the whole global value, on every process.

    Fully addressable arrays are fetched; a fully replicated one is read from a local copy;
    otherwise the processes all-gather it (a collective: all processes must call this)."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def allgather_rows(rows: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Rows held per process (the same count on each) concatenated in process order, on every process;
    `order` (the global row index of each local row) puts them back in global row order."""
    if jax.process_count() == 1:
        return rows if order is None else rows[np.argsort(order, kind="stable")]
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(rows), tiled=True))
    if order is None:
        return gathered
    all_order = np.asarray(multihost_utils.process_allgather(np.asarray(order), tiled=True))
    out = np.empty_like(gathered)
    out[all_order] = gathered
    return out


# ----------------------------------------------------------------------------- exact sums


def ordered_psum(x, axis_name: str = DATA, axis_size: int | None = None):
    """``psum`` over `axis_name` in a fixed order, inside ``shard_map``: the same bits whatever the
    process layout.

    XLA's all-reduce adds in an order of its choosing: inside one process (4 devices) it is not
    that of gloo across processes (2 x 2), so float32 sums differ in the last bits, and a GPTQ
    code near a rounding boundary flips. Here the shards are added pairwise along a fixed binary
    tree over the axis index (``ppermute`` steps of stride 1, 2, 4, ...: shard 0 ends with
    ``((x0 + x1) + (x2 + x3)) + ...``), then shard 0's total is broadcast by a ``psum`` in which
    every other shard adds an exact 0. ⌈log2 n⌉ + 1 collectives instead of 1; the result depends
    only on the axis size (and the per-shard values), not on how devices map to processes.
    """
    n = axis_size if axis_size is not None else jax.lax.psum(1, axis_name)
    if n == 1:
        return x
    idx = jax.lax.axis_index(axis_name)
    stride = 1
    while stride < n:
        pairs = [(i + stride, i) for i in range(0, n, 2 * stride) if i + stride < n]
        recv = jax.tree.map(lambda a: jax.lax.ppermute(a, axis_name, pairs), x)
        x = jax.tree.map(lambda a, r: a + r, x, recv)  # non-receivers get zeros: a + 0 is exact
        stride *= 2
    return jax.tree.map(lambda a: jax.lax.psum(jax.numpy.where(idx == 0, a, jax.numpy.zeros_like(a)), axis_name), x)


# ----------------------------------------------------------------------------- model-axis sharding


def weight_spec(name: str, shape: tuple[int, ...], n_model: int, *, min_size: int = 0) -> PartitionSpec:
    """How a weight is sharded over the "model" axis, FSDP-style: along its output or its input dim.

    Output-side dims (the last axis: Dout of q/k/v/gate/up/in_proj, D of o/down/out) are
    preferred: each device then computes whole output columns and no partial sums need
    reducing. When the last axis does not divide by `n_model`, the largest other axis that
    does is used (the input side: XLA reduces the partial products over "model"); a weight
    with no such axis, a vector, or one under `min_size` elements stays replicated.
    """
    rank = len(shape)
    if n_model == 1 or rank < 2 or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [rank - 1] + sorted(range(rank - 1), key=lambda a: -shape[a])
    for axis in candidates:
        if shape[axis] % n_model == 0 and shape[axis] >= n_model:
            return PartitionSpec(*([None] * axis + [MODEL]))
    return PartitionSpec()


def stat_spec(shape: tuple[int, ...], n_model: int) -> PartitionSpec:
    """A calibration statistic (e.g. a Hessian [Din, Din]) over "model": by rows when they divide."""
    if n_model > 1 and len(shape) >= 2 and shape[0] % n_model == 0:
        return PartitionSpec(MODEL)
    return PartitionSpec()


def param_specs(params, n_model: int, *, min_size: int = 0):
    """PartitionSpec per leaf of a (block's) params: `weight_spec` over "model" (replicated over "data")."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs = [weight_spec(jax.tree_util.keystr(p), tuple(np.shape(x)), n_model, min_size=min_size) for p, x in paths]
    return jax.tree_util.tree_unflatten(treedef, specs)


def param_shardings(params, mesh: Mesh, *, min_size: int = 0):
    """NamedSharding per leaf of a (block's) params on `mesh` (`param_specs`)."""
    specs = param_specs(params, mesh.shape.get(MODEL, 1), min_size=min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def put_params(params, mesh: Mesh, *, min_size: int = 0):
    """Params on `mesh`: weights sharded over "model" (`weight_spec`), replicated over "data".

    Every process holds the full values on its host (it has them already: the same
    checkpoint, or the same deterministic compression result); each device receives only
    its own shard."""
    shardings = param_shardings(params, mesh, min_size=min_size)
    if not is_multiprocess(mesh):
        return jax.device_put(params, shardings)
    return jax.tree.map(put, params, shardings)


# ----------------------------------------------------------------------------- memory (abstract)


def bytes_per_device(abstract_tree, specs, axis_sizes: dict[str, int]) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs laid out by PartitionSpecs `specs`
    (a pytree of the same structure, or one spec for all) on a mesh of `axis_sizes` ({"data": 8,
    "model": 8}); nothing is allocated, no device is needed (the 70B sizing of docs/distributed.md)."""
    leaves = jax.tree.leaves(abstract_tree)
    spec_leaves = ([specs] * len(leaves) if isinstance(specs, PartitionSpec)
                   else jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
    total = 0
    for a, spec in zip(leaves, spec_leaves, strict=True):
        shape = list(a.shape)
        for dim, names in enumerate(spec):
            for name in (names if isinstance(names, tuple) else (names,)):
                if name is not None:
                    shape[dim] = -(-shape[dim] // axis_sizes.get(name, 1))
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total


def env_summary() -> dict:
    """The environment variables that decide a multi-process start (for logs)."""
    keys = ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "XLA_FLAGS")
    return {k: os.environ[k] for k in keys if k in os.environ}


# ----------------------------------------------------------------------------- the default mesh

_DEFAULT_MESH: list = []


def use_mesh(mesh: Mesh | None) -> None:
    """Make `mesh` the default of every data-parallel stage (calibration, perplexity, lm-eval backend);
    None: back to the 1-D "data" mesh over all devices. A program calls this once after `initialize`."""
    _DEFAULT_MESH[:] = [] if mesh is None else [mesh]


def default_mesh() -> Mesh:
    """The mesh `use_mesh` set, else a 1-D "data" mesh over every device of every process, process-major."""
    if _DEFAULT_MESH:
        return _DEFAULT_MESH[0]
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devs, dtype=object), (DATA,))
