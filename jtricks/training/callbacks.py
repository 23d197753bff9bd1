"""Callbacks run by `fit` on the Python side after each epoch."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jtricks.caches import jitted
from jtricks.errors import ConfigError, check_int, check_range
from jtricks.optim.schedules import Plateau
from jtricks.training.state import TrainState, device_copy


class _Monitor:
    """Tracks the best value of one record entry: "improved" means ``value < best - min_delta``
    (``mode="min"``) or ``value > best + min_delta`` (``mode="max"``); NaN never improves."""

    def __init__(self, name: str, monitor: str, mode: str, min_delta: float) -> None:
        check_range("min_delta", min_delta, low=0.0)
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max'; got {mode!r}", param="mode")
        self.name, self.monitor, self.mode, self.min_delta = name, monitor, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf

    def value(self, record: dict[str, Any]) -> float:
        if self.monitor not in record:
            raise ConfigError(
                f"{self.name} monitors {self.monitor!r}, which the fit records do not have; "
                f"available: {', '.join(sorted(record))}",
                param="monitor",
            )
        return record[self.monitor]

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class ReduceLROnPlateau:
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved for ``patience`` epochs.

    "Improved" means ``value < best - min_delta`` (``mode="min"``) or
    ``value > best + min_delta`` (``mode="max"``). The learning rate is never
    scaled below ``min_scale`` times its schedule. It acts on the
    ``plateau_scale`` of `jtricks.optim.scale_by_plateau`, so build the optimizer
    with ``build_optimizer(..., plateau=True)``; it composes with any schedule.

    Example:
      >>> tx = build_optimizer("adam", 1e-3, plateau=True)
      >>> fit(state, data, val_data=val, epochs=50, batch_size=100, callbacks=[ReduceLROnPlateau(0.5, 3)])

    Counting patience: with ``patience_mode="keras"`` (the default) the rate drops at the
    ``patience``-th consecutive epoch without improvement (Keras: ``wait >= patience``);
    with ``"pytorch"`` at the ``(patience + 1)``-th (PyTorch:
    ``num_bad_epochs > patience``). After a drop the count restarts in both. Improvement
    is absolute (PyTorch's ``threshold_mode="abs"`` with ``threshold=min_delta``; its
    default relative threshold and cooldown are not offered).
    """

    takes_copy = True  # reads the state: fit runs the next epoch meanwhile (`Callback`)

    def __init__(
        self,
        factor: float = 0.5,
        patience: int = 5,
        min_delta: float = 0.0,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        min_scale: float = 1e-3,
        patience_mode: str = "keras",
    ) -> None:
        Plateau(factor, patience, min_delta, monitor, mode, min_scale, patience_mode).check()
        self.patience_mode = patience_mode
        self._monitor = _Monitor("ReduceLROnPlateau", monitor, mode, min_delta)
        self.factor, self.patience, self.min_delta = factor, patience, min_delta
        self.monitor, self.mode, self.min_scale = monitor, mode, min_scale
        self.wait = 0
        self.scale = 1.0

    @property
    def best(self) -> float:
        return self._monitor.best

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "scale": self.scale}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._monitor.best, self.wait, self.scale = d["best"], d["wait"], d["scale"]

    def on_epoch_end(self, record: dict[str, Any], state: TrainState) -> TrainState | None:
        value = self._monitor.value(record)
        if self._monitor.improved(value):
            self._monitor.best, self.wait = value, 0
            return None
        self.wait += 1
        bad_epochs = max(self.patience, 1) if self.patience_mode == "keras" else self.patience + 1
        if self.wait < bad_epochs or self.scale <= self.min_scale:
            return None
        self.wait = 0
        self.scale = max(self.scale * self.factor, self.min_scale)
        if optax.tree_utils.tree_get(state.opt_state, "plateau_scale") is None:
            raise ConfigError(
                "ReduceLROnPlateau needs an optimizer built with plateau=True (jtricks.optim.scale_by_plateau)"
            )
        current = optax.tree_utils.tree_get(state.opt_state, "plateau_scale")
        opt_state = optax.tree_utils.tree_set(  # stacked states: every member's scale
            state.opt_state, plateau_scale=jnp.full_like(current, self.scale)
        )
        return state.replace(opt_state=opt_state)


class StopTraining:
    """Returned by a callback to stop `fit` after this epoch, optionally continuing from ``state``
    (e.g. the best parameters seen)."""

    def __init__(self, state: TrainState | None = None, reason: str = "") -> None:
        self.state, self.reason = state, reason


