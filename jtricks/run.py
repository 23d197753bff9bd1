"""`train`: one whole run from a config, with its run folder. The CLI's `jtricks train` calls it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.data.augment import build_augment
from jtricks.errors import ConfigError, StreamError, WriteError, check_int, check_range
from jtricks.nn import build_model
from jtricks.optim import build_optimizer, build_schedule, fused
from jtricks.optim.schedules import Plateau
from jtricks.run_data import load_run_data, refuse_on_disk
from jtricks.rundir import create_run_dir, locked
from jtricks.tasks import Classification, Task, build_task
from jtricks.training import (
    EarlyStopping,
    History,
    ReduceLROnPlateau,
    TrainState,
    create_train_state,
    evaluate,
    fit,
)
from jtricks.training.averaging import SWA
from jtricks.training.checkpoint import Checkpointer, restore, restore_latest
from jtricks.training.data_checks import check_data
from jtricks.training.fit import first_member
from jtricks.training.state import check_eval_source
from jtricks.training.transfer import forward_layers, freeze, load_pretrained, preset_patterns


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` in the run folder.

    The defaults are the MNIST-1D paper's CNN setting: Adam, learning rate 1e-2,
    batch 100. ``optimizer`` is a pipeline spec (string, dict or list, see
    `jtricks.optim.build_optimizer`); ``schedule`` a schedule spec with durations
    in epochs (see `jtricks.optim.build_schedule`). Give ``epochs`` or ``steps`` (not both); with neither, ``steps=6000`` (the paper's).
    ``val_fraction`` of the training split (stratified by class unless
    ``stratify=False``) is held out for validation; ``preprocess`` is fitted on
    the remaining training examples only. ``early_stopping`` is a patience in
    epochs on the validation loss (best parameters restored). ``label_smoothing`` ``s``
    trains (and reports every loss) on targets ``(1 - s) one_hot + s / C``. ``tta > 1``
    reports the final validation and test metrics of test-time augmentation: the mean
    softmax over ``tta`` views, the clean input and ``tta - 1`` views augmented with
    ``tta_augment`` (default: ``augment``); see `jtricks.training.tta`. With a run folder,
    checkpoints are written every ``checkpoint_every`` epochs and at the end,
    keeping ``keep_checkpoints`` of them plus the best by validation loss.
    """

    dataset: str = "mnist1d"
    task: str | None = None
    model: str = "cnn"
    optimizer: Any = "adam"
    learning_rate: float = 1e-2
    schedule: str = "constant"
    batch_size: int = 100
    epochs: int | None = None
    steps: int | None = None
    val_fraction: float = 0.1
    stratify: bool = True
    preprocess: str = "standardize"
    seed: int = 0
    eval_batch_size: int = 1000
    early_stopping: int | None = None
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    max_nonfinite: int = 20
    augment: str | None = None
    mixup: float | None = None
    cutmix: float | None = None
    label_smoothing: float = 0.0
    tta: int = 1
    tta_augment: str | None = None
    ema: float | None = None
    eval_params: str = "auto"
    swa: int | None = None
    ensemble: int = 1
    accumulate: int = 1
    precision: str = "float32"
    fused: bool = False
    pretrained: str | None = None
    finetune: str | None = None
    stream: bool = False
    loader: str = "python"
    chunk: int | None = None

    DEFAULT_STEPS = 6000

    def validate(self) -> None:
        """Check every number and type; names are checked when they are built.

        Raises:
          ConfigError: naming the field, its value and the allowed range.
        """
        for name in ("dataset", "model", "preprocess", "schedule"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(
                    f"{name} must be a string; got {getattr(self, name)!r}", param=name
                )
        if self.task is not None and not isinstance(self.task, str):
            raise ConfigError(f"task must be a task spec string; got {self.task!r}", param="task")
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, int | float):
            raise ConfigError(
                f"learning_rate must be a number; got {self.learning_rate!r}", param="learning_rate"
            )
        check_range("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_int("batch_size", self.batch_size, low=1)
        check_int("eval_batch_size", self.eval_batch_size, low=1)
        check_int("seed", self.seed, low=0, high=2**63 - 1)  # the range jax.random.key takes
        check_int("checkpoint_every", self.checkpoint_every, low=1)
        check_int("keep_checkpoints", self.keep_checkpoints, low=1)
        check_int("max_nonfinite", self.max_nonfinite, low=1)
        if self.early_stopping is not None:
            check_int("early_stopping", self.early_stopping, low=1)
        if self.mixup is not None and self.cutmix is not None:
            raise ConfigError("give mixup or cutmix, not both", param="mixup")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), low=0.0, low_inclusive=False)
        check_range(
            "label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_inclusive=False
        )
        check_int("tta", self.tta, low=1)
        if self.tta > 1 and self.augment is None and self.tta_augment is None:
            raise ConfigError(
                f"tta={self.tta} averages augmented views: give augment (used for the views) "
                "or tta_augment",
                param="tta",
            )
        if self.tta_augment is not None and self.tta == 1:
            raise ConfigError(
                f"tta_augment={self.tta_augment!r} needs tta > 1 (the number of views)",
                param="tta_augment",
            )
        if self.ema is not None:
            check_range("ema", self.ema, low=0.0, high=1.0, high_inclusive=False)
        check_eval_source(self.eval_params)
        if self.eval_params == "ema" and self.ema is None:
            raise ConfigError(
                "eval_params='ema' evaluates on the EMA of the parameters: give ema (a decay)",
                param="eval_params",
            )
        if self.swa is not None:
            check_int("swa", self.swa, low=1)
        check_int("ensemble", self.ensemble, low=1)
        check_int("accumulate", self.accumulate, low=1)
        for name in ("fused", "stream"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{name} must be true or false; got {getattr(self, name)!r}", param=name
                )
        from jtricks.data.stream import LOADERS

        if self.loader not in LOADERS:
            raise ConfigError(
                f"loader must be one of {', '.join(LOADERS)}; got {self.loader!r}", param="loader"
            )
        if self.chunk is not None:
            check_int("chunk", self.chunk, low=1)
        from jtricks.training.steps import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}",
                param="precision",
            )
        if self.ensemble > 1 and (self.accumulate > 1 or self.precision != "float32"):
            raise ConfigError(
                "ensemble runs do not support accumulate or precision", param="ensemble"
            )
        if self.ensemble > 1:
            for name in ("early_stopping", "swa", "pretrained"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"ensemble runs do not support {name}; got ensemble={self.ensemble}, "
                        f"{name}={getattr(self, name)!r}",
                        param="ensemble",
                    )
            if self.schedule.startswith("plateau"):
                raise ConfigError(
                    "ensemble runs do not support the plateau schedule", param="ensemble"
                )
        if self.ensemble > 1 and self.tta > 1:
            raise ConfigError("ensemble runs do not support tta", param="ensemble")
        if self.ensemble > 1 and (self.mixup is not None or self.cutmix is not None):
            raise ConfigError("ensemble runs do not support mixup or cutmix", param="ensemble")
        if self.finetune is not None and self.pretrained is None:
            raise ConfigError(
                f"finetune={self.finetune!r} needs pretrained weights (--pretrained RUN_DIR)",
                param="finetune",
            )
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(
                f"give epochs or steps, not both; got epochs={self.epochs}, steps={self.steps}",
                param="epochs",
            )
        if self.epochs is not None:
            check_int("epochs", self.epochs, low=1)
        if self.steps is not None:
            check_int("steps", self.steps, low=1)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, int | float):
            raise ConfigError(
                f"val_fraction must be a number; got {self.val_fraction!r}", param="val_fraction"
            )
        check_range(
            "val_fraction",
            self.val_fraction,
            low=0.0,
            high=1.0,
            low_inclusive=False,
            high_inclusive=False,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (e.g. parsed JSON); an unknown key is a `ConfigError`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {sorted(unknown)}; valid keys are: {', '.join(sorted(fields))}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, dict[str, Any]] = {
    # Every trick at once on the paper-sized CNN (26 channels instead of 25: 5,730
    # parameters): BatchNorm, AdamW (decoupled weight decay), a one-cycle schedule, a
    # random circular shift of up to 2 samples plus a random linear trend (MNIST-1D's
    # shear), and test-time augmentation over 33 views. Chosen on the validation split
    # (10% of the training split) among shift(2/3/4/6), time_stretch, scale, noise, dropout
    # 0.1, GELU, EMA, 25 / 26 channels, learning rate 1e-2 / 2e-2 / 3e-2, weight decay
    # 1e-4 / 1e-3 / 1e-2, 3000 / 4000 steps and batch 64 / 100 / 128 (2-3 seeds); then, on
    # 12 seeds: kernel sizes 7 / 9 in the first layer, a fourth layer, widths 20/28/28,
    # warm-up cosine and a shorter one-cycle warm-up, 5000 / 6000 steps, label smoothing
    # 0.1, mixup 0.2, trend(0.5 / 1 / 2), and TTA with 1 / 5 / 9 / 17 / 33 views.
    # Checkpoints every 50 of the 112 short epochs (each orbax write costs ~0.1 s of the 2 cores).
    "tricks": {
        "model": "cnn(norm='batch', channels=(26, 26, 26))",
        "optimizer": "adamw(weight_decay=1e-4)",
        "learning_rate": 1e-2,
        "schedule": "one_cycle",
        "batch_size": 100,
        "steps": 4000,
        "augment": "shift(2) | trend(1.0)",
        "tta": 33,
        "checkpoint_every": 50,
    },
    # The same tricks on a wider residual CNN (59,146 parameters, global average pooling).
    "tricks_wide": {
        "model": "cnn_wide(widths=(32, 64))",
        "optimizer": "adamw(weight_decay=1e-4)",
        "learning_rate": 1e-2,
        "schedule": "one_cycle",
        "batch_size": 100,
        "steps": 4000,
        "augment": "shift(2)",
    },
}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """A named `TrainConfig` from `RECIPES`; keyword overrides win over the recipe.

    Raises:
      ConfigError: unknown name (listing the valid ones) or field.
    """
    if name not in RECIPES:
        from jtricks.errors import unknown_name

        raise unknown_name("recipe", name, RECIPES)
    settings = {**RECIPES[name], **overrides}
    if "epochs" in overrides and "steps" not in overrides:
        settings.pop("steps", None)
    return TrainConfig.from_dict(settings)


