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

Across processes (`jtricks.training.processes.initialize`), each process
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

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtricks.errors import ConfigError
from jtricks.moved import module_getattr

AXIS = "data"
FSDP = "fsdp"
AXES = (AXIS, FSDP)
"""The mesh axes `fit` knows: ``"data"`` (batches split, state replicated) and ``"fsdp"``
(batches split too, and parameters, optimizer state and BatchNorm statistics sharded:
ZeRO-3 / FSDP on GSPMD)."""
MIN_SHARDED = 2**14
"""Arrays with fewer elements stay replicated under ``fsdp`` (biases, norms, scalars):
sharding them would save little memory for a collective each."""


def data_mesh(devices: Any = None) -> Mesh | None:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with axis
    ``"data"``, or ``None`` when there is a single device (then nothing is sharded)."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) <= 1:
        return None
    return Mesh(np.asarray(devices), (AXIS,))


def as_mesh(mesh: Any) -> Mesh | None:
    """`fit`'s ``mesh`` argument as a mesh: ``"auto"`` (`data_mesh`), a spec string
    (`parse_mesh`), a `Mesh` or ``None``."""
    if isinstance(mesh, str):
        return data_mesh() if mesh == "auto" else parse_mesh(mesh)
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: every axis of `AXES` the mesh has."""
    return tuple(a for a in AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard the leading (batch) axis over the mesh's data (and fsdp) axes."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def parse_mesh(spec: str, devices: Any = None) -> Mesh:
    """A mesh from ``"data=4,fsdp=2"`` (axes of `AXES`, sizes multiplying to the device
    count; ``fsdp=8`` alone, or ``data=-1`` for "the rest"), devices in `jax.devices`
    order, ``fsdp`` the faster-varying axis (neighbours share a model's shards).

    Raises:
      ConfigError (``param="mesh"``): an unknown axis, a bad size, a product that is not
        the device count.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes: dict[str, int] = {}
    for part in str(spec).replace(" ", "").split(","):
        name, _, size = part.partition("=")
        if name not in AXES or name in sizes or not size.lstrip("-").isdigit():
            raise ConfigError(
                f"mesh must be AXIS=SIZE,... with axes {' and '.join(AXES)} (e.g. "
                f"data=4,fsdp=2); got {spec!r}",
                param="mesh",
            )
        sizes[name] = int(size)
    rest = [n for n, v in sizes.items() if v == -1]
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if len(rest) == 1 and known > 0 and len(devices) % known == 0:
        sizes[rest[0]] = len(devices) // known
    if any(v < 1 for v in sizes.values()) or int(np.prod(list(sizes.values()))) != len(devices):
        raise ConfigError(
            f"mesh {spec!r}: the axis sizes must multiply to the {len(devices)} devices",
            param="mesh",
        )
    names = tuple(a for a in AXES if a in sizes)
    return Mesh(np.asarray(devices).reshape([sizes[n] for n in names]), names)


def shard_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = MIN_SHARDED) -> P:
    """Where an array of ``shape`` lives on ``mesh``: replicated (``P()``) without an
    ``fsdp`` axis, below ``min_size`` elements, or when no axis divides by the ``fsdp``
    size; else split along its largest such axis (the first of equals). The rule reads
    only the shape, so it fits any model, and a parameter and its Adam moments (the same
    shape) are split alike."""
    n = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get(FSDP, 1)
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    fits = [i for i, d in enumerate(shape) if d % n == 0]
    if not fits:
        return P()
    axis = max(fits, key=lambda i: (shape[i], -i))
    return P(*([None] * axis + [FSDP]))


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """`shard_spec`'s `NamedSharding` for every array of ``tree`` (a `TrainState`: the
    step, key and other scalars replicated)."""
    return jax.tree.map(lambda a: NamedSharding(mesh, shard_spec(np.shape(a), mesh)), tree)


def constrain_state(tree: Any, mesh: Mesh) -> Any:
    """Inside a jitted step: keep every array of ``tree`` where `shard_spec` puts it, so
    the compiled loop's carry stays sharded (GSPMD then gathers parameters for the
    forward pass and reduce-scatters gradients)."""
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(
            a, NamedSharding(mesh, shard_spec(a.shape, mesh))
        ),
        tree,
    )


def is_sharded_mesh(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` shards the state (an ``fsdp`` axis of size > 1)."""
    return (
        mesh is not None
        and dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get(FSDP, 1) > 1
    )


def place_state(tree: Any, mesh: Mesh) -> Any:
    """Put ``tree`` (a `TrainState`) on ``mesh``: replicated on a data-only mesh
    (`replicate`), sharded by `shard_spec` with an ``fsdp`` axis."""
    if not is_sharded_mesh(mesh):
        return replicate(tree, mesh)
    return _put(tree, state_shardings(tree, mesh))


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
    return _put(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def _put(tree: Any, shardings: Any) -> Any:
    """``tree`` placed with ``shardings`` (one per leaf); across processes each builds
    its own shards from its copy (every process holds the same values)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(a, sharding):  # device_put cannot target other processes' devices
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(a), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


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


__getattr__ = module_getattr(__name__)  # the joining of processes moved (jtricks.moved)
