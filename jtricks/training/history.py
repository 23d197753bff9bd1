"""`History` (the records of a `fit`) and the `Callback` protocol."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from jtricks.training.state import TrainState


class Callback(Protocol):
    """Called on the Python side after every epoch's metrics are known.

    ``on_epoch_end`` receives the epoch's record (see `History`) and the current
    state. It returns ``None``/``False`` to go on, ``True`` to stop after this epoch, a
    `StopTraining` (stop, optionally continuing from its state), or a new `TrainState` to
    continue from (e.g. with a lowered learning rate). An optional
    ``on_train_end(state)`` runs after the last epoch and may return a replacement state
    (e.g. the best one). Callbacks run in order; each sees the state the previous one
    returned.

    Two attributes let `fit` dispatch the next epoch before calling the callbacks, so the
    device never waits for them (`jtricks.training.loop.Ahead`):

    * ``needs_state = False``: it only observes records; it is passed ``None`` for the
      state and must not stop training.
    * ``takes_copy = True``: it reads the state (saves it, keeps a copy, averages it)
      but rarely stops training or returns a state. It is passed a copy of the epoch's
      end state, made by the next epoch's program; when it stops or returns a state,
      that next epoch is discarded and training goes on as if it had never run ahead.
      Every callback of jtricks that reads the state sets it. What it keeps, it copies
      (beside a callback that needs the live state it is handed that one).

    By default a callback gets the live state before the next epoch is dispatched.
    """

    def on_epoch_end(
        self, record: dict[str, Any], state: TrainState
    ) -> bool | TrainState | None: ...


def handed_state(callback: Any, state: Any, records_only: bool) -> Any:
    """The state ``callback.on_epoch_end`` gets: ``None`` when it only observes records
    (``needs_state = False``) or when every callback does (``records_only``)."""
    return None if records_only or getattr(callback, "needs_state", True) is False else state


@dataclass
class History:
    """Per-epoch records of a `fit` call.

    Each record has ``epoch`` (1-based), ``step`` (optimizer steps so far), the
    epoch means of the step metrics prefixed ``train_`` (``train_loss``,
    ``train_accuracy``, ``train_grad_norm``, ...), ``val_loss`` and
    ``val_accuracy`` when a validation split is given, ``steps_per_s`` (the
    first epoch includes compilation) and ``elapsed_s`` since `fit` began, and
    ``lr``, the epoch's mean learning rate, when the optimizer state holds one
    (optimizers from `jtricks.optim.build_optimizer` do).

    ``history["val_loss"]`` returns that column as a NumPy array, ``history[-1]`` the
    last record. A stream's records also hold ``data_state`` (see `fit`).

    ``steps`` holds the per-step records of ``fit(log_every_steps=N)``: one dict for every
    N-th step (``step``, ``loss``, ``lr``, ``grad_norm``, ``update_norm``,
    ``param_norm``, ``skipped`` and the task's metrics); ``history.step_column("lr")``
    gives ``(steps, values)`` as NumPy arrays.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    diverged: bool = False
    """Training stopped after ``max_nonfinite`` consecutive skipped steps."""
    kept_step: int | None = None
    """After divergence: the step of the state `fit` returned (the last that evaluated
    finite); ``records[-1]["step"]`` is where training stopped."""

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):  # one record: history[-1]
            return self.records[key]
        missing = [r.get("epoch") for r in self.records if key not in r]
        if missing:
            raise KeyError(self._missing(key, missing))
        return np.asarray([r[key] for r in self.records])

    def _missing(self, key: str, epochs: list) -> str:
        """Why ``history[key]`` has no column: the key is in no record (then the keys there
        are), or only in some (then the epochs without it)."""
        if len(epochs) < len(self.records):
            return (
                f"{key!r} is missing from the records of epochs {epochs}; "
                f"use [r.get({key!r}) for r in history] for the records that have it"
            )
        keys = sorted({k for r in self.records for k in r})
        return f"the history has no {key!r}; its keys are: {', '.join(keys) or '(no records)'}"

    steps: list[dict[str, Any]] = field(default_factory=list)
    """Per-step records (``fit(log_every_steps=N)``), oldest first."""
    interrupted: dict[str, Any] | None = None
    """Set when ``fit(stop=...)`` stopped the run between programs: ``step`` (where the
    returned state is), ``epoch`` (the epoch that step falls in), ``signal`` and, for a
    stream, ``data_state`` (where its next batch comes from)."""

    def step_column(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric of the per-step records that hold it."""
        rows = [r for r in self.steps if key in r]
        if not rows and self.steps:
            keys = sorted({k for r in self.steps for k in r})
            raise KeyError(f"the step records have no {key!r}; their keys are: {', '.join(keys)}")
        return np.asarray([r["step"] for r in rows]), np.asarray([r[key] for r in rows])

    def keys(self) -> list[str]:
        """The keys the records hold, in the order they first appear (as a dict's)."""
        return list(dict.fromkeys(k for r in self.records for k in r))

    def __contains__(self, key: object) -> bool:
        """``"val_loss" in history``: whether ``history[key]`` is a column (every record
        holds it); a record given whole is looked for among the records."""
        if isinstance(key, dict):
            return key in self.records
        return bool(self.records) and all(key in r for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)
