"""Checks of user data before anything is compiled: structure, values, fit to the model.

Every failure is a `ConfigError` that names where the data came from ("training data",
"validation data", ...), the entry of the batch and what is allowed.

Data already on a device (JAX arrays) are checked there: the checks reduce them on the
device and only scalars (a count, a minimum) reach the host, so a `fit` call on
device-resident data copies none of it to the host and back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.caches import cached, jitted
from jtricks.data.stream import is_stream
from jtricks.errors import ConfigError
from jtricks.tasks import Classification, LanguageModel, LossTask, Regression, Task
from jtricks.tasks.base import PerArray, array_of, nonfinite
from jtricks.training.model import apply_model


def as_arrays(data: Any, where: str) -> Any:
    """``data`` with every leaf an array (a JAX array as it is, on its device; anything else
    as a NumPy array), checked to share a leading example axis N >= 1."""
    if isinstance(data, str | bytes):
        raise ConfigError(
            f"{where} is a {type(data).__name__} ({data[:40]!r}): give arrays (x, y), a dict "
            "of arrays or a stream of batches (a dataset name goes to jtricks.train(dataset=))"
        )
    try:
        data = jax.tree.map(array_of, data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: entries must be arrays: {e}") from None
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if not leaves:
        raise ConfigError(f"{where}: the batch holds no arrays")
    sizes = {}
    for path, a in leaves:
        name = jax.tree_util.keystr(path) or "data"
        if a.ndim == 0:
            raise ConfigError(
                f"{where}: features must have shape (N, ...) with N examples; "
                f"entry {name} has shape (){_listed_hint(path)}"
            )
        sizes[name] = a.shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ConfigError(f"{where}: every entry needs the same number of examples; got {listed}")
    if next(iter(sizes.values())) == 0:
        raise ConfigError(f"{where}: no examples")
    return data


def _listed_hint(path: tuple) -> str:
    """A scalar leaf two or more sequence levels deep: the examples came as nested lists."""
    if sum(isinstance(k, jax.tree_util.SequenceKey) for k in path) < 2:
        return ""
    return " (a list of examples is a pytree of its numbers: give one array, np.asarray(...))"


def check_inputs(task: Task, data: Any, where: str) -> None:
    """The model's inputs must be numeric and finite."""
    for path, x in jax.tree_util.tree_leaves_with_path(task.inputs(data)):
        name = f" {jax.tree_util.keystr(path)}" if path else ""
        if not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == np.bool_):
            raise ConfigError(f"{where}: features{name} must be numeric; got dtype {x.dtype}")
        found = nonfinite(x)
        if found:
            raise ConfigError(
                f"{where}: features{name} contain {found[0]} non-finite values "
                f"(NaN or inf), first at index {found[1]}"
            )


_PARAM_SHAPE = re.compile(
    r'parameter "(\w+)" in "([^"]*)", the given initializer is expected to generate shape '
    r"(\([^)]*\)), but the existing parameter it received has shape (\([^)]*\))"
)


@jitted
def _forward(state: Any, inputs: Any) -> Any:
    return apply_model(state, state.params, inputs, train=False, key=None)[0]


def model_outputs(state: Any, task: Task, data: Any, where: str) -> jax.ShapeDtypeStruct:
    """The shape of the model's outputs for the first example of ``data`` (not computed).

    Traced once per model, parameter shapes and input shape (`_signature` is the key): the
    optimizer is left out of the traced state, so a new state of the same model costs
    nothing here, and a repeated `fit` call only flattens the state to find its key.
    """
    out = input_outputs(state, task.inputs(data), where)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ConfigError(
            f"{where}: the {task.name} task needs the model to return one array; "
            f"it returns {jax.tree.structure(out)}"
        )
    return out


def input_outputs(state: Any, inputs: Any, where: str) -> Any:
    """The shapes of the model's outputs for the first example of ``inputs`` (the model's
    input pytree), traced once per model and input shape; a model that cannot take them
    is a `ConfigError` naming the per-example shapes."""
    first = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), inputs)
    model_only = state.replace(tx=None, opt_state=None, ema_params=None, ema_batch_stats=None)
    try:
        return _traced_outputs(_signature(model_only), _signature(first))
    except Exception as e:  # a shape mismatch deep inside the user's model
        raise _mismatch(where, e, jax.tree.map(lambda a: a.shape[1:], first)) from None


