"""What a run writes besides checkpoints: ``metrics.jsonl``, ``steps.jsonl``,
``curves.png``, ``summary.json`` (and the summary's entries), TensorBoard events and a
profile."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.errors import ConfigError, WriteError
from jtricks.plotting import save_figure, subplots
from jtricks.run.config import TrainConfig
from jtricks.rundir import check_writable, write_json
from jtricks.training import History, TrainState
from jtricks.training.class_report import ClassReport, plot_confusion
from jtricks.training.predict import predict
from jtricks.training.state import is_ensemble
from jtricks.training.tensorboard import TensorBoard
from jtricks.training.tta import tta_predict

VARIANTS = ("ema_", "single_view_", "member_", "tta_", "val_ema_", "val_member_")
"""Prefixes of metrics reported under their own names beside the split's own."""


class RawModel:
    """Prediction on raw inputs for a trained run (its ``config``, ``state``, ``scaler``:
    the preprocessing fitted on its training rows, ``None`` for token ids, and ``task``),
    shared by `RunResult` and `jtricks.run.load.LoadedRun`."""

    config: TrainConfig
    state: TrainState
    scaler: Any
    task: Any
    tta: tuple[Any, jax.Array] | None = None
    """With ``--tta V``: the views' augmentation and the key the run's summary used."""
    classes: tuple[str, ...] | None = None
    """The class names of a classifier whose data named them (an image folder's folders, text
    labels; `jtricks.data.Dataset.classes`): ``classes[i]`` is label ``i``, so
    ``np.asarray(run.classes)[run.predict(x).argmax(-1)]`` names the predictions."""

    def inputs(self, x: Any) -> np.ndarray:
        """Raw inputs as the model read them in training: scaled with the training rows'
        statistics (``--preprocess``), or token ids as int32."""
        x = np.asarray(x)
        return np.asarray(x, np.int32) if self.scaler is None else self.scaler(x)

    def predict(self, x: Any, **kwargs: Any) -> np.ndarray:
        """`jtricks.predict` on raw inputs (``inputs(x)``) with the parameters the run
        evaluated (its ``eval_params``: the EMA's for ``--eval-params ema``) unless
        ``params`` says otherwise, in the targets' units (`Task.values`: a regression
        learning standardized targets, ``--target-scale``, maps its outputs back); keywords
        as `predict`'s."""
        kwargs.setdefault("params", self.config.eval_params)
        kwargs.setdefault("task", self.task)
        return predict(self.state, self.inputs(x), **kwargs)

    def predict_combined(self, x: Any, **kwargs: Any) -> np.ndarray:
        """An ``--ensemble N`` run's one prediction, as its summary's test figures scored
        it: the task's `combine` of the members' `predict` outputs (classification: the
        log of the mean softmax; multi-label: the logits of the mean sigmoid; regression:
        the mean). A single model's run gives `predict`'s outputs. Keywords as `predict`'s.
        """
        out = self.predict(x, **kwargs)
        if not is_ensemble(self.state):
            return out
        return np.asarray(self.task.combine(jnp.asarray(out)))

    def predict_tta(self, x: Any, *, batch_size: int = 1000) -> np.ndarray:
        """A ``--tta V`` run's prediction as its summary's test figures were computed: the
        task's combination of the clean input and V-1 views of the run's augmentation,
        keyed as the run keyed them (`jtricks.training.tta.tta_predict`; classification:
        ``log p(y | x)``, ``(N, C)``, of the mean softmax; regression: the mean output), on
        raw inputs and the parameters the run evaluated. `predict` is the single view
        (``single_view_*`` in the summary).

        Raises:
          ConfigError (``param="tta"``): the run used no test-time augmentation.
        """
        if self.tta is None:
            raise ConfigError(
                "predict_tta needs a run with --tta > 1 (its views' combined prediction); "
                f"this run has tta={self.config.tta}: use predict",
                param="tta",
            )
        augment, key = self.tta
        return self.task.values(
            tta_predict(
                self.state,
                self.inputs(x),
                augment,
                views=self.config.tta,
                key=key,
                task=self.task,
                batch_size=batch_size,
                params=self.config.eval_params,
            )
        )


@dataclass
class RunResult(RawModel):
    """What `train` returns: the final state, the per-epoch history, test metrics, and the
    run folder; `predict` takes raw inputs (the run's scaling applied), as a loaded run's."""

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
    scaler: Any = field(default=None, repr=False)
    """The inputs' preprocessing, fitted on the training rows (``None``: token ids)."""
    task: Any = field(default=None, repr=False)
    """The run's task: how an ensemble's outputs combine into one prediction."""
    tta: tuple[Any, jax.Array] | None = field(default=None, repr=False)
    """With ``--tta V``: the views' augmentation and the key the run's summary used."""
    classes: tuple[str, ...] | None = None
    """The class names, where the data named them (see `RawModel`)."""


