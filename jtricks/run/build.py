"""A run's build phase: task, model, optimizer, augmentation and callbacks from its config.

Everything here is checked against the data before any file is written: a bad schedule,
an augmentation that does not fit the examples, SWA after the last epoch are all
`ConfigError`s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtricks.data.augment import build_augment
from jtricks.data.imbalance import class_weights, logit_adjustment
from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.optim import build_optimizer, build_schedule, fused
from jtricks.optim.schedules import Plateau
from jtricks.run.config import TrainConfig
from jtricks.run.data import RunData
from jtricks.run.settings import parse_class_weight, parse_loss, parse_steps
from jtricks.tasks import Classification, MultiLabel, Regression, Task, build_task
from jtricks.training import EarlyStopping, ReduceLROnPlateau, TrainState, create_train_state
from jtricks.training.averaging import SWA
from jtricks.training.ensemble import create_ensemble
from jtricks.training.runs import MAX_STEP
from jtricks.training.transfer import (
    describe_loaded,
    forward_layers,
    freeze,
    freeze_batch_stats,
    layer_names,
    load_pretrained,
    preset_patterns,
)


@dataclass
class Build:
    """What `build` makes: the run's parts, its length and its keys."""

    task: Task
    model: Any
    tx: Any
    total_steps: int
    streaming: bool
    key: jax.Array
    init_key: jax.Array
    data_key: jax.Array
    augment: Any = None
    tta_augment: Any = None
    mix: tuple[str, float] | None = None
    plateau: ReduceLROnPlateau | None = None
    early: EarlyStopping | None = None
    swa: SWA | None = None
    callbacks: list[Any] = field(default_factory=list)
    reporter: Any = None
    trainable: list[str] | None = None
    """With ``finetune``: the patterns of the layers that train (the others are frozen,
    their BatchNorm statistics too)."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch (`run_length`)."""
    members: Any = None
    """What `create_ensemble` takes for stacked members: the model, or for an NNX model
    (built initialised) a factory that builds it again from each member's key."""

    @property
    def tta_key(self) -> jax.Array:
        """The key of the test-time augmentation's views (``--tta``), from the seed."""
        return jax.random.fold_in(self.key, 3)

    def callback_states(self) -> dict[str, Any]:
        """The stateful callbacks' states, saved with each checkpoint."""
        states = {}
        if self.plateau is not None:
            states["plateau"] = self.plateau.state_dict()
        if self.early is not None:
            states["early_stopping"] = self.early.state_dict()
        if self.swa is not None:
            states["swa"] = self.swa.state_dict()
        return states

    def callback_arrays(self) -> dict[str, Any]:
        """The stateful callbacks' arrays (SWA's average), saved beside each checkpoint."""
        return {} if self.swa is None else self.swa.arrays()


def build(
    config: TrainConfig, data: RunData, reporter: Any, progress: bool, *, rebuild: bool = False
) -> Build:
    """The run's task, model, optimizer (with its schedule), augmentation and callbacks.
    ``rebuild``: a run started before (`load_run`, ``--resume``), whose settings that
    would act past its end are not refused again (`within_run`): a folder written before
    such a refusal existed still loads and resumes."""
    task = imbalance_options(config, task_for(config, data.task_spec), data)
    if isinstance(task, Regression) and data.train is not None:  # r2's sums around the mean
        task = task.centered(data.train[1] if data.labels is None else data.labels)
    if data.target_scale is not None:  # a regression learning standardized targets
        mean, std = data.target_scale
        task = dataclasses.replace(task, scale=(tuple(mean), tuple(std)))
    model = build_model(config.model, data.num_classes, seed=config.seed)
    steps_per_epoch, total_steps = run_length(config, data.n_train, rebuild)
    tx, plateau = optimizer(config, steps_per_epoch, total_steps, rebuild)
    key = jax.random.key(config.seed)
    init_key, data_key = jax.random.split(key)
    b = Build(
        task,
        model,
        tx,
        total_steps,
        data.streamed(config),
        key,
        init_key,
        data_key,
        mix=mixing(config, data.example),
        reporter=reporter,
        steps_per_epoch=steps_per_epoch,
    )
    b.augment, b.tta_augment = augmentations(config, data.example)
    b.members = model
    if isinstance(model, nnx.Module):  # member i from its own key, as a Linen member
        b.members = lambda k: build_model(config.model, data.num_classes, seed=k)
    add_callbacks(b, config, data, plateau)
    if reporter is None and progress:
        from jtricks.training.progress import RichReporter

        b.reporter = RichReporter()
    if config.pretrained is not None and config.finetune not in (None, "all"):
        probe = create_train_state(model, b.tx, data.example, init_key)
        b.trainable = preset_patterns(config.finetune, forward_layers(probe, data.example))
        b.tx = freeze(b.tx, trainable=b.trainable)
    return b