class EarlyStopping:
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    "Improved" means ``value < best - min_delta`` (``mode="min"``) or
    ``value > best + min_delta`` (``mode="max"``); a non-finite value never improves.
    With ``restore_best=True`` the state of the best epoch is kept (a device copy:
    `fit` donates the state it passes on) and returned when training stops, and
    also at the end of training if the last epoch was not the best (`on_train_end`).

    Attributes after training: ``best``, ``best_epoch``, ``stopped_epoch`` (None if it never fired).
    """

    takes_copy = True  # reads the state: fit runs the next epoch meanwhile (`Callback`)

    def __init__(
        self,
        patience: int = 5,
        min_delta: float = 0.0,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        restore_best: bool = True,
    ) -> None:
        check_int("patience", patience, low=0)
        self._monitor = _Monitor("EarlyStopping", monitor, mode, min_delta)
        self.patience, self.min_delta, self.monitor, self.mode = patience, min_delta, monitor, mode
        self.restore_best = restore_best
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.wait = 0
        self.best_state: TrainState | None = None

    @property
    def best(self) -> float:
        return self._monitor.best

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, d: dict[str, Any], best_state: TrainState | None = None) -> None:
        self._monitor.best, self.best_epoch, self.wait = d["best"], d["best_epoch"], d["wait"]
        self.best_state = best_state

    def on_epoch_end(self, record: dict[str, Any], state: TrainState) -> StopTraining | None:
        value = self._monitor.value(record)
        if self._monitor.improved(value):
            self._monitor.best, self.best_epoch, self.wait = value, record["epoch"], 0
            if self.restore_best:
                self.best_state = device_copy(state)  # one program, not one per array
            return None
        self.wait += 1
        if self.wait >= max(self.patience, 1):
            self.stopped_epoch = record["epoch"]
            keep = self.best_state if self.restore_best else None
            reason = f"{self.monitor} did not improve for {self.wait} epochs"
            if keep is not None:
                reason += f"; kept epoch {self.best_epoch}'s state ({self.monitor} {self.best:.4g})"
            return StopTraining(keep, reason)
        return None

    def on_train_end(self, state: TrainState) -> TrainState | None:
        if self.restore_best and self.best_state is not None and self.stopped_epoch is None:
            return self.best_state
        return None


class MemberEarlyStopping:
    """`EarlyStopping` for each member of stacked states (a search's trials): member ``i``
    monitors its own value, entry ``i`` of the record's ``val_member_<name>`` for a
    ``monitor`` of ``val_<name>``, keeps the state of its own best epoch and stops
    counting once its patience has run out, so each member ends as a run of its own
    would (it trains on inside the program, unseen). Training stops when every member has
    stopped; the state returned is every member's best epoch's.

    New here: Keras's and the Flax examples' early stopping watch one model.

    Attributes after training: ``best_epoch`` and ``stopped_epoch`` (``None``: it never
    stopped), one entry per member.
    """

    takes_copy = True  # reads the state: fit runs the next epoch meanwhile (`Callback`)

    def __init__(
        self,
        patience: int = 5,
        min_delta: float = 0.0,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
    ) -> None:
        self.patience = check_int("patience", patience, low=0)
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        _Monitor("EarlyStopping", monitor, mode, min_delta)  # checks the arguments
        self._monitors: list[_Monitor] = []
        self.best_epoch: list[int | None] = []
        self.stopped_epoch: list[int | None] = []
        self.wait: list[int] = []
        self.best_state: TrainState | None = None

    def _values(self, record: dict[str, Any]) -> list[float]:
        name = "val_member_" + self.monitor.removeprefix("val_")
        values = _Monitor("EarlyStopping", name, self.mode, self.min_delta).value(record)
        if not self._monitors:
            self._monitors = [
                _Monitor("EarlyStopping", name, self.mode, self.min_delta) for _ in values
            ]
            self.best_epoch, self.stopped_epoch = [None] * len(values), [None] * len(values)
            self.wait = [0] * len(values)
        return [float(v) for v in values]

    def on_epoch_end(self, record: dict[str, Any], state: TrainState) -> StopTraining | None:
        improved = []
        for i, value in enumerate(self._values(record)):
            better = self.stopped_epoch[i] is None and self._monitors[i].improved(value)
            if better:
                self._monitors[i].best, self.best_epoch[i], self.wait[i] = value, record["epoch"], 0
            elif self.stopped_epoch[i] is None:
                self.wait[i] += 1
                if self.wait[i] >= max(self.patience, 1):
                    self.stopped_epoch[i] = record["epoch"]
            improved.append(better)
        first = self.best_state is None
        self.best_state = _keep(self.best_state, state, jnp.asarray(improved) | first)
        if all(epoch is not None for epoch in self.stopped_epoch):
            return StopTraining(self.best_state, f"every member's {self.monitor} stopped improving")
        return None

    def on_train_end(self, state: TrainState) -> TrainState | None:
        return self.best_state


@jitted
def _keep(best: Any, state: TrainState, improved: jax.Array) -> TrainState:
    """Member ``i`` of ``state`` where ``improved[i]``, else of ``best`` (a copy: the state
    is donated next)."""
    if best is None:
        return jax.tree.map(jnp.copy, state)

    def pick(b, s):
        return jnp.where(improved.reshape((-1,) + (1,) * (jnp.ndim(s) - 1)), s, b)

    return jax.tree.map(pick, best, state)
