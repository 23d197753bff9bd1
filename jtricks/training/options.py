"""`FitOptions`: how `fit` trains, as one frozen, typed object.

Every training option of a run lives here, once, with its documentation on its field:
`fit`'s keyword arguments build one (``fit(state, data, batch_size=100, epochs=5)`` is
``fit(state, data, FitOptions(batch_size=100), epochs=5)``), the command line maps its
config to one in a single place (`jtricks.run.options.fit_options`), and the part that
the compiled programs depend on is derived from it (`FitOptions.step_options`, the key of
the program caches). What varies from call to call (how long, which data, the data key,
callbacks, the stop flag, where a stream or a stopped epoch resumes) stays an argument of
`fit`.

New here: optax and Flax have no such object; it plays the part of the ``config`` of the
Flax examples' ``train_and_evaluate``, but typed and checked when it is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jtricks.caches import cached
from jtricks.data.augment import build_augment
from jtricks.data.batching import SAMPLERS
from jtricks.errors import ConfigError, check_int, did_you_mean
from jtricks.tasks import Classification, Task, as_task
from jtricks.training.state import check_eval_source
from jtricks.training.steps import PRECISIONS, LossFn, compute_dtype

_CLASSIFICATION = Classification()


@dataclasses.dataclass(frozen=True)
class StepLog:
    """Per-step records kept on the device: every step whose number (the step count after
    it, 1-based, as in the epoch records) is a multiple of ``every`` is recorded with all
    its step metrics (loss, learning rate, gradient, update and parameter norms, the
    task's metrics) and its ``nonfinite`` flag. ``private`` names metrics that the step
    computes only for these records (left out of the epoch means)."""

    every: int
    private: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a run's compiled programs depend on (besides model, optimizer and shapes).

    Fields: the ``task``; ``norms`` / ``update_norm`` (the step's logged norms, see
    `make_train_step`); ``augment`` (per-example augmentation) and ``mix`` (``(kind,
    alpha)`` of mixup / cutmix, with the model's ``num_classes``); ``accumulate``
    (micro-batches per update); ``precision`` (``"float32"`` or ``"bf16"``);
    ``eval_source`` (which parameters validation evaluates); ``sharding`` (the batches'
    data-parallel `jax.sharding.NamedSharding`, or ``None``); ``unroll`` (steps per
    iteration of the compiled loop, `lax.scan`'s ``unroll``); ``log_every`` (keep the
    records of every ``log_every``-th step, `StepLog`, or
    ``None``).
    """

    task: Task = _CLASSIFICATION
    norms: bool = True
    update_norm: bool = False
    augment: Any = None
    mix: tuple[str, float] | None = None
    accumulate: int = 1
    precision: str = "float32"
    num_classes: int | None = None
    eval_source: str = "auto"
    sharding: Any = None
    unroll: int = 1
    log_every: int | None = None

    def __post_init__(self) -> None:
        check_int("accumulate", self.accumulate, low=1)
        check_int("unroll", self.unroll, low=1)
        if self.log_every is not None:
            check_int("log_every_steps", self.log_every, low=1)

    @property
    def step_log(self) -> StepLog | None:
        """What the compiled loops record per step: every ``log_every``-th step's metrics,
        the update and parameter norms among them (kept out of the epoch means unless
        ``update_norm`` asked for them there)."""
        if self.log_every is None:
            return None
        private = () if self.update_norm else ("update_norm", "param_norm")
        return StepLog(self.log_every, private)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How `fit` trains; every field is checked when the object is made."""

    batch_size: int | None = None
    """Examples per step, ``1 <= batch_size <= N`` (in-memory data; a stream's batches are
    its own, and a given ``batch_size`` must match them)."""
    task: Task | str | None = None
    """A `jtricks.tasks.Task` or its spec (default classification); resolved to a `Task`."""
    loss_fn: LossFn | None = None
    """A per-example loss ``(outputs, targets) -> (N,)`` instead of ``task``
    (`jtricks.tasks.as_task`); it becomes ``task``, and this field ``None``."""
    class_weight: Any = None
    """Per-class weights of the training loss (classification): ``"balanced"`` (``n /
    (C n_c)`` from in-memory training labels), ``{class: weight}`` (the others 1) or one
    weight per class (`jtricks.data.imbalance.class_weights`); `fit` folds them into
    ``task`` (`Classification.class_weight`) and sets this field back to ``None``."""
    sampler: str | None = None
    """``"balanced"``: each step's batch is drawn with replacement, every class equally
    likely (`jtricks.data.batching.class_balanced`), on the device from the epoch's key,
    so a resumed run draws the same batches; an epoch is still ``N // batch_size`` steps.
    ``None``: shuffled epochs, each example once. In-memory data only."""
    eval_batch_size: int = 1000
    """Batch size for evaluation (results do not depend on it)."""
    norms: bool = True
    """Log the epoch mean of the gradient norm (``train_grad_norm``); the parameter norm at
    each epoch's end is always logged (``train_param_norm``)."""
    update_norm: bool = False
    """Also log the epoch means of the per-step update and parameter norms (they keep XLA
    from fusing the update into the parameter write: a few percent of a small model's step)."""
    max_nonfinite: int = 20
    """A step whose loss or gradient is NaN/inf, or whose update would overflow the
    parameters, is skipped (the state kept) and counted in ``train_nonfinite``; after this
    many consecutive such steps training stops inside the compiled program, and `fit`
    returns the last state that evaluated finite (``history.kept_step``, see
    ``keep_finite``), with ``history.diverged`` set."""
    keep_finite: bool = True
    """Keep on device a copy of the newest state that evaluated finite (the initial one,
    then every epoch end with finite validation loss, training loss and parameter norm and
    a loss at most 10x ``initial_loss``) to return after divergence; ``False`` saves that
    memory and returns the state where training stopped."""
    augment: Any = None
    """Per-example augmentation ``(key, x) -> x`` of training inputs (`jtricks.data.augment`),
    or its spec as the CLI takes it, ``"shift(3) | noise(0.05)"`` (one pipeline per spec, so
    repeated calls compile once)."""
    mix: tuple[str, float] | None = None
    """``("mixup" | "cutmix", alpha)``: mix training batches and their labels."""
    accumulate: int = 1
    """Micro-batches of ``batch_size`` per optimizer update (gradient accumulation); an
    update equals one step on the ``batch_size * accumulate`` batch, and ``steps`` /
    ``epochs`` count updates. A stream's batch is one update, cut into ``accumulate``.
    Exact for models without BatchNorm (dropout masks differ, equal in distribution); with
    BatchNorm each micro-batch is normalised by its own statistics and updates the running
    averages in turn, as PyTorch's accumulation does."""
    precision: str = "float32"
    """``"float32"`` or ``"bf16"`` (compute in bfloat16; float32 master parameters and
    optimizer state; see `jtricks.training.steps.make_train_step`)."""
    mesh: Any = "auto"
    """``"auto"``: data-parallel over every visible device when there are several; a
    `jax.sharding.Mesh` with ``"data"`` and/or ``"fsdp"`` axes, or its spec
    (``"data=4,fsdp=2"``): batches split over both, parameters, optimizer state and
    BatchNorm statistics sharded along ``fsdp``; ``None``: one device. With several
    processes the training data is this process's shard and the batch is global."""
    eval_params: str = "auto"
    """Which parameters validation uses (``"auto"``, ``"train"``, ``"ema"``;
    `TrainState.evaluation_state`): by default the optimizer's evaluation parameters where
    it declares them (schedule-free), else the training ones."""
    steps_per_epoch: int | None = None
    """A stream's epoch length in batches (default ``len(train_data)``)."""
    chunk: int | None = None
    """Steps per compiled program: a stream's chunk (default
    `jtricks.training.streaming.default_chunk`); an in-memory epoch longer than this
    (default 1000) runs in parts of equal static length, the progress bar and step records
    advancing after each while the next runs. Results do not depend on it."""
    prefetch: int = 2
    """Chunks a stream reads and transfers ahead of use."""
    unroll: int = 1
    """Training steps per iteration of the compiled loop (`lax.scan`'s ``unroll``)."""
    log_every_steps: int | None = None
    """Keep a record of every N-th step (``loss``, ``lr``, ``grad_norm``, ``update_norm``,
    ``param_norm``, ``skipped``, the task's metrics), numbered from 1 across calls, as
    outputs of the compiled loop: ``history.steps`` and callbacks' ``on_steps``."""
    profile: Any = None
    """A `jtricks.training.profile.Profile`: trace its steps with `jax.profiler`, each step
    one annotated dispatch (a stream's: each chunk)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the checked values replace the given ones
        set_(self, "task", as_task(self.task, self.loss_fn))
        set_(self, "loss_fn", None)  # the task holds it now
        for name in ("eval_batch_size", "max_nonfinite", "accumulate", "prefetch", "unroll"):
            set_(self, name, check_int(name, getattr(self, name), low=1))
        for name in ("batch_size", "steps_per_epoch", "chunk", "log_every_steps"):
            if getattr(self, name) is not None:
                set_(self, name, check_int(name, getattr(self, name), low=1))
        if self.precision not in PRECISIONS:
            compute_dtype(self.precision)  # the step's own check, with its message
        check_eval_source(self.eval_params)
        if isinstance(self.augment, str):
            set_(self, "augment", _augment_of(self.augment))
        elif self.augment is not None and not callable(self.augment):
            raise ConfigError(
                "augment must be a function (key, x) -> x or a spec such as "
                f"'shift(3) | noise(0.05)'; got {self.augment!r}",
                param="augment",
            )
        if self.mix is not None:
            set_(self, "mix", _mix(self.mix))
        if self.sampler not in (None, *SAMPLERS):
            raise ConfigError(
                f"sampler must be None or one of {', '.join(SAMPLERS)}; got {self.sampler!r}",
                param="sampler",
            )

    @classmethod
    def build(cls, options: FitOptions | None, overrides: Mapping[str, Any]) -> FitOptions:
        """``options`` (default: all defaults) with ``overrides`` (`fit`'s keyword
        arguments) replacing fields; an unknown name is a `ConfigError` naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        for name in overrides:
            if name not in names:
                hint = PROGRESS_HINT if name in ("progress", "verbose") else ""
                raise ConfigError(
                    f"fit() has no option {name!r}{hint or did_you_mean(name, names)}; its "
                    f"options are FitOptions' fields: {', '.join(names)}",
                    param=name,
                )
        if options is None:
            return cls(**overrides)
        if "loss_fn" in overrides and "task" not in overrides:
            overrides = {**overrides, "task": None}  # a new loss replaces the resolved task
        if not isinstance(options, cls):
            raise ConfigError(
                f"options must be a FitOptions; got {type(options).__name__}", param="options"
            )
        return dataclasses.replace(options, **overrides) if overrides else options

    def step_options(self) -> StepOptions:
        """The part the compiled programs depend on: the key of their caches."""
        return StepOptions(
            task=self.task,
            norms=self.norms,
            update_norm=self.update_norm,
            augment=self.augment,
            mix=self.mix,
            accumulate=self.accumulate,
            precision=self.precision,
            eval_source=self.eval_params,
            unroll=self.unroll,
            log_every=self.log_every_steps,
        )


_augment_of = cached(build_augment)
"""One pipeline per spec string: the same object, so the same compiled programs."""


PROGRESS_HINT = (
    "; fit draws progress through a reporter: "
    "fit(..., reporter=jtricks.training.progress.RichReporter())"
)


def _mix(mix: Any) -> tuple[str, float]:
    """``mix`` as ``(kind, alpha)``, checked."""
    if not isinstance(mix, tuple | list) or len(mix) != 2 or mix[0] not in ("mixup", "cutmix"):
        raise ConfigError(f"mix must be ('mixup' | 'cutmix', alpha); got {mix!r}", param="mix")
    return (mix[0], float(mix[1]))