def _signature(tree: Any) -> tuple[Any, tuple[Any, ...]]:
    """A pytree's structure and its leaves' shapes and dtypes: hashable, the key of
    `_traced_outputs`."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (a.shape, a.dtype) if hasattr(a, "dtype") else (np.shape(a), np.result_type(a))
        for a in leaves
    )


@cached(maxsize=256)
def _traced_outputs(state: tuple, inputs: tuple) -> Any:
    def value(signature: tuple) -> Any:
        treedef, leaves = signature
        return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])

    return _forward.eval_shape(value(state), value(inputs))


def _mismatch(where: str, e: Exception, shapes: Any) -> ConfigError:
    """The error of a model that cannot take inputs of per-example ``shapes``."""
    mismatch = _PARAM_SHAPE.search(str(e))
    if mismatch:
        leaf, scope, needed, existing = mismatch.groups()
        return ConfigError(
            f"{where}: examples of shape {shapes} do not fit the model: its parameter "
            f"{scope.strip('/')}/{leaf} has shape {existing} (the inputs it was "
            f"initialised on), these inputs need {needed}"
        )
    return ConfigError(
        f"{where}: the model cannot take inputs of shape {shapes} per example: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    )


def check_data(state: Any, task: Task, data: Any, where: str) -> Any:
    """All of the above plus the task's own checks; returns the data as arrays (JAX arrays
    where they were, NumPy arrays for everything else)."""
    data = as_arrays(data, where)
    check_inputs(task, data, where)
    task.check(data, model_outputs(state, task, data, where), where)
    return data


def check_like(data: Any, reference: Any, where: str) -> None:
    """``data`` has the structure and per-example shapes of the training data."""
    shapes = jax.tree.map(lambda a: a.shape[1:], data)
    expected = jax.tree.map(lambda a: a.shape[1:], reference)
    if jax.tree.structure(data) != jax.tree.structure(reference) or shapes != expected:
        raise ConfigError(
            f"{where}: validation examples have shape {shapes}, training examples {expected}"
        )


def num_examples(batch: Any) -> int:
    """The common leading dimension of a batch pytree."""
    return jax.tree.leaves(batch)[0].shape[0]


def pad_batches(data: Any, batch_size: int) -> tuple[Any, jax.Array]:
    """Cut a data pytree (leading axis N) into ``ceil(N / batch_size)`` batches, zero-padding
    the last; also return the 0/1 weights that mark real examples. Leaves get shape
    ``(B, batch_size, ...)``, weights ``(B, batch_size)``. Host data are padded on the host
    (no small programs compiled); JAX arrays on their device, never copied to the host, by
    one compiled program (`_pad_on_device`: eager operations would cost a dispatch each,
    0.2 ms of host time per array and call)."""
    data = jax.tree.map(array_of, data)
    n = num_examples(data)
    bs = min(batch_size, n)
    nb = -(-n // bs)
    leaves, treedef = jax.tree.flatten(data)
    on_device = [a for a in leaves if isinstance(a, jax.Array)]
    if on_device:
        padded, w = _pad_on_device(on_device, nb, bs)
    else:
        padded, w = [], jnp.asarray(_pad(np.ones(n, np.float32), nb, bs, np))
    padded = iter(padded)
    cut = [next(padded) if isinstance(a, jax.Array) else _pad(a, nb, bs, np) for a in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in cut]), w


def _pad(a: Any, nb: int, bs: int, xp: Any) -> Any:
    """``a`` ``(N, ...)`` zero-padded to ``nb * bs`` examples, as ``(nb, bs, ...)``."""
    a = xp.concatenate([a, xp.zeros((nb * bs - a.shape[0], *a.shape[1:]), a.dtype)])
    return a.reshape(nb, bs, *a.shape[1:])


@jitted(static_argnums=(1, 2))
def _pad_on_device(arrays: list[jax.Array], nb: int, bs: int) -> tuple[list, jax.Array]:
    weights = _pad(jnp.ones(arrays[0].shape[0], jnp.float32), nb, bs, jnp)
    return [_pad(a, nb, bs, jnp) for a in arrays], weights


def check_options(task: Task, data: Any, augment: Any, mix: Any) -> None:
    """Refuse combinations of a task and a trick that cannot make sense."""
    if mix is not None and not isinstance(task, Classification | LossTask):
        raise ConfigError(
            f"mixup/cutmix mixes class labels; the {task.name} task has none", param="mix"
        )
    if augment is not None and isinstance(task, LanguageModel):
        raise ConfigError(
            "augment transforms signals and images (noise, shifts, crops, ...); the language "
            "model task's inputs are token ids, and its targets the next tokens, which would "
            "stay where they were",
            param="augment",
        )
    if augment is not None and not hasattr(task.inputs(data), "shape"):
        raise ConfigError(
            f"augment transforms one input array; the {task.name} task's model reads a "
            "structure of arrays",
            param="augment",
        )


def centered(task: Task, data: Any) -> Task:
    """A `Regression` ``task`` around the mean of ``data``'s targets (another task as it
    is), so that its ``r2`` sums keep their precision in float32
    (`jtricks.tasks.Regression.center`): every target of a batch pytree in memory, the
    first batch's of a stream or a list of batches (read once more: any center near the
    targets' mean keeps the precision; uncentered, targets of 3000 +- 1 gave an ``r2`` of
    millions). Not centered: a one-shot iterator (its first batch would be lost), or a
    task of several processes (each holds its own rows: its programs would differ)."""
    if not isinstance(task, Regression) or task.center is not None or jax.process_count() > 1:
        return task
    if is_stream(data):
        data = _first_batch(data)
        if data is None:
            return task
    return task.centered(host_targets(task.targets(data)))


def _first_batch(stream: Any) -> Any:
    """The first batch of a re-iterable ``stream``, or ``None``: for a one-shot iterator
    (reading it would lose the batch), an empty stream, or one that fails (its reader
    reports that in its own words, `jtricks.training.streaming.evaluate_stream`)."""
    if isinstance(stream, Iterator):
        return None
    try:
        return next(iter(stream), None)
    except Exception:
        return None


_HOST_TARGETS = PerArray()
"""Host copies of device labels and regression targets (see `host_targets`)."""


def host_targets(targets: Any) -> np.ndarray:
    """``targets`` as a NumPy array; a JAX array's copy is read back once per array (it
    cannot change), so the class weights, the class-balanced sampler and a regression's
    center, which read the training targets at every `fit` call, copy device-resident
    ones to the host once (the copy is kept while the array lives)."""
    if isinstance(targets, jax.Array):
        return _HOST_TARGETS(targets, _to_host)
    return np.asarray(targets)


def _to_host(a: jax.Array) -> np.ndarray:
    return np.asarray(a)