class MetricsLog:
    """Callback that appends each epoch's record to ``metrics.jsonl`` (one JSON object a line, flushed)."""

    needs_state = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, record: dict[str, Any], state: TrainState | None) -> bool:
        del state
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a half line is cut back by --resume (from the checkpoint)
            raise WriteError(self.path, e) from None
        return False


class StepsLog:
    """Callback that appends the per-step records (``log_every_steps``) to ``steps.jsonl``
    as each compiled program returns them (one JSON object a line, flushed)."""

    needs_state = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_steps(self, records: list[dict[str, Any]]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
        except OSError as e:  # a half line is cut back by --resume
            raise WriteError(self.path, e) from None

    def on_epoch_end(self, record: dict[str, Any], state: TrainState | None) -> bool:
        return False


def read_steps(path: Path, until: int, every: int) -> list[dict[str, Any]]:
    """The step records of ``steps.jsonl`` up to step ``until`` (what a resume keeps: the
    steps after its checkpoint run again). Lines that are not whole records (a killed
    run's cut last line, damaged bytes) are dropped; records lost before ``until`` (a file
    cut short or deleted) are named in one warning, and the run goes on without them.

    Raises:
      ConfigError: the file exists but cannot be read (before training starts)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace") if path.exists() else ""
    except OSError as e:
        raise ConfigError(
            f"cannot read {path}: {e.strerror or type(e).__name__}", param="resume"
        ) from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if 0 < record["step"] <= until and record["step"] % every == 0:
                records.append(record)
    records = list({r["step"]: r for r in records}.values())  # one record a step
    lost = until // every - len(records)
    if lost > 0:
        print(
            f"jtricks: warning: {path.name} lacks {lost} of the {until // every} step records "
            f"up to the checkpoint's step {until} (cut, damaged or deleted); the run goes on "
            "and records the steps from there",
            file=sys.stderr,
        )
    return records


def record_logs(run_dir: Path, config: Any, locks: Any, resumed_at: int | None = None) -> list[Any]:
    """The callbacks that write every epoch's record into ``run_dir``: ``metrics.jsonl``,
    with ``config.log_every_steps`` the step records into ``steps.jsonl`` and, with
    ``config.tensorboard``, TensorBoard event files in ``tensorboard/`` (closed by
    ``locks``, the run's exit stack, so their queued events reach the disk; a run resumed
    at step ``resumed_at`` hides the events logged after that step before the stop)."""
    logs: list[Any] = [MetricsLog(run_dir / "metrics.jsonl")]
    if config.log_every_steps is not None:
        logs.append(StepsLog(run_dir / "steps.jsonl"))
    if config.tensorboard:
        check_writable(run_dir / "tensorboard", "tensorboard")
        purge = None if resumed_at is None else resumed_at + 1  # the first step run again
        board = TensorBoard(run_dir / "tensorboard", config.to_dict(), purge_step=purge)
        locks.callback(board.close)
        logs.append(board)
    return logs


def is_split_metric(name: str, value: Any) -> bool:
    """A task metric of the evaluated split, not a variant reported under its own name."""
    return isinstance(value, float) and not name.startswith(VARIANTS)


def main_metric(record: dict[str, Any]) -> str | None:
    """The task's headline metric in a record: the first ``val_<m>`` besides the loss (or,
    without validation, the first task metric among the ``train_`` entries)."""
    for k, v in record.items():
        if k.startswith("val_") and k != "val_loss" and is_split_metric(k, v):
            return k[len("val_") :]
    skip = {"train_loss", "train_grad_norm", "train_param_norm", "train_nonfinite"}
    names = [k for k in record if k.startswith("train_") and k not in skip]
    return names[0][len("train_") :] if names else None


def plot_curves(history: History, path: Path) -> None:
    """Save the loss and the task's headline metric (train and validation, per epoch) as a
    PNG, atomically; with per-step records (``log_every_steps``) a second row shows the
    learning rate and the gradient norm per recorded step."""
    epochs = history["epoch"]
    first = history.records[0] if history.records else {}
    metric = main_metric(first)
    rows = 2 if history.steps else 1
    fig, axes = subplots(rows, 2, figsize=(10, 4 * rows), squeeze=False)
    (ax_loss, ax_metric) = axes[0]
    for prefix, label in (("train_", "train"), ("val_", "validation")):
        if f"{prefix}loss" in first:
            ax_loss.plot(epochs, history[f"{prefix}loss"], label=label)
        if metric is not None and f"{prefix}{metric}" in first:
            ax_metric.plot(epochs, history[f"{prefix}{metric}"], label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    ax_metric.set(xlabel="epoch", ylabel=metric or "", title=metric or "")
    if history.steps:
        plot_steps(history, *axes[1])
    save_figure(fig, path, axes=tuple(axes.ravel()))


def plot_steps(history: History, ax_lr: Any, ax_grad: Any) -> None:
    """The per-step learning rate and gradient norm (where recorded) on two axes."""
    for ax, key, title in ((ax_lr, "lr", "learning rate"), (ax_grad, "grad_norm", "gradient norm")):
        if any(key in r for r in history.steps):
            ax.plot(*history.step_column(key))
        ax.set(xlabel="step", ylabel=key, title=f"{title} (per step)")


def class_entries(
    report: ClassReport | None, run_dir: Path | None, classes: Any = None
) -> dict[str, Any]:
    """The summary's ``per_class`` entry of a classification run's test split (support,
    recall, precision, F1 per class, the confusion matrix, and the ``classes``' names
    where the data named them), with its picture ``confusion.png`` in the run folder;
    nothing for other tasks."""
    if report is None:
        return {}
    if run_dir is not None:
        plot_confusion(report, run_dir / "confusion.png", classes=classes)
    named = {} if classes is None else {"classes": list(classes)}
    return {"per_class": {**named, **report.to_dict(), "confusion": report.confusion.tolist()}}


def write_summary(
    run_dir: Path, history: History, test: dict[str, Any], params: Any, wall: float, **extra: Any
) -> None:
    """Plot the curves and write ``summary.json`` (last, so its presence marks a finished run)."""
    plot_curves(history, run_dir / "curves.png")
    last = history.records[-1]
    write_json(
        run_dir / "summary.json",
        {
            **{f"test_{k}": v for k, v in test.items() if is_split_metric(k, v)},
            **{k: v for k, v in last.items() if k.startswith("val_") and is_split_metric(k, v)},
            "steps": last["step"],
            "epochs": last["epoch"],
            "wall_s": wall,
            "train_s": last.get("elapsed_s"),
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
            "stopped": history.stopped,
            **extra,
        },
    )


def restored_entries(history: History, early: Any) -> dict[str, Any]:
    """Summary entries of a run whose early stopping returned an earlier epoch's state
    (``restore_best``): that epoch's validation metrics (they replace the last epoch's:
    the test metrics are that state's too) and ``restored_epoch``; nothing otherwise."""
    best = getattr(early, "best_epoch", None)
    if best is None or not early.restore_best or best == history.records[-1]["epoch"]:
        return {}
    record = next(r for r in history.records if r["epoch"] == best)
    val = {k: v for k, v in record.items() if k.startswith("val_") and is_split_metric(k, v)}
    return {**val, "restored_epoch": best}


