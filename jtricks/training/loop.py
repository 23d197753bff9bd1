"""`fit`'s epoch loop: it dispatches the epochs of a `jtricks.training.runs.Run`,
records them, hands out step records, runs callbacks and watches for divergence."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jtricks.training.callbacks import StopTraining
from jtricks.training.history import History
from jtricks.training.options import FitOptions
from jtricks.training.partial import merge, summarize
from jtricks.training.preemption import stop_requested
from jtricks.training.runs import Run
from jtricks.training.state import TrainState
from jtricks.training.state import device_copy as _device_copy
from jtricks.training.steps import is_ensemble


@dataclass(frozen=True)
class LoopHooks:
    """What the host loop calls and reads besides the programs: the ``callbacks``, the
    progress ``reporter``, the ``stop`` flag read between programs, and the ``partial``
    epoch a resumed run continues (`jtricks.training.partial`)."""

    callbacks: tuple[Any, ...] = ()
    reporter: Any = None
    stop: Any = None
    partial: dict[str, Any] | None = None


def run_loop(
    state: TrainState, run: Run, val: Any, options: FitOptions, hooks: LoopHooks
) -> tuple[TrainState, History]:
    """`fit`'s epoch loop: dispatch, record, callbacks, divergence (``options``'
    ``max_nonfinite`` and ``keep_finite``), and a stop asked by ``hooks.stop`` between
    programs (`_interrupt`)."""
    callbacks, reporter = hooks.callbacks, hooks.reporter
    interrupt, partial = hooks.stop, hooks.partial
    history = History()
    start_step = int(first_member(state).step)
    total_steps, steps_per_epoch = run.total_steps, run.steps_per_epoch
    t0 = time.perf_counter()
    if reporter is not None:
        reporter.start(total_steps=total_steps, done=0)
    pipelined = _pipelined(run, callbacks)
    # the last state known to evaluate finite, kept on device; divergence ends with it
    keeper = _FiniteKeeper(enabled=options.keep_finite, always_copy=pipelined)

    def dispatch(state, done, streak):
        step = start_step + done
        epoch, offset = divmod(step, steps_per_epoch)
        num_steps = min(steps_per_epoch - offset, total_steps - done)
        keeper.starting(state)
        on_part = part_listener(history, callbacks, reporter, epoch, step, done)
        state, metrics = run.epoch(state, epoch, offset, num_steps, streak, val, on_part)
        before = partial if partial is not None and step == partial["step"] else None
        return state, Dispatched(metrics, epoch, step, num_steps, done, keeper.take_start(), before)

    cut: dict[str, Any] = {}
    try:
        t_last = time.perf_counter()
        state, pending = dispatch(state, 0, np.int32(0))
        while pending is not None:
            upcoming = None
            if pipelined and pending.done_after < total_steps and not stop_requested(interrupt):
                state, upcoming = dispatch(state, pending.done_after, pending.metrics["streak"])
            keeper.started(pending.start)
            if pending.metrics is None:  # a one-shot stream ran out at an epoch's start
                history.stopped = _ran_out(history, pending.step)
                break
            if pending.metrics.get("interrupted"):  # stopped between the epoch's parts
                deliver_steps(pending.metrics.get("step_rows"), history, callbacks)
                cut = pending.metrics
                break
            record, streak, done, ended = _record(pending)
            deliver_steps(record.pop("step_rows", None), history, callbacks)
            t_last = _timed(record, pending.step, t_last, t0)
            history.records.append(record)
            if reporter is not None:
                reporter.epoch_end(record, done=done)
            if "train_nonfinite" in record and streak >= options.max_nonfinite:
                state = _diverged(history, record, keeper, state, streak, record["step"])
                _end_diverged(record, state, upcoming, callbacks, pipelined)
                break
            keeper.epoch_end(record, upcoming.start if upcoming is not None else None)
            state, stop = _run_callbacks(callbacks, record, state, history, pipelined)
            if ended and not stop:
                history.stopped = record["stopped"] = _ran_out(history, record["step"])
                stop = True
            if stop:
                break
            if pipelined:
                pending = upcoming
            elif done < total_steps and not stop_requested(interrupt):
                state, pending = dispatch(state, done, np.int32(streak))
            else:
                pending = None
        complete = int(first_member(state).step) >= start_step + total_steps
        if stop_requested(interrupt) and history.stopped is None and not complete:
            _interrupt(history, callbacks, state, cut, interrupt, steps_per_epoch, partial)
        else:
            state = _train_end(callbacks, state, pipelined)
    except BaseException:
        _settle(callbacks)
        raise
    finally:
        if reporter is not None:
            reporter.close()
    return state, history


def _pipelined(run: Run, callbacks: Any) -> bool:
    """Whether the next epoch is dispatched before this one's metrics are read: when every
    callback only observes (``needs_state = False``), so the device never waits for
    Python. An epoch run in parts already overlaps each part with the host's work."""
    return not run.parts and all(getattr(cb, "needs_state", True) is False for cb in callbacks)