def task_for(config: TrainConfig, task_spec: str) -> Task:
    """The run's task (``config.task`` or the dataset's own, ``task_spec``); refuses what
    it cannot do."""
    task = build_task(task_spec)
    classify = isinstance(task, Classification)
    if config.label_smoothing:
        if not classify:
            raise _not_for(task, "label_smoothing", config.label_smoothing)
        task = dataclasses.replace(task, label_smoothing=float(config.label_smoothing))
    if config.tta > 1 and (task.dense_targets or task.name == "language model"):
        raise ConfigError(
            f"tta={config.tta} averages whole-example predictions (classification, multi-label, "
            f"regression); this run's task is {task.name!r}",
            param="tta",
        )
    if not classify:
        for name in ("mixup", "cutmix"):
            if getattr(config, name) is not None:
                raise _not_for(task, name, getattr(config, name))
    return task


def imbalance_options(config: TrainConfig, task: Task, data: RunData) -> Task:
    """``task`` with the run's ``loss`` (focal, gce), ``class_weight`` and ``logit_adjust``
    (weights and offsets from the training labels: `jtricks.data.imbalance`)."""
    fields = parse_loss(config.loss)  # focal: classification or multilabel; gce: classification
    takes, works = LOSS_TASKS[next(iter(fields), "focal_gamma")]
    if fields and not isinstance(task, takes):
        raise _not_for(task, "loss", config.loss, works)
    task = dataclasses.replace(task, **fields)
    wanted = {
        name: getattr(config, name)
        for name in ("class_weight", "logit_adjust")
        if getattr(config, name) is not None
    }
    if not wanted:
        return task
    if not isinstance(task, Classification):
        name, value = next(iter(wanted.items()))
        raise _not_for(task, name, value)
    if data.on_disk:
        raise ConfigError(
            f"{', '.join(wanted)} count the training labels, which a dataset on disk does "
            "not hold in memory; give the class weights as {class: weight, ...}",
            param=next(iter(wanted)),
        )
    labels = data.train[1] if data.labels is None else data.labels  # the whole split's
    classes = data.num_classes
    if config.class_weight is not None:
        spec = parse_class_weight(config.class_weight)
        weights = class_weights(spec, labels if spec == "balanced" else None, classes)
        task = dataclasses.replace(task, class_weight=tuple(map(float, weights)))
    if config.logit_adjust is not None:
        offsets = logit_adjustment(labels, classes, config.logit_adjust)
        task = dataclasses.replace(task, logit_adjust=tuple(map(float, offsets)))
    return task


LOSS_TASKS = {
    "focal_gamma": (Classification | MultiLabel, "the classification and multilabel tasks"),
    "gce_q": (Classification, "the classification task"),
    "huber_delta": (Regression, "the regression task"),
}
"""The tasks each ``--loss`` field (`parse_loss`) trains, and how a refusal names them."""


def _not_for(
    task: Task, name: str, value: Any, works: str = "the classification task"
) -> ConfigError:
    return ConfigError(
        f"{name}={value!r} works with {works} only; this run's task is {task.name!r}",
        param=name,
    )


