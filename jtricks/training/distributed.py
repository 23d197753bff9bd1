"""Data parallelism on JAX's own engine: a device mesh, `NamedSharding`, GSPMD.

`fit` calls `data_mesh()`; with more than one visible device (or process) it
trains data-parallel with no change to user code:

* a 1-D `jax.sharding.Mesh` over every device, axis ``"data"``;
* parameters, optimizer state and BatchNorm statistics replicated (``P()``);
* every training batch constrained to ``P("data")`` inside the compiled epoch, so
  each device computes the forward and backward pass of its slice, and XLA's SPMD
  partitioner inserts the gradient all-reduce (the loss is a mean over the global
  batch, so the result equals one device's up to float reassociation);
* dropout masks come from one key for the global batch; with
  ``jax_threefry_partitionable`` (the default) each device draws only its slice, so
  devices get different masks and a seed gives the same masks on any device count.

Across processes (`initialize`, i.e. `jax.distributed.initialize`), each process
passes only its own shard of the training data; `global_batch_array` assembles the
global array (process 0's examples first) with
`jax.make_array_from_process_local_data`, and the epoch's shuffle indexes it
globally, so N processes train in lockstep exactly like one process holding the
concatenated shards.

References:
  Xu et al., "GSPMD: General and Scalable Parallelization for ML Computation Graphs" (2021),
  https://arxiv.org/abs/2105.04663; JAX, "Distributed arrays and automatic parallelization".
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtricks.errors import ConfigError, check_int

AXIS = "data"


def data_mesh(devices: Any = None) -> Mesh | None:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with axis
    ``"data"``, or ``None`` when there is a single device (then nothing is sharded)."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) <= 1:
        return None
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard the leading (batch) axis over the mesh's data axis."""
    return NamedSharding(mesh, P(AXIS))


def like_state(tree: Any, params: Any) -> Any:
    """``tree`` replicated on the mesh of ``params`` when they are data-parallel (a
    `NamedSharding` over more than one device); otherwise ``tree`` unchanged."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
        return replicate(tree, sharding.mesh)
    return tree


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` on every device of ``mesh``. Across processes the
    leaves must hold the same values in every process (the same seed gives that)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(a):  # device_put cannot target other processes' devices
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(a))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def global_batch_array(local: Any, mesh: Mesh) -> jax.Array:
    """The global array whose rows are every process's ``local`` rows (process order),
    sharded over the data axis. Single process: ``local`` placed on the mesh, replicated
    (small datasets; the batch gathered from it is sharded inside the step); a JAX array
    is copied device to device, never through the host."""
    if jax.process_count() == 1:
        return jax.device_put(local, replicated(mesh))
    local = np.asarray(local)
    n_local = len(jax.local_devices())
    if local.shape[0] % n_local:
        raise ConfigError(
            f"this process's {local.shape[0]} training examples must divide evenly over its "
            f"{n_local} devices",
            param="batch_size",
        )
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def check_batch(batch_size: int, mesh: Mesh | None) -> None:
    if mesh is not None and batch_size % mesh.size:
        raise ConfigError(
            f"batch_size must be divisible by the number of devices ({mesh.size}) for "
            f"data-parallel training; got {batch_size}",
            param="batch_size",
        )


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` for a multi-process run (one call per process, before
    any other JAX work). On CPU, cross-process collectives use gloo.

    Raises:
      ConfigError: a malformed ``HOST:PORT``, ``num_processes < 1`` or
        ``process_id`` outside ``[0, num_processes)``.
    """
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"coordinator must be HOST:PORT (e.g. localhost:12355); got {coordinator!r}",
            param="coordinator",
        )
    check_int("num_processes", num_processes, low=1)
    check_int("process_id", process_id, low=0, high=num_processes - 1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


CLUSTERS = {
    "SLURM": (
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    ),
    "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    "Kubernetes": ("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX"),
}
"""The launchers whose environment `jax.distributed.initialize` reads by itself, and the
variables that show one started this process (the ones JAX's own detection reads)."""

SIZES = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}
RANKS = {"SLURM": "SLURM_PROCID", "Open MPI": "OMPI_COMM_WORLD_RANK"}


def detect_cluster(environ: Any = None) -> tuple[str, int | None, int | None] | None:
    """``(launcher, processes, this process's rank)`` when a multi-process launcher
    started this process (SLURM with ``SLURM_NTASKS > 1``, Open MPI's ``mpirun`` with
    ``OMPI_COMM_WORLD_SIZE > 1``, an indexed Kubernetes Job with the ``kubernetes``
    package installed, whose size JAX asks the Kubernetes API for: ``None``), else
    ``None``. ``JTRICKS_AUTO_DISTRIBUTED=0`` turns
    the detection off."""
    import os

    env = os.environ if environ is None else environ
    if env.get("JTRICKS_AUTO_DISTRIBUTED", "1") == "0":
        return None
    for name, names in CLUSTERS.items():
        if not all(v in env for v in names):
            continue
        if name not in SIZES:  # JAX asks the Kubernetes API, through its client package
            if importlib.util.find_spec("kubernetes") is not None:
                return name, None, None
            continue
        size, rank = int(env[SIZES[name]]), int(env[RANKS[name]])
        if size > 1:
            return name, size, rank
    return None


def initialize_from_cluster(environ: Any = None) -> tuple[str, int | None, int | None] | None:
    """`jax.distributed.initialize()` with no arguments (JAX reads the coordinator, the
    process count and this process's rank from the launcher) when `detect_cluster` finds
    one; returns what it found. CPU collectives use gloo."""
    found = detect_cluster(environ)
    if found is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
    return found
