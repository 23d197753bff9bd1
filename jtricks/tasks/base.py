"""The task protocol: which part of a batch the model reads, what it is scored against.

A batch is any pytree of arrays with a common leading dimension N: the ``(x, y)``
tuple, ``(x, y, mask)``, or a dict such as ``{"image", "label", "mask"}``. A `Task`
says where the model's input and the targets sit in it and defines three pure
functions of the model's outputs and the batch, all traced inside the compiled step:

* ``loss(outputs, batch) -> (N,)``: the per-example loss ``l_i``, which evaluation
  reports; ``train_loss(outputs, batch)`` is what training minimises (by default the
  same; classification's class weights, focal loss and logit adjustment change only it);
* ``loss_weight(batch) -> (N,) | None``: its weight ``w_i`` (``None``: all 1). The
  training objective is ``sum_i w_i l_i / sum_i w_i``; a language model weighs an
  example by its number of real tokens, so the objective is the mean token loss;
* ``stats(outputs, batch) -> {name: (N, ...)}``: per-example sufficient statistics,
  summed over the evaluated split (padding rows weigh 0), and
  ``finalize(sums) -> {metric: scalar}``, which turns the sums into metrics. Ratio
  metrics (IoU, Dice, R², perplexity) are therefore ratios of sums over the whole split,
  never means of per-batch ratios, and do not depend on the evaluation batch size.

``check(batch, outputs, where)`` validates host data before any training (a
`ConfigError` naming the task and the field). New here: optax has the losses, Flax
and CLU have metric containers for a fixed loop; neither ties a loss, exact split
metrics and input checks to any batch layout the way `fit` needs.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.caches import jitted, register
from jtricks.errors import ConfigError

Batch = Any
Stats = dict[str, jax.Array]

WHOLE_BATCH = "*"
"""``input_key`` value that passes the whole batch to the model (a model that reads a dict)."""

_INPUT_NAMES = ("x", "inputs", "input", "image", "images", "tokens", "features")
_TARGET_NAMES = ("y", "targets", "target", "label", "labels")


def _lookup(batch: Batch, key: str | int | None, names: tuple[str, ...], field: str, task: str):
    if isinstance(batch, Mapping):
        if key is None:
            found = [n for n in names if n in batch]
            if len(found) != 1:
                raise ConfigError(
                    f"{task} task: cannot tell which entry of the batch is the {field}: the "
                    f"batch has keys {sorted(batch)}; pass {field[:-1] if field.endswith('s') else field}"
                    f"_key=... to the task (looked for one of {', '.join(names)})",
                    param=f"{'input' if field == 'inputs' else 'target'}_key",
                )
            key = found[0]
        if key not in batch:
            raise ConfigError(
                f"{task} task: the batch has no entry {key!r} for the {field}; "
                f"it has {sorted(batch)}",
                param=f"{'input' if field == 'inputs' else 'target'}_key",
            )
        return key
    if isinstance(batch, tuple | list):
        index = (0 if field == "inputs" else 1) if key is None else key
        if not isinstance(index, int) or not -len(batch) <= index < len(batch):
            raise ConfigError(
                f"{task} task: the batch is a sequence of {len(batch)} arrays; "
                f"{field} index {index!r} is out of range",
                param=f"{'input' if field == 'inputs' else 'target'}_key",
            )
        return index
    raise ConfigError(
        f"{task} task: a batch must be a tuple/list or a dict of arrays; got {type(batch).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class of tasks (frozen, hashable: compiled steps are cached per task).

    Attributes:
      input_key: the batch entry the model reads: an index into a tuple batch (default
        0), a dict key (default: the one of ``x``, ``inputs``, ``image``, ``tokens``, ...
        that is present), or ``"*"`` (`WHOLE_BATCH`) for the whole batch.
      target_key: the targets' entry (default index 1, or the one of ``y``, ``targets``,
        ``label``, ``labels``, ... present).
      mask_key: the entry of a 0/1 mask over target positions where a task takes one
        (dict key, default ``"mask"``, or index, default 2 for a 3-tuple).
    """

    input_key: str | int | None = None
    target_key: str | int | None = None
    mask_key: str | int | None = None

    name: ClassVar[str] = "custom"
    train_metrics: ClassVar[tuple[str, ...]] = ()
    """Metrics also computed on every training batch (epoch means land in ``train_*``)."""
    monitor: ClassVar[tuple[str, str]] = ("loss", "min")
    """The validation metric and direction a best checkpoint follows by default."""
    dense_targets: ClassVar[bool] = False
    """Targets sit on the input's positions: geometric augmentation moves them (and a mask)
    with the input (`jtricks.data.augment.augment_jointly`)."""

    def using(self, hparams: dict[str, Any] | None) -> Task:
        """This task with the fields named in ``hparams`` set to their (maybe traced)
        values: a state's own hyper-parameters (`jtricks.training.TrainState.hparams`)."""
        return dataclasses.replace(self, **hparams) if hparams else self

    # -- where things sit in a batch -------------------------------------------------
    def inputs(self, batch: Batch) -> Any:
        if self.input_key == WHOLE_BATCH:
            return batch
        return batch[_lookup(batch, self.input_key, _INPUT_NAMES, "inputs", self.name)]

    def targets(self, batch: Batch) -> jax.Array:
        targets = batch[_lookup(batch, self.target_key, _TARGET_NAMES, "targets", self.name)]
        if isinstance(targets, Mapping) and isinstance(batch, tuple | list):
            raise ConfigError(
                f"{self.name} task: the batch's targets (batch[1]) are a dict with keys "
                f"{sorted(targets)}; give the batch flat: a dict such as "
                "{'x': x, 'label': y, 'mask': m} or a tuple (x, y, mask) (a mask of "
                "per-position targets' shape)",
                param="target_key",
            )
        return targets

    def mask(self, batch: Batch) -> jax.Array | None:
        """The target mask, or ``None`` when the batch carries none."""
        if isinstance(batch, Mapping):
            key = "mask" if self.mask_key is None else self.mask_key
            return batch.get(key)
        if isinstance(batch, tuple | list):
            index = 2 if self.mask_key is None else self.mask_key
            return batch[index] if isinstance(index, int) and index < len(batch) else None
        return None

    def with_inputs(self, batch: Batch, x: Any) -> Batch:
        """``batch`` with the model's input replaced by ``x`` (after augmentation)."""
        if self.input_key == WHOLE_BATCH:
            return x
        key = _lookup(batch, self.input_key, _INPUT_NAMES, "inputs", self.name)
        if isinstance(batch, Mapping):
            return {**batch, key: x}
        return type(batch)(x if i == key % len(batch) else a for i, a in enumerate(batch))

    def with_targets(self, batch: Batch, y: Any) -> Batch:
        """``batch`` with the targets replaced by ``y`` (e.g. mixed soft labels)."""
        key = _lookup(batch, self.target_key, _TARGET_NAMES, "targets", self.name)
        if isinstance(batch, Mapping):
            return {**batch, key: y}
        return type(batch)(y if i == key % len(batch) else a for i, a in enumerate(batch))

    def with_mask(self, batch: Batch, mask: Any) -> Batch:
        """``batch`` with its target mask set (added when it had none)."""
        if isinstance(batch, Mapping):
            return {**batch, ("mask" if self.mask_key is None else self.mask_key): mask}
        index = 2 if self.mask_key is None else self.mask_key
        items = list(batch)
        if index == len(items):
            items.append(mask)
        else:
            items[index] = mask
        return type(batch)(items)

    # -- what a subclass defines --------------------------------------------------------
    def loss(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        raise NotImplementedError

    def train_loss(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        """The per-example objective training minimises; evaluation reports `loss`."""
        return self.loss(outputs, batch)

    def loss_weight(self, batch: Batch) -> jax.Array | None:
        return None

    def stats(self, outputs: jax.Array, batch: Batch) -> Stats:
        return {}

    def finalize(self, sums: Stats) -> dict[str, jax.Array]:
        return {}

    def train_stats(self, outputs: jax.Array, batch: Batch) -> Stats:
        """The statistics the training metrics (`train_metrics`) need: by default all of
        `stats`; a task whose evaluation sums more (per-class counts) returns fewer."""
        return self.stats(outputs, batch)

    def values(self, outputs: Any) -> Any:
        """The model's ``outputs`` as predictions in the targets' units: the outputs
        themselves here (a regression learning standardized targets maps them back)."""
        return outputs

    def combine(self, outputs: jax.Array) -> jax.Array:
        """One prediction from an ensemble's stacked outputs ``(M, N, ...)``, scored like a
        single model's: here their mean (softmax and sigmoid tasks average probabilities)."""
        return jnp.mean(outputs, axis=0)

    def check(self, batch: Batch, outputs: jax.ShapeDtypeStruct, where: str) -> None:
        """Validate host arrays (NumPy) against the model's output shape for one example."""

    # -- shared helpers ---------------------------------------------------------------
    def error(self, where: str, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.name} task, {where}, {field}: {message}", param="task")

    def field_name(self, batch: Batch, which: str) -> str:
        """How the targets (``which="targets"``) or mask are called in this batch, for messages."""
        if which == "mask":
            key = self.mask_key if self.mask_key is not None else "mask"
            return (
                repr(key) if isinstance(batch, Mapping) else f"batch[{2 if key == 'mask' else key}]"
            )
        key = _lookup(batch, self.target_key, _TARGET_NAMES, "targets", self.name)
        return f"targets ({key!r})" if isinstance(batch, Mapping) else f"targets (batch[{key}])"

    def check_mask(self, batch: Batch, shape: tuple[int, ...], where: str) -> None:
        mask = self.mask(batch)
        if mask is None:
            return
        mask = array_of(mask)
        if mask.shape != shape:
            raise self.error(
                where,
                self.field_name(batch, "mask"),
                f"a mask must have the targets' shape {shape}; got shape {mask.shape}",
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise self.error(where, self.field_name(batch, "mask"), "mask values must be 0 or 1")


def array_of(values: Any) -> Any:
    """``values`` as an array to check: a JAX array stays on its device (the checks reduce
    it there and only scalars reach the host: no copy of device-resident data per call);
    anything else becomes a NumPy array."""
    return values if isinstance(values, jax.Array) else np.asarray(values)


def at_least_f32(a: jax.Array) -> jax.Array:
    """``a`` in float32, or kept in float64 (a loss in float64 under `jax.enable_x64`,
    as `jtricks.diagnostics.check_gradients` computes it)."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


class PerArray:
    """Facts about JAX arrays computed once per array: a JAX array is immutable, so data
    passed to `fit` call after call are reduced on the device and read back once, not at
    every call (`functools` caches need hashable keys, which a JAX array is not). Entries
    are keyed by ``id`` and go with their array (a weak reference) or `clear_caches`."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}
        register(self._entries.clear)

    def __call__(self, array: jax.Array, compute: Callable[[jax.Array], Any]) -> Any:
        """``compute(array)``, or what it returned for this very array before."""
        key = id(array)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is array:
            return entry[1]
        value = compute(array)
        self._entries[key] = (weakref.ref(array, functools.partial(self._forget, key)), value)
        return value

    def _forget(self, key: int, ref: weakref.ref) -> None:
        if self._entries.get(key, (None,))[0] is ref:
            del self._entries[key]


_SCANNED = PerArray()
"""What `nonfinite` found in each JAX array."""

_RANGES = PerArray()
"""The ``(min, max)`` of each JAX array of labels `check_integer_labels` read."""


def nonfinite(values: Any) -> tuple[int, tuple[int, ...]] | None:
    """``(count, index of the first)`` of the NaN and inf entries of a float array (NumPy,
    or JAX reduced on its device: only the two numbers reach the host, once per array);
    ``None`` when there are none or the array is not floating."""
    if not jnp.issubdtype(values.dtype, jnp.floating):
        return None
    if isinstance(values, jax.Array):
        return _SCANNED(values, _nonfinite)
    return _nonfinite(values)


def _nonfinite(values: Any) -> tuple[int, tuple[int, ...]] | None:
    bad = ~(jnp if isinstance(values, jax.Array) else np).isfinite(values)
    count = int(bad.sum())
    if not count:
        return None
    flat = int(bad.reshape(-1).argmax())
    return count, tuple(int(i) for i in np.unravel_index(flat, values.shape))


def check_finite(task: Task, where: str, field: str, values: Any) -> None:
    """`ConfigError` naming the task and field when a float array (NumPy, or JAX on its
    device) holds NaN or inf."""
    found = nonfinite(values)
    if found:
        raise task.error(
            where, field, f"{found[0]} non-finite values (NaN or inf), first at index {found[1]}"
        )


def position_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Per-example values ``(N,)`` from per-position ones ``(N, *S)``: the mean over the
    positions where ``mask`` is 1 (all without one; 0 where none is valid). ``(N,)``
    values pass as they are.

    Raises:
      ValueError: a mask whose shape is not the values'."""
    if values.ndim == 1:
        return values
    if mask is None:
        return jnp.mean(values.reshape(values.shape[0], -1), axis=1)
    if mask.shape != values.shape:
        raise ValueError(
            f"a mask must have the per-position targets' shape {values.shape}; got {mask.shape}"
        )
    m = mask.astype(values.dtype)
    axes = tuple(range(1, values.ndim))
    return jnp.sum(values * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)


def check_integer_labels(
    task: Task, where: str, field: str, labels: Any, num_classes: int, outputs_what: str
) -> None:
    """Labels must be integers in ``[0, num_classes)``; the message says where the count came from."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise task.error(
            where,
            field,
            f"class labels must be integers; got dtype {labels.dtype} "
            "(for real-valued targets use the regression task, e.g. loss_fn=mse)",
        )
    if isinstance(labels, jax.Array):  # one program, read back once per array
        lo, hi = _RANGES(labels, lambda a: tuple(int(v) for v in jax.device_get(_min_max(a))))
    else:
        lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise task.error(
            where,
            field,
            f"labels must lie in [0, {num_classes - 1}] because {outputs_what} "
            f"{num_classes} outputs; got values in [{lo}, {hi}]",
        )


@jitted
def _min_max(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return labels.min(), labels.max()


@dataclasses.dataclass(frozen=True)
class LossTask(Task):
    """A task from a plain loss function ``fn(outputs, targets)``.

    ``fn`` returns the per-example loss ``(N,)``, or ``(loss, extras)`` where ``extras``
    is a dict of per-example values ``(N,)`` whose means become metrics (reported as
    ``train_<name>`` and ``val_<name>``). With integer class labels ``(N,)`` and outputs
    ``(N, C)``, ``accuracy`` is reported as well, as for the classification task.

    Example:
      >>> def loss(out, y):
      ...     err = (out[:, 0] - y) ** 2
      ...     return err, {"abs_err": jnp.sqrt(err)}
      >>> fit(state, (x, y), loss_fn=loss, batch_size=32, epochs=5)
    """

    fn: Callable[..., Any] = None  # type: ignore[assignment]

    name: ClassVar[str] = "custom loss"
    train_metrics: ClassVar[tuple[str, ...]] = ("*",)

    def _split(self, outputs, batch):
        out = self.fn(outputs, self.targets(batch))
        return out if isinstance(out, tuple) else (out, {})

    def loss(self, outputs, batch):
        return self._split(outputs, batch)[0]

    def stats(self, outputs, batch):
        extras = dict(self._split(outputs, batch)[1])
        y = self.targets(batch)
        if _is_class_labels(outputs, y):
            extras["accuracy"] = (jnp.argmax(outputs, axis=-1) == y).astype(jnp.float32)
        return extras

    def finalize(self, sums):
        return {k: v / sums["count"] for k, v in sums.items() if k not in _FRAMEWORK_SUMS}

    def check(self, batch, outputs, where):
        """The loss (and each extra) must give one value per example: traced (not run) on
        the first two examples, a batch mean (shape ``()``) is refused, since jtricks
        averages the per-example values itself and evaluation weighs out padded rows."""
        n = min(2, len(jax.tree.leaves(batch)[0]))
        rows = jax.tree.map(lambda a: a[:n], batch)
        out = jax.ShapeDtypeStruct((n, *outputs.shape[1:]), outputs.dtype)
        try:
            loss, extras = jax.eval_shape(self._split, out, rows)
        except Exception as e:  # the user's function cannot take these outputs and targets
            first = str(e).splitlines()[0] if str(e) else ""
            raise self.error(
                where,
                "loss_fn",
                f"fails on model outputs of shape {out.shape} and their targets: "
                f"{type(e).__name__}: {first}",
            ) from None
        named = {f"the extra {k!r}": v for k, v in extras.items()}
        for name, value in {"the loss": loss, **named}.items():
            shape = getattr(value, "shape", None)
            if shape != (n,):
                raise self.error(
                    where,
                    "loss_fn",
                    f"{name} must be one value per example, shape (N,) = ({n},) for {n} "
                    f"examples; got shape {shape}. Return the per-example values, not "
                    "their mean: jtricks averages them (and leaves out the padding of "
                    "evaluation batches)",
                )


def mean_softmax_logits(outputs: jax.Array) -> jax.Array:
    """``log((1/M) sum_m softmax(z_m))``: logits of the members' mean distribution, in log space."""
    logp = jax.nn.log_softmax(outputs, axis=-1)
    return jax.nn.logsumexp(logp, axis=0) - jnp.log(outputs.shape[0])


def _is_class_labels(outputs: Any, y: Any) -> bool:
    return (
        jnp.issubdtype(y.dtype, jnp.integer)
        and y.ndim == 1
        and getattr(outputs, "ndim", 0) == 2
        and outputs.shape[0] == y.shape[0]
    )


_FRAMEWORK_SUMS = ("count", "loss_sum", "loss_weight")
"""Sums every evaluation keeps besides a task's own: examples, weighted loss, loss weight."""


def batch_sums(
    task: Task, outputs: jax.Array, batch: Batch, weight: jax.Array, training: bool = False
) -> Stats:
    """Sums over one batch of the task's statistics (``training``: those of
    `Task.train_stats`) and the weighted loss; ``weight`` is 1 for real rows and 0 for
    padding (`jtricks.training.steps.pad_batches`)."""
    loss = per_example(task, task.loss(outputs, batch), weight.shape[0])
    lw = task.loss_weight(batch)
    lw = weight if lw is None else weight * lw
    sums = {
        "count": jnp.sum(weight),
        "loss_sum": jnp.sum(lw * loss),
        "loss_weight": jnp.sum(lw),
    }
    stats = task.train_stats(outputs, batch) if training else task.stats(outputs, batch)
    for name, value in stats.items():
        w = weight.reshape(weight.shape + (1,) * (value.ndim - 1))
        sums[name] = jnp.sum(w * value.astype(jnp.float32), axis=0)
    return sums


def per_example(task: Task, loss: jax.Array, n: int) -> jax.Array:
    """``loss`` if it holds one value per example, ``(n,)``; otherwise a one-line error
    naming its shape (never JAX's broadcasting error later)."""
    if tuple(loss.shape) != (n,):
        raise ValueError(
            f"the {task.name} task's loss gives shape {tuple(loss.shape)} for a batch of {n}; "
            f"it must give ({n},), one value per example (average positions inside the loss)"
        )
    return loss


def finalize(task: Task, sums: Stats) -> dict[str, jax.Array]:
    """``loss`` (the weighted mean) and the task's metrics from summed statistics."""
    return {"loss": sums["loss_sum"] / sums["loss_weight"], **task.finalize(sums)}


def train_metrics(task: Task, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """The task's per-batch training metrics (those named in ``task.train_metrics``)."""
    names = task.train_metrics
    if not names:
        return {}
    ones = jnp.ones(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
    metrics = task.finalize(batch_sums(task, outputs, batch, ones, training=True))
    return metrics if names == ("*",) else {k: metrics[k] for k in names}