@dataclass
class RunResult:
    """What `train` returns: the final state, the per-epoch history, test metrics, and the run folder."""

    config: TrainConfig
    state: TrainState
    history: History
    test: dict[str, float]
    out: Path | None
    wall_s: float
    loss_floor: float | None = None
    """The dataset's lowest reachable expected test loss, where known (`Dataset.loss_floor`)."""
    warning: str | None = None
    """Set when the run ended with a finite loss far above the untrained model's."""


def _task_for(config: TrainConfig, task_spec: str) -> Task:
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
        for name, off in (("mixup", None), ("cutmix", None)):
            if getattr(config, name) != off:
                raise _not_for(task, name, getattr(config, name))
    return task


def _not_for(task: Task, name: str, value: Any) -> ConfigError:
    return ConfigError(
        f"{name}={value!r} works with the classification task only; this run's task is "
        f"{task.name!r}",
        param=name,
    )


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


class MetricsLog:
    """Callback that appends each epoch's record to ``metrics.jsonl`` (one JSON object a line, flushed)."""

    needs_state = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, record: dict[str, Any], state: TrainState) -> bool:
        del state
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a half line is cut back by --resume (from the checkpoint)
            raise WriteError(self.path, e) from None
        return False


def main_metric(record: dict[str, Any]) -> str | None:
    """The task's headline metric in a record: the first ``val_<m>`` besides the loss (or,
    without validation, the first task metric among the ``train_`` entries)."""
    for k, v in record.items():
        if k.startswith("val_") and k != "val_loss" and _is_split_metric(k, v):
            return k[len("val_") :]
    skip = {"train_loss", "train_grad_norm", "train_param_norm", "train_nonfinite"}
    names = [k for k in record if k.startswith("train_") and k not in skip]
    return names[0][len("train_") :] if names else None