def run_length(config: TrainConfig, n_train: int, rebuild: bool = False) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` on a training split of ``n_train`` examples;
    with neither epochs nor steps, the paper's `TrainConfig.DEFAULT_STEPS`. Refuses a
    batch larger than the split and what would act past the run's end (`within_run`)."""
    if config.batch_size * config.accumulate > n_train:  # checked on the whole split
        raise ConfigError(
            f"batch_size must satisfy 1 <= batch_size * accumulate <= {n_train} (the "
            f"training split); got {config.batch_size} * {config.accumulate}",
            param="batch_size",
        )
    steps = config.steps
    if config.epochs is None and steps is None:
        steps = TrainConfig.DEFAULT_STEPS
    steps_per_epoch = n_train // (config.batch_size * config.accumulate)
    total_steps = steps if steps is not None else config.epochs * steps_per_epoch
    if total_steps > MAX_STEP:
        name = "steps" if steps is not None else "epochs"
        raise ConfigError(
            f"{name}={getattr(config, name)!r} is {total_steps:,} steps; the step counter is "
            f"an int32, so a run has at most {MAX_STEP:,} (2**31 - 1)",
            param=name,
        )
    if not rebuild:
        within_run(config, total_steps, -(-total_steps // steps_per_epoch))
    return steps_per_epoch, total_steps


def within_run(config: TrainConfig, total_steps: int, last_epoch: int) -> None:
    """Refuse a setting that acts at a step or an epoch past the run's end: it would do
    nothing without a word (SWA that never averages, step records or a profile that never
    starts)."""
    if config.swa is not None and config.swa > last_epoch:
        raise ConfigError(
            f"swa={config.swa} starts averaging after the last epoch ({last_epoch}), so no "
            f"average would ever be taken; give an epoch in 1..{last_epoch}",
            param="swa",
        )
    every = config.log_every_steps
    if every is not None and every > total_steps:
        raise ConfigError(
            f"log_every_steps={every} records every {every:,}th step and the run has "
            f"{total_steps:,}, so no step would be recorded; give N in 1..{total_steps}",
            param="log_every_steps",
        )
    if config.profile is not None and parse_steps(config.profile)[0] > total_steps:
        raise ConfigError(
            f"profile={config.profile!r} starts after the run's last step ({total_steps:,}), "
            f"so nothing would be traced; give steps in 1..{total_steps}",
            param="profile",
        )


def optimizer(
    config: TrainConfig, steps_per_epoch: int, total_steps: int, rebuild: bool = False
) -> tuple[Any, Plateau | None]:
    """The run's optimizer with its schedule, and the reduce-on-plateau spec (or ``None``):
    a plateau schedule is a callback on a constant base rate."""
    length = dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps, within_run=not rebuild)
    plateau = build_schedule(config.schedule, 1.0, **length)  # validates the spec
    plateau = plateau if isinstance(plateau, Plateau) else None

    def schedule(base_lr: float):
        return base_lr if plateau else build_schedule(config.schedule, base_lr, **length)

    tx = build_optimizer(
        config.optimizer, config.learning_rate, schedule=schedule, plateau=plateau is not None
    )
    if config.fused:  # one buffer per dtype group; with freeze, fused runs on the trainable part
        tx = fused(tx)
    return tx, plateau


def mixing(config: TrainConfig, example: Any) -> tuple[str, float] | None:
    """``(kind, alpha)`` of mixup or cutmix, or ``None``; cutmix needs images."""
    if config.cutmix is not None and example.ndim != 4:
        raise ConfigError(
            f"cutmix needs images (N, H, W, C); this dataset's examples have shape {example.shape[1:]}",
            param="cutmix",
        )
    if config.mixup:
        return ("mixup", config.mixup)
    return ("cutmix", config.cutmix) if config.cutmix else None


def augmentations(config: TrainConfig, example: Any) -> tuple[Any, Any]:
    """The training augmentation and the test-time one (``None`` where off), each tried on
    one example so a shape mismatch is a config error."""
    augment = fitted_augment("augment", config.augment, example)
    tta = None
    if config.tta > 1:
        tta = fitted_augment("tta_augment", config.tta_augment, example) or augment
    return augment, tta


def fitted_augment(name: str, spec: str | None, example: Any) -> Any:
    """Build pipeline ``spec`` and try it on one example (its shape and dtype)."""
    if spec is None:
        return None
    fn = build_augment(spec)
    try:
        jax.eval_shape(
            fn, jax.random.key(0), jax.ShapeDtypeStruct(example.shape[1:], example.dtype)
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{name} {spec!r} does not fit examples of shape {example.shape[1:]} and dtype "
            f"{example.dtype}: {e}",
            param=name,
        ) from None
    return fn


def initial_state(config: TrainConfig, b: Build, example: Any) -> TrainState:
    """The run's fresh state: the model's (with its EMA when ``config.ema`` asks), or with
    ``config.ensemble`` N members stacked, member ``i`` from init key ``fold_in(init_key,
    i)`` (as `fit_ensemble` numbers them)."""
    if config.ensemble > 1:
        keys = jax.vmap(lambda i: jax.random.fold_in(b.init_key, i))(jnp.arange(config.ensemble))
        return create_ensemble(b.members, b.tx, example, keys, **ema_settings(config))
    return create_train_state(b.model, b.tx, example, b.init_key, **ema_settings(config))


def ema_settings(config: TrainConfig) -> dict[str, Any]:
    """The EMA keywords of `create_train_state` / `create_ensemble` a config asks for."""
    return {"ema_decay": config.ema, "ema_debias": config.ema_debias}


def with_pretrained(
    config: TrainConfig, b: Build, state: TrainState, load: bool = True
) -> tuple[TrainState, str | None]:
    """``state`` with ``config.pretrained``'s weights loaded when ``load`` (into every
    member of stacked states, `load_pretrained`) and, with ``finetune``, the frozen
    layers' BatchNorm statistics kept; and the line that says what was loaded (``None``
    when nothing was)."""
    said = None
    if load and config.pretrained is not None:
        state, loaded = load_pretrained(state, config.pretrained)
        frozen_fresh(config, b.trainable, loaded["kept"])
        said = describe_loaded(loaded)
        if config.ensemble > 1 and not loaded["kept"]:
            said += (
                f"; all {config.ensemble} members start from these weights and see the "
                "same batches: they differ only where dropout draws"
            )
    if b.trainable is not None and state.batch_stats:  # frozen layers keep their statistics
        state = freeze_batch_stats(state, trainable=b.trainable)
    return state, said


def frozen_fresh(config: TrainConfig, trainable: list[str] | None, kept: list[str]) -> None:
    """Refuse a ``--finetune`` preset that freezes a layer the checkpoint did not hold (of
    another shape, or absent): it would stay at its random initialisation for the whole
    run, a fixed random projection in front of the trained layers."""
    if trainable is None:
        return
    fresh = [p for p in kept if not any(fnmatch.fnmatchcase(p, t) for t in trainable)]
    layers = layer_names(fresh)
    if layers:
        raise ConfigError(
            f"finetune={config.finetune!r} freezes {', '.join(layers)}, which "
            f"{config.pretrained!r} does not hold (another shape or absent), so it would stay "
            "at its random initialisation; train it too (finetune 'all', or 'last:K' "
            "reaching it) or start from a checkpoint of the same architecture",
            param="finetune",
        )


def add_callbacks(b: Build, config: TrainConfig, data: RunData, plateau: Plateau | None) -> None:
    """Reduce-on-plateau, early stopping and SWA, as the config asks."""
    if plateau is not None:
        b.plateau = ReduceLROnPlateau(
            plateau.factor,
            plateau.patience,
            plateau.min_delta,
            monitor=plateau.monitor,
            mode=plateau.mode,
            min_scale=plateau.min_scale,
            patience_mode=plateau.patience_mode,
        )
        b.callbacks.append(b.plateau)
    if config.early_stopping is not None:
        b.early = EarlyStopping(config.early_stopping)
        b.callbacks.append(b.early)
    if config.swa is not None:
        probe = lambda: create_train_state(b.model, b.tx, data.example, b.init_key)  # noqa: E731
        SWA.check(jax.eval_shape(probe))  # shapes only: nothing is initialised
        b.swa = SWA(config.swa, data.train[0])
        b.callbacks.append(b.swa)


HOME_DATASETS = {"fcn1d": "segmentation1d", "transformer_lm": "tokens"}
"""A dataset for each built-in model that does not take the default one (MNIST-1D)."""


@contextlib.contextmanager
def name_the_dataset(config: TrainConfig) -> Iterator[None]:
    """Around a run: a refusal of the model or its outputs (``param`` model or task) for a
    model that trains on a dataset of its own kind names that dataset, so the one line
    says the way out: ``...; --model transformer_lm trains on --dataset tokens``."""
    try:
        yield
    except ConfigError as e:
        model = str(config.model).split("(")[0].strip()
        home = HOME_DATASETS.get(model)
        dataset = str(config.dataset).split("(")[0].strip()
        if home is None or dataset == home or e.param not in ("model", "task"):
            raise
        raise ConfigError(f"{e}; --model {model} trains on --dataset {home}", param=e.param) from e