def _end_diverged(record, state, upcoming, callbacks, pipelined: bool) -> None:
    """A diverged run's last epoch: the epoch already in flight is discarded, and the
    callbacks see the stopping record with the kept state."""
    if upcoming is not None:
        jax.block_until_ready(upcoming.metrics)
    for cb in callbacks:
        cb.on_epoch_end(record, None if pipelined else state)


def _interrupt(history, callbacks, state, cut, stop, steps_per_epoch: int, partial=None) -> None:
    """Mark the run interrupted at the step its state reached and hand that state to every
    callback's ``on_interrupt(state, info)`` (a `Checkpointer` saves it); ``info`` holds
    the ``step``, the ``epoch`` it falls in (1-based), the ``signal``'s name and, for an
    epoch cut between its parts or chunks, the ``partial_epoch`` summary
    (`jtricks.training.partial.summarize`, with ``partial`` added in) and a stream's
    ``data_state``. ``on_train_end`` is not called: the run is not over."""
    step = int(first_member(state).step)
    name = getattr(stop, "name", None) or "a stop request"
    info = {"step": step, "epoch": step // steps_per_epoch + 1, "signal": name}
    if cut.get("partial") is not None:
        info["partial_epoch"] = summarize(cut["partial"], info["epoch"], step, partial)
    if cut.get("data_state") is not None:
        info["data_state"] = cut["data_state"]
    history.interrupted = info
    history.stopped = f"interrupted by {name} at step {step}"
    for cb in callbacks:
        on_interrupt = getattr(cb, "on_interrupt", None)
        if on_interrupt is not None:
            on_interrupt(state, dict(info, history=list(history.records)))


def _timed(record: dict[str, Any], start_step: int, t_last: float, t0: float) -> float:
    """Add ``steps_per_s`` (since ``t_last``) and ``elapsed_s`` (since ``t0``); the time now."""
    now = time.perf_counter()
    record["steps_per_s"] = (record["step"] - start_step) / (now - t_last)
    record["elapsed_s"] = now - t0
    return now


def _train_end(callbacks: Any, state: TrainState, pipelined: bool) -> TrainState:
    """Every callback's ``on_train_end(state)`` (not when pipelined: those only observe);
    the state a callback returns replaces it (e.g. the best one)."""
    for cb in callbacks:
        end = getattr(cb, "on_train_end", None)
        out = end(state) if end is not None and not pipelined else None
        if isinstance(out, TrainState):
            state = out
    return state


def part_listener(history, callbacks, reporter, epoch: int, step: int, done: int):
    """``on_part(acc, rows)`` for an epoch run in parts that starts at global ``step``,
    ``done`` steps into the call: a finished part's step records go out
    (`deliver_steps`) and the reporter's ``part_end`` shows the epoch's running loss, the
    global step reached and the steps done in the call so far."""

    def on_part(acc, rows):
        part = jax.device_get({"done": acc["done"], "loss": acc["sums"]["loss"]})
        deliver_steps(rows, history, callbacks)
        part_end = getattr(reporter, "part_end", None)
        if part_end is not None:
            loss = float(np.mean(part["loss"])) / max(int(part["done"]), 1)
            n = int(part["done"])
            part_end(epoch=epoch + 1, step=step + n, loss=loss, done=done + n)

    return on_part


def deliver_steps(rows: Any, history: History, callbacks: Any) -> None:
    """A program's step records (`jtricks.training.epoch.StepLog`) into ``history.steps``
    and to every callback with an ``on_steps(records)`` method."""
    if rows is None:
        return
    records = step_records(rows)
    history.steps.extend(records)
    for cb in callbacks:
        on_steps = getattr(cb, "on_steps", None)
        if on_steps is not None and records:
            on_steps(records)


STEP_NAMES = {"learning_rate": "lr", "nonfinite": "skipped"}
STEP_ORDER = ("loss", "learning_rate", "grad_norm", "update_norm", "param_norm", "nonfinite")


def step_records(rows: Any) -> list[dict[str, Any]]:
    """Host records of a program's compacted step rows (`jtricks.training.epoch.run_steps`):
    ``{"step", "loss", "lr", "grad_norm", "update_norm", "param_norm", "skipped", ...}``
    per logged step (an ensemble's metrics as the mean over members, ``skipped`` the
    members that skipped it)."""
    rows = jax.device_get(rows)
    count, steps = int(rows.pop("count")), rows.pop("step")
    first = [k for k in STEP_ORDER if k in rows]
    keys = first + sorted(k for k in rows if k not in first)
    records = []
    for i in range(count):
        record: dict[str, Any] = {"step": int(steps[i])}
        for key in keys:
            values = rows[key]
            name = STEP_NAMES.get(key, key)
            value = values[i]
            record[name] = int(np.sum(value)) if key == "nonfinite" else record_value(name, value)
        records.append(record)
    return records


def _settle(callbacks) -> None:
    """After an exception or an interrupt inside `fit`: let every callback that writes in
    the background (a `Checkpointer`) finish what it started and release its threads, so
    the newest checkpoint is on disk and the process can exit. A failure of those writes
    does not hide the error being raised."""
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


def _ran_out(history: History, step: int) -> str:
    return f"the training stream ran out at step {step}"


@dataclass
class Dispatched:
    """An epoch in flight: its ``metrics`` (device arrays until read), its ``epoch``, the
    global ``step`` it starts at, its ``num_steps``, the steps of this call ``done``
    before it, the ``start`` state kept for divergence (`_FiniteKeeper`) and the
    ``partial`` epoch it continues."""

    metrics: Any
    epoch: int
    step: int
    num_steps: int
    done: int
    start: TrainState | None
    partial: dict[str, Any] | None = None
    """The steps of this epoch before a stop (`jtricks.training.partial`), if it resumes
    one."""

    @property
    def done_after(self) -> int:
        return self.done + self.num_steps


def _record(pending: Dispatched):
    """An epoch's record from its metrics; also the streak, the steps done in the call and
    whether the stream ran out."""
    metrics, epoch, step = pending.metrics, pending.epoch, pending.step
    data_state = metrics.pop("data_state", None)
    ended = bool(metrics.pop("ended", False))
    step_rows = metrics.pop("step_rows", None)
    metrics = jax.device_get(metrics)
    steps_done = int(metrics.pop("steps_done"))
    streak = int(metrics.pop("streak"))
    first_loss = metrics.pop("first_loss")
    if pending.partial is not None:  # the epoch's steps before a stop count too
        metrics = merge(metrics, steps_done, pending.partial)
    record: dict[str, Any] = {"epoch": epoch + 1, "step": step + steps_done}
    if step == 0:  # the untrained model's loss on the first batch, for the warning
        record["initial_loss"] = record_value("initial_loss", first_loss)
    flags = metrics.pop("nonfinite", None)
    for k, v in metrics.items():
        name = "lr" if k == "learning_rate" else k if k.startswith("val_") else f"train_{k}"
        record[name] = record_value(name, v)
    if flags is not None:
        record["train_nonfinite"] = int(flags)
    if data_state is not None:
        record["data_state"] = data_state
    if step_rows is not None:  # taken out by the loop before anyone sees the record
        record["step_rows"] = step_rows
    return record, streak, pending.done + steps_done, ended


def _run_callbacks(callbacks, record, state, history, pipelined):
    """Run the callbacks on an epoch's record; returns the state to continue from and
    whether to stop."""
    stop = False
    for cb in callbacks:
        out = cb.on_epoch_end(record, None if pipelined else state)
        if isinstance(out, TrainState):
            state = out
        elif isinstance(out, StopTraining):
            state = out.state if out.state is not None else state
            history.stopped = record["stopped"] = out.reason or type(cb).__name__
            stop = True
        elif out:
            stop = True
    if stop and pipelined:
        raise RuntimeError("a callback with needs_state=False must not stop training")
    return state, stop


class _FiniteKeeper:
    """Keeps on device the newest state that evaluated finite: the initial one, then the
    end of every epoch whose record is finite and sane (`_finite_record`). A state is copied before
    the epoch that would donate it only when it may be needed (always when epochs are
    pipelined, since the next one is dispatched before this one's record is read)."""

    def __init__(self, *, enabled: bool, always_copy: bool) -> None:
        self.enabled, self.always_copy = enabled, always_copy
        self.good: TrainState | None = None
        self.initial_loss: float | None = None
        self._promote_next = False
        self._start: TrainState | None = None

    def starting(self, state: TrainState) -> None:
        wanted = self.always_copy or self._promote_next or self.good is None
        self._start = _device_copy(state) if self.enabled and wanted else None

    def take_start(self) -> TrainState | None:
        start, self._start = self._start, None
        return start

    def started(self, start: TrainState | None) -> None:
        if start is not None and (self.good is None or self._promote_next):
            self.good, self._promote_next = start, False

    def epoch_end(self, record: dict[str, Any], upcoming_start: TrainState | None) -> None:
        self.initial_loss = record.get("initial_loss", self.initial_loss)
        if not _finite_record(record, self.initial_loss):
            return
        if upcoming_start is not None:
            self.good = upcoming_start
        else:
            self._promote_next = True


def _finite_record(record: dict[str, Any], initial_loss: float | None = None) -> bool:
    """Whether an epoch's end state evaluated finite and sane: its validation loss (when
    there is one), its parameter norm and the epoch's training loss are finite, and its
    loss is at most 10x the untrained model's (``initial_loss``, when known) - an
    exploded state whose loss is merely huge is not worth keeping."""
    keys = ("val_loss", "train_param_norm", "train_loss")
    if not all(np.all(np.isfinite(record[k])) for k in keys if k in record):
        return False
    loss = record.get("val_loss", record.get("train_loss"))
    return initial_loss is None or loss is None or float(np.mean(loss)) <= 10 * initial_loss


def _diverged(history, record, keeper, state, streak: int, end_step: int) -> TrainState:
    """Mark the run diverged and return the state it ends with: the kept finite one."""
    kept = keeper.good if keeper.enabled and keeper.good is not None else state
    history.diverged = record["diverged"] = True
    history.kept_step = int(np.ravel(jax.device_get(kept.step))[0])
    history.stopped = record["stopped"] = (
        f"{streak} consecutive steps had a non-finite loss or gradient or overflowed the "
        f"parameters (up to step {end_step}); training stopped there and kept the state of "
        f"step {history.kept_step}, the last whose loss was finite and at most 10x the "
        "untrained model's"
    )
    return kept


def first_member(state: TrainState) -> TrainState:
    """Member 0 of stacked (ensemble) states; a single state itself."""
    return jax.tree.map(lambda a: a[0], state) if is_ensemble(state) else state


def record_value(name: str, value: Any) -> float | list[float]:
    """A metric for a record: a float; an ensemble's per-member training metrics become
    their mean, its ``member_*`` metrics a list (one value per member)."""
    if np.ndim(value) == 0:
        return float(value)
    if "member_" in name:
        return np.asarray(value, np.float64).tolist()
    return float(np.mean(value))