def plot_curves(history: History, path: Path) -> None:
    """Save the loss and the task's headline metric (train and validation, per epoch) as a
    PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epoch"]
    first = history.records[0] if history.records else {}
    metric = main_metric(first)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, label in (("train_", "train"), ("val_", "validation")):
        if f"{prefix}loss" in first:
            ax_loss.plot(epochs, history[f"{prefix}loss"], label=label)
        if metric is not None and f"{prefix}{metric}" in first:
            ax_metric.plot(epochs, history[f"{prefix}{metric}"], label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    ax_metric.set(xlabel="epoch", ylabel=metric or "", title=metric or "")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _prepare_out(out: str | os.PathLike) -> Path:
    """A new, empty output folder (`jtricks.rundir.create_run_dir`, unlocked)."""
    return create_run_dir(out)


def _load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"cannot resume {str(run_dir)!r}: {path} does not exist (not a jtricks run folder)",
            param="resume",
        )
    if (Path(run_dir) / "summary.json").exists():
        raise ConfigError(
            f"cannot resume {str(run_dir)!r}: the run already finished (summary.json exists)",
            param="resume",
        )
    try:
        saved = json.loads(path.read_text())["config"]
        return TrainConfig.from_dict(saved)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"cannot resume {str(run_dir)!r}: {path} is not a valid run config: {e}", param="resume"
        ) from None


def _rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    _atomic_write(path, write)


def environment() -> dict[str, Any]:
    """Versions and device of this process, recorded beside every run."""
    import flax
    import jaxlib
    import optax

    from jtricks import __version__

    dev = jax.devices()[0]
    return {
        "jtricks": __version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


def train(
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    reporter: Any = None,
    resume: str | os.PathLike | None = None,
    **overrides: Any,
) -> RunResult:
    """Run one training job end to end: data, split, preprocessing, model, optimizer, `fit`, test.

    Args:
      config: a `TrainConfig`; fields may also be overridden by keyword.
      out: run folder to create (must not exist or be empty). It receives
        ``config.json`` (config + environment, written first), ``metrics.jsonl``
        (one line per epoch, as training goes), ``curves.png`` and
        ``summary.json`` (final test metrics). ``None`` writes nothing.
      progress: show a rich progress bar and a line per epoch on stdout.
      reporter: a custom progress reporter (overrides ``progress``).
      resume: a run folder to continue from its newest intact checkpoint, with its own
        ``config.json`` (``config`` and overrides are then not allowed). The final
        parameters are bit-identical to an uninterrupted run's.

    Returns:
      A `RunResult`.

    Raises:
      ConfigError: for any bad name, number, or input data, before training starts
        and before the run folder is created.

    Example:
      >>> result = jtricks.train(model="mlp", steps=500)
      >>> result.test["accuracy"]
    """
    with contextlib.ExitStack() as locks:  # the run folder's lock, released on return
        return _train(config, out, progress, reporter, resume, locks, overrides)


def _train(config, out, progress, reporter, resume, locks, overrides) -> RunResult:
    """`train`'s body; ``locks`` holds the run folder's lock for the whole run."""
    t0 = time.perf_counter()
    if resume is not None:
        if config is not None or overrides or out is not None:
            raise ConfigError(
                "resume takes the run's own config.json; give no other settings", param="resume"
            )
        if Path(resume).is_dir():  # before anything in it is read
            locks.enter_context(locked(resume, param="resume"))
        config, out = _load_run_config(resume), Path(resume)
    config = config or TrainConfig()
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(unknown)}; valid keys are: {', '.join(sorted(valid))}"
        )
    config = dataclasses.replace(config, **overrides)
    config.validate()

    data = load_run_data(config)
    task = _task_for(config, data.task_spec)
    refuse_on_disk(config, data)
    model = build_model(config.model, data.num_classes)
    if config.batch_size * config.accumulate > data.n_train:  # checked on the whole split
        raise ConfigError(
            f"batch_size must satisfy 1 <= batch_size * accumulate <= {data.n_train} (the "
            f"training split); got {config.batch_size} * {config.accumulate}",
            param="batch_size",
        )
    streaming = config.stream or data.on_disk
    nproc, pid = jax.process_count(), jax.process_index()
    if nproc > 1:
        # multi-process (jax.distributed): statistics and splits come from the whole training
        # split, identical in every process; each process then keeps only its shard
        if config.ensemble > 1 or resume is not None or streaming:
            raise ConfigError(
                "multi-process runs support neither ensembles, resume nor streaming",
                param="num_processes",
            )
        x_tr, y_tr = data.train
        n_each = len(y_tr) // nproc
        n_each -= n_each % len(jax.local_devices())  # equal shards, even over local devices
        data.train = (x_tr[pid::nproc][:n_each], y_tr[pid::nproc][:n_each])
        data.n_train = n_each * nproc
        if pid != 0:
            out = None  # process 0 writes the run folder
    x_ex = data.example

    epochs, steps = config.epochs, config.steps
    if epochs is None and steps is None:
        steps = TrainConfig.DEFAULT_STEPS
    steps_per_epoch = data.n_train // (config.batch_size * config.accumulate)
    total_steps = steps if steps is not None else epochs * steps_per_epoch
    last_epoch = -(-total_steps // steps_per_epoch)
    if config.swa is not None and config.swa > last_epoch:
        raise ConfigError(
            f"swa={config.swa} starts averaging after the last epoch ({last_epoch}), so no "
            f"average would ever be taken; give an epoch in 1..{last_epoch}",
            param="swa",
        )
    # validates the spec; reduce-on-plateau is a callback on a constant base rate
    plateau = build_schedule(
        config.schedule, 1.0, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    is_plateau = isinstance(plateau, Plateau)

    def schedule(base_lr: float):
        if is_plateau:
            return base_lr
        return build_schedule(
            config.schedule, base_lr, steps_per_epoch=steps_per_epoch, total_steps=total_steps
        )

    tx = build_optimizer(
        config.optimizer, config.learning_rate, schedule=schedule, plateau=is_plateau
    )
    if config.fused:  # one buffer per dtype group; with freeze, fused runs on the trainable part
        tx = fused(tx)
    mix = (
        ("mixup", config.mixup)
        if config.mixup
        else ("cutmix", config.cutmix)
        if config.cutmix
        else None
    )
    if config.cutmix is not None and x_ex.ndim != 4:
        raise ConfigError(
            f"cutmix needs images (N, H, W, C); this dataset's examples have shape {x_ex.shape[1:]}",
            param="cutmix",
        )

    def fitted_augment(name: str, spec: str | None):
        """Build pipeline ``spec`` and try it on one example, so a shape mismatch is a config error."""
        if spec is None:
            return None
        fn = build_augment(spec)
        try:
            jax.eval_shape(fn, jax.random.key(0), jax.ShapeDtypeStruct(x_ex.shape[1:], jnp.float32))
        except ValueError as e:
            raise ConfigError(
                f"{name} {spec!r} does not fit examples of shape {x_ex.shape[1:]}: {e}",
                param=name,
            ) from None
        return fn

    augment = fitted_augment("augment", config.augment)
    tta_augment = None
    if config.tta > 1:
        tta_augment = fitted_augment("tta_augment", config.tta_augment) or augment

    callbacks: list[Any] = []
    plateau_cb = early_cb = None
    if is_plateau:
        plateau_cb = ReduceLROnPlateau(
            plateau.factor,
            plateau.patience,
            plateau.min_delta,
            monitor=plateau.monitor,
            mode=plateau.mode,
            min_scale=plateau.min_scale,
            patience_mode=plateau.patience_mode,
        )
        callbacks.append(plateau_cb)
    if config.early_stopping is not None:
        early_cb = EarlyStopping(config.early_stopping)
        callbacks.append(early_cb)
    if config.swa is not None:
        if resume is not None:
            raise ConfigError(
                "runs with swa cannot be resumed: the running average is not checkpointed",
                param="resume",
            )
        callbacks.append(SWA(config.swa, data.train[0]))
    if reporter is None and progress:
        from jtricks.training.progress import RichReporter

        reporter = RichReporter()

    key = jax.random.key(config.seed)
    init_key, data_key = jax.random.split(key)
    if config.pretrained is not None:
        probe = create_train_state(model, tx, x_ex, init_key)
        trainable = preset_patterns(config.finetune or "all", forward_layers(probe, x_ex))
        if config.finetune not in (None, "all"):
            tx = freeze(tx, trainable=trainable)
    if config.ensemble > 1:
        if resume is not None:
            raise ConfigError("ensemble runs cannot be resumed", param="resume")
        return _train_ensemble(
            config,
            model,
            tx,
            data.train,
            data.val,
            data.test,
            init_key,
            data_key,
            total_steps,
            augment,
            task,
            out,
            reporter,
            t0,
            locks,
        )
    state = create_train_state(model, tx, x_ex, init_key, ema_decay=config.ema)
    # the task's checks before the run folder exists: a mismatch leaves nothing behind
    if not data.on_disk:
        check_data(state, task, data.train, "training data")
        check_data(state, task, data.test, "test data")
    if config.pretrained is not None and resume is None:
        state, _ = load_pretrained(state, config.pretrained)
    records: list[dict[str, Any]] = []
    run_dir = None
    if out is not None:
        run_dir = Path(out) if resume is not None else create_run_dir(out, locks)
        ckpt_dir = run_dir / "checkpoints"
        if resume is not None:
            restored = restore_latest(ckpt_dir, state)
            if restored is not None:
                state, meta = restored
                records = meta["history"]
                cb_states = meta.get("callbacks", {})
                if plateau_cb is not None and "plateau" in cb_states:
                    plateau_cb.load_state_dict(cb_states["plateau"])
                if early_cb is not None and "early_stopping" in cb_states:
                    best = (
                        restore(ckpt_dir / "best", state)[0]
                        if (ckpt_dir / "best").is_dir()
                        else None
                    )
                    early_cb.load_state_dict(cb_states["early_stopping"], best)
            _rewrite_jsonl(run_dir / "metrics.jsonl", records)  # drop epochs after the checkpoint
        else:
            write_json(
                run_dir / "config.json", {"config": config.to_dict(), "environment": environment()}
            )

        def meta_fn(record, state):
            cbs = {}
            if plateau_cb is not None:
                cbs["plateau"] = plateau_cb.state_dict()
            if early_cb is not None:
                cbs["early_stopping"] = early_cb.state_dict()
            return {"callbacks": cbs}

        if jax.process_count() > 1:  # orbax saves would need every process; not wired yet
            callbacks = [MetricsLog(run_dir / "metrics.jsonl"), *callbacks]
            checkpointer = None
        else:
            checkpointer = Checkpointer(
                ckpt_dir,
                every=config.checkpoint_every,
                keep=config.keep_checkpoints,
                meta_fn=meta_fn,
            )
            checkpointer.records = list(records)
            checkpointer.best = min((r["val_loss"] for r in records), default=None)
            callbacks = [MetricsLog(run_dir / "metrics.jsonl"), *callbacks, checkpointer]

    remaining = total_steps - int(state.step)
    history = History(list(records))
    if remaining > 0:
        train_data, stream_kw = data.train, {}
        if streaming:
            train_data = data.train_stream(
                config.batch_size * config.accumulate, data_key, config.loader
            )
            saved = records[-1].get("data_state") if records else None
            stream_kw = dict(
                data_state=saved or train_data.state_at(int(state.step)), chunk=config.chunk
            )
        state, new = _fit_or_explain(
            checkpointer if run_dir is not None else None,
            run_dir,
            state,
            train_data,
            val_data=data.val,
            batch_size=None if streaming else config.batch_size,
            **stream_kw,
            steps=remaining,
            data_key=data_key,
            eval_batch_size=config.eval_batch_size,
            callbacks=callbacks,
            reporter=reporter,
            task=task,
            max_nonfinite=config.max_nonfinite,
            augment=augment,
            mix=mix,
            accumulate=config.accumulate,
            precision=config.precision,
            eval_params=config.eval_params,
        )
        history.records.extend(new.records)
        history.stopped = new.stopped
        history.diverged, history.kept_step = new.diverged, new.kept_step
    test_data = data.test
    kw = dict(task=task, batch_size=config.eval_batch_size)
    outcome: dict[str, Any] = {}
    if history.diverged:  # the kept state's own validation metrics, not the stopping epoch's
        kept_val = evaluate(state, data.val, params=config.eval_params, **kw)
        outcome = _diverged_entries(history, kept_val, run_dir)
    test = evaluate(state, test_data, params=config.eval_params, **kw)
    if state.ema_params is not None and config.eval_params != "ema":
        ema = evaluate(state, test_data, params="ema", **kw)
        test.update({f"ema_{k}": v for k, v in ema.items()})
    tta_extra: dict[str, Any] = {}
    if tta_augment is not None:
        from jtricks.training.tta import evaluate_tta

        tta_key = jax.random.fold_in(key, 3)  # the views are keyed from the seed
        kw = dict(
            views=config.tta,
            key=tta_key,
            task=task,
            batch_size=config.eval_batch_size,
            params=config.eval_params,
        )
        tta_test = evaluate_tta(state, data.test, tta_augment, **kw)
        tta_val = evaluate_tta(state, data.val, tta_augment, **kw)
        single = {f"single_view_{k}": test[k] for k in tta_test}
        test.update({**single, **tta_test, "tta_views": config.tta})
        tta_extra = {
            **{f"test_{k}": v for k, v in single.items() if k != "single_view_loss"},
            **{f"val_tta_{k}": v for k, v in tta_val.items()},
            "tta_views": config.tta,
        }
    wall = time.perf_counter() - t0
    warning = _huge_loss_warning(history, test["loss"])
    if warning:
        outcome["warning"] = warning
    if run_dir is not None:
        ema = {f"test_{k}": v for k, v in test.items() if k.startswith("ema_")}
        floor = _floor_entries(data.loss_floor, test["loss"])
        extra = {**ema, **tta_extra, **floor, **outcome}
        _write_summary(run_dir, history, test, state.params, wall, **extra)
    return RunResult(config, state, history, test, run_dir, wall, data.loss_floor, warning)


def _fit_or_explain(checkpointer, run_dir, state, train_data, **kw):
    """`fit`; a failing stream stops the run with one line that says what is left: the
    writes in flight are finished, and the newest checkpoint continues it."""
    try:
        return fit(state, train_data, **kw)
    except StreamError as e:
        if checkpointer is None:
            raise
        checkpointer.wait()
        raise StreamError(
            f"{e}; the run stopped there, its newest checkpoint is intact: fix the data, then "
            f"jtricks train --resume {run_dir}",
            e.state,
        ) from e


def _diverged_entries(
    history: History, kept_val: dict[str, Any], run_dir: Path | None
) -> dict[str, Any]:
    """Summary entries of a diverged run: the flag, the kept state's step and validation
    metrics (they replace the stopping epoch's), and how to continue from it."""
    where = str(run_dir) if run_dir is not None else "RUN_DIR"
    return {
        **{f"val_{k}": v for k, v in kept_val.items() if _is_split_metric(k, v)},
        "diverged": True,
        "kept_step": history.kept_step,
        "continue_with": f"jtricks train --pretrained {where} --lr <a lower rate> --out <new folder>",
    }


def _huge_loss_warning(history: History, final_loss: float) -> str | None:
    """A line when the final loss is finite but 10x the untrained model's (a run that blew
    up without ever producing NaN, e.g. Adam at lr 1e4), else ``None``."""
    initial = history.records[0].get("initial_loss") if history.records else None
    if initial is None or not np.isfinite(final_loss) or final_loss <= 10 * max(initial, 1e-12):
        return None
    return (
        f"the final test loss {final_loss:.4g} is {final_loss / initial:.3g}x the untrained "
        f"model's ({initial:.4g}): training made the model worse; lower the learning rate "
        "or clip gradients"
    )


def _write_summary(
    run_dir: Path, history: History, test: dict[str, Any], params: Any, wall: float, **extra: Any
) -> None:
    """Plot the curves and write ``summary.json`` (last, so its presence marks a finished run)."""
    plot_curves(history, run_dir / "curves.png")
    last = history.records[-1]
    write_json(
        run_dir / "summary.json",
        {
            **{f"test_{k}": v for k, v in test.items() if _is_split_metric(k, v)},
            **{k: v for k, v in last.items() if k.startswith("val_") and _is_split_metric(k, v)},
            "steps": last["step"],
            "epochs": last["epoch"],
            "wall_s": wall,
            "train_s": last.get("elapsed_s"),
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
            "stopped": history.stopped,
            **extra,
        },
    )


def _floor_entries(floor: float | None, test_loss: float) -> dict[str, float]:
    if floor is None:
        return {}
    return {"loss_floor": floor, "test_loss_gap": test_loss - floor}


def _is_split_metric(name: str, value: Any) -> bool:
    """A task metric of the evaluated split, not a variant reported under its own name."""
    variants = ("ema_", "single_view_", "member_", "tta_", "val_ema_", "val_member_")
    return isinstance(value, float) and not name.startswith(variants)


def _train_ensemble(
    config,
    model,
    tx,
    train,
    val,
    test_data,
    init_key,
    data_key,
    total_steps,
    augment,
    task,
    out,
    reporter,
    t0,
    locks=None,
) -> RunResult:
    """`train` for ``ensemble > 1``: N members in one program (`fit_ensemble`); member ``i``
    uses init key ``fold_in(init_key, i)``. Writes config, metrics, curves and a summary
    with every member's test accuracy and the ensemble's; no intermediate checkpoints."""
    from jtricks.training.ensemble import create_ensemble, evaluate_ensemble, fit_ensemble

    keys = jax.vmap(lambda i: jax.random.fold_in(init_key, i))(jnp.arange(config.ensemble))
    states = create_ensemble(model, tx, train[0], keys)
    check_data(first_member(states), task, train, "training data")  # before any folder
    run_dir = create_run_dir(out, locks) if out is not None else None
    log = None
    if run_dir is not None:
        write_json(
            run_dir / "config.json", {"config": config.to_dict(), "environment": environment()}
        )
        log = MetricsLog(run_dir / "metrics.jsonl")
    states, history = fit_ensemble(
        states,
        train,
        val_data=val,
        batch_size=config.batch_size,
        steps=total_steps,
        data_key=data_key,
        eval_batch_size=config.eval_batch_size,
        augment=augment,
        eval_params=config.eval_params,
        task=task,
        reporter=reporter,
        on_epoch_end=None if log is None else (lambda r: log.on_epoch_end(r, None)),
    )
    test = evaluate_ensemble(
        states, test_data, task=task, batch_size=config.eval_batch_size, params=config.eval_params
    )
    wall = time.perf_counter() - t0
    if run_dir is not None:
        _write_summary(
            run_dir,
            history,
            test,
            states.params,
            wall,
            **{f"test_{k}": v for k, v in test.items() if k.startswith("member_")},
            ensemble=config.ensemble,
        )
    return RunResult(config, states, history, test, run_dir, wall)