def diverged_entries(
    history: History, kept_val: dict[str, Any], run_dir: Path | None
) -> dict[str, Any]:
    """Summary entries of a diverged run: the flag, the kept state's step and validation
    metrics (they replace the stopping epoch's), and how to continue from it."""
    where = str(run_dir) if run_dir is not None else "RUN_DIR"
    return {
        **{f"val_{k}": v for k, v in kept_val.items() if is_split_metric(k, v)},
        "diverged": True,
        "kept_step": history.kept_step,
        "continue_with": f"jtricks train --pretrained {where} --lr <a lower rate> --out <new folder>",
    }


def huge_loss_warning(history: History, final_loss: float) -> str | None:
    """A line when the final loss is finite but 10x the untrained model's (a run that blew
    up without ever producing NaN, e.g. Adam at lr 1e4), else ``None``."""
    initial = history.records[0].get("initial_loss") if history.records else None
    if initial is None or not initial > 0:  # no loss at the start (e.g. an all-zero mask)
        return None
    if not np.isfinite(final_loss) or final_loss <= 10 * initial:
        return None
    return (
        f"the final test loss {final_loss:.4g} is {final_loss / initial:.3g}x the untrained "
        f"model's ({initial:.4g}): training made the model worse; lower the learning rate "
        "or clip gradients"
    )


def floor_entries(floor: float | None, task: Any, test: dict[str, float]) -> dict[str, float]:
    """The dataset's loss floor and the test loss's gap to it, where the floor is known:
    the gap of the ``mse`` for a regression learning standardized targets (its loss is
    theirs, the floor is in the targets' units)."""
    if floor is None:
        return {}
    loss = test["mse"] if getattr(task, "scale", None) is not None else test["loss"]
    return {"loss_floor": floor, "test_loss_gap": loss - floor}
