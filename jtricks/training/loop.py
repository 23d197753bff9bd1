"""`fit`'s host loop: the one loop over the programs of a `jtricks.training.runs.Run`.

It dispatches each epoch's parts (`run_epoch`; part k+1 is in flight before part k's
records are read), ends the epoch, records it (`EpochResult` -> a record), hands out
step records, shows progress, runs callbacks (checkpoints among them), reads the stop
flag between programs and watches for divergence."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jtricks.errors import StreamError
from jtricks.training import endings
from jtricks.training.arguments import checked_hooks
from jtricks.training.callbacks import StopTraining
from jtricks.training.history import History, handed_state
from jtricks.training.options import FitOptions
from jtricks.training.partial import merge
from jtricks.training.preemption import AgreedStop
from jtricks.training.preemption import stop_requested as _stop_requested
from jtricks.training.profile import Profile
from jtricks.training.runs import Run
from jtricks.training.state import TrainState, device_copy, first_member
from jtricks.training.streaming import evaluate_stream


@dataclass(frozen=True)
class LoopHooks:
    """What the host loop calls and reads besides the programs: the ``callbacks``, the
    progress ``reporter``, the ``stop`` flag read between programs, and the ``partial``
    epoch a resumed run continues (`jtricks.training.partial`)."""

    callbacks: tuple[Any, ...] = ()
    reporter: Any = None
    stop: Any = None
    partial: dict[str, Any] | None = None

    @classmethod
    def of(cls, callbacks: Any, reporter: Any, stop: Any) -> LoopHooks:
        """`fit`'s arguments checked (`jtricks.training.arguments`); in several processes
        the stop flag is the one they agree on (`AgreedStop`: all stop at one point)."""
        if callbacks or reporter is not None or stop is not None:  # defaults need none
            callbacks = checked_hooks(callbacks, reporter, stop)
        if stop is not None and jax.process_count() > 1:
            stop = AgreedStop(stop)
        return cls(tuple(callbacks), reporter, stop)


def stop_requested(stop: Any) -> bool:
    """Whether a stop flag is set (`jtricks.training.preemption.stop_requested`); never
    without one."""
    return stop is not None and _stop_requested(stop)


@dataclass
class EpochResult:
    """What one epoch's programs hand the loop, device arrays until read: the epoch's
    ``metrics`` (`jtricks.training.epoch.epoch_metrics`; ``None`` for an epoch that did
    not end), the step ``rows`` not yet handed out, a stream's ``data_state`` after the
    epoch's last batch, whether the stream ``ended`` (ran out), for an epoch cut by a stop
    between its parts, the ``partial`` accumulator, and the ``start`` state kept for
    divergence (`_FiniteKeeper`) when it was asked for."""

    metrics: dict[str, Any] | None = None
    rows: Any = None
    data_state: Any = None
    ended: bool = False
    partial: dict[str, Any] | None = None
    start: TrainState | None = None

    @property
    def interrupted(self) -> bool:
        return self.partial is not None

    @property
    def streak(self) -> Any:
        """The skipped-step streak at the end (a device array: no host round trip)."""
        return (self.metrics or self.partial)["streak"]


def run_epoch(
    state, streak, run: Run, val, start: int, num_steps: int, options, stop, on_part, keep=False
):
    """Run ``num_steps`` steps of the epoch that ``start`` (global steps done) falls in:
    its parts (``run.parts``) through the run's program, then the epoch's end, with
    validation. One part covering the epoch is one program, end included; otherwise each
    finished part goes to ``on_part(acc, rows)`` once the next one is dispatched (so the
    device never waits for the host), the loop stops early once a part's streak of
    non-finite steps ends training, and a stop (``stop``) between parts returns an
    interrupted `EpochResult`. With ``keep`` the result's ``start`` is a copy of the
    state the epoch began from, made by the epoch's first program."""
    profile, max_streak = options.profile, np.int32(options.max_nonfinite)
    array_val = val if isinstance(val, tuple) else None
    epoch, offset = divmod(start, run.steps_per_epoch)
    parts = run.parts(epoch, offset, num_steps)
    acc, pending, done, last, ended, kept = streak, None, 0, None, False, None
    while (part := _next_part(parts, state)) is not None:
        last, n = part, np.int32(part.steps)
        with traced(profile, start + done, part.steps):
            if not run.split and part.steps == num_steps:  # the whole epoch in one program
                whole = dict(length=part.length, finish=True, keep=keep)
                state, metrics, *kept = run.program(
                    state, acc, part.feed, n, max_streak, array_val, **whole
                )
                result = _ended(metrics, run, state, val, part.data_state)
                return state, _kept(result, kept)
            if not isinstance(acc, dict):  # the epoch's zeroed accumulator
                state, acc, *kept = run.program(
                    state, acc, part.feed, n, max_streak, length=0, finish=False, keep=keep
                )
            state, acc = run.program(
                state, acc, part.feed, n, max_streak, length=part.length, finish=False
            )
        if profile is not None:
            profile.after(start + done + part.steps, state)
        done += part.steps
        previous, pending = pending, (acc, acc.pop("rows", None))
        if previous is not None and part_done(previous, on_part, max_streak):
            break  # diverged: every later step would be masked
        if done < num_steps and stop_requested(stop):
            cut = EpochResult(rows=pending[1], data_state=part.data_state, partial=acc)
            return state, _kept(cut, kept)
    else:
        ended = done < num_steps  # a one-shot stream ran out
    if pending is None:  # nothing came: the stream was already exhausted (nothing donated)
        return state, EpochResult(ended=True, start=state if keep else None)
    state, metrics = run.program(
        state, acc, None, np.int32(0), max_streak, array_val, length=0, finish=True
    )
    result = _ended({**metrics, "step_rows": pending[1]}, run, state, val, last.data_state)
    result.ended = ended
    return state, _kept(result, kept)


def _kept(result: EpochResult, kept: list[Any]) -> EpochResult:
    """``result`` with its ``start``: the state copy the epoch's first program returned
    (``kept``, empty when none was asked)."""
    result.start = kept[0] if kept else None
    return result


def _next_part(parts: Iterator[Any], state) -> Any:
    """The epoch's next part, ``None`` after its last; a stream's failure carries the state
    reached (nothing trained is lost)."""
    try:
        return next(parts, None)
    except StreamError as e:
        e.state = state
        raise


def _ended(metrics, run: Run, state, val, data_state) -> EpochResult:
    """The `EpochResult` of an ended epoch; a validation stream is evaluated here (array
    validation ran inside the epoch's last program)."""
    rows = metrics.pop("step_rows", None)
    if val is not None and not isinstance(val, tuple):
        out = evaluate_stream(run.eval_step, state, val, run.eval_source)
        metrics.update({f"val_{k}": v for k, v in out.items()})
    return EpochResult(metrics, rows, data_state)


def traced(profile: Profile | None, start: int, n: int) -> Any:
    """The profiler's context around a dispatch of ``n`` steps after ``start`` done."""
    return contextlib.nullcontext() if profile is None else profile.before(start, n)


def part_done(pending, on_part, max_streak) -> bool:
    """Hand a finished part's ``(acc, rows)`` to ``on_part``; whether its streak of
    non-finite steps reached ``max_streak`` (every later step would be masked)."""
    acc, rows = pending
    if on_part is not None:
        on_part(acc, rows)
    return int(acc["streak"]) >= int(max_streak)


def run_loop(
    state: TrainState, run: Run, val: Any, options: FitOptions, hooks: LoopHooks
) -> tuple[TrainState, History]:
    """`fit`'s epoch loop: dispatch (ahead of the callbacks where they allow, `Ahead`),
    record, callbacks, divergence (``options``' ``max_nonfinite`` and ``keep_finite``),
    and a stop asked by ``hooks.stop`` between programs (`_interrupt`)."""
    callbacks, reporter = hooks.callbacks, hooks.reporter
    interrupt, partial = hooks.stop, hooks.partial
    history = History()
    start_step = int(first_member(state).step)
    total_steps, steps_per_epoch = run.total_steps, run.steps_per_epoch
    t0 = time.perf_counter()
    if reporter is not None:
        reporter.start(total_steps=total_steps, done=0)
    ahead = Ahead.of(run, callbacks)
    # the last state known to evaluate finite, kept on device; divergence ends with it
    keeper = _FiniteKeeper(options.keep_finite, ahead)

    def dispatch(state, done, streak):
        step = start_step + done
        epoch, offset = divmod(step, steps_per_epoch)
        num_steps = min(steps_per_epoch - offset, total_steps - done)
        on_part = part_listener(history, callbacks, reporter, epoch, step, done)
        state, result = run_epoch(
            state, streak, run, val, step, num_steps, options, interrupt, on_part, keeper.wanted()
        )
        before = partial if partial is not None and step == partial["step"] else None
        return state, Dispatched(result, epoch, step, num_steps, done, before)

    cut: EpochResult | None = None
    try:
        t_last = time.perf_counter()
        state, pending = dispatch(state, 0, np.int32(0))
        while pending is not None:
            upcoming, more = None, pending.done_after < total_steps
            if ahead.dispatch and more and not stop_requested(interrupt):
                state, upcoming = dispatch(state, pending.done_after, pending.result.streak)
            keeper.started(pending.result.start)
            deliver_steps(pending.result.rows, history, callbacks)
            if pending.result.metrics is None:  # stopped between parts, or a stream ran out
                cut = pending.result
                if not cut.interrupted:
                    history.stopped = endings.ran_out(pending.step)
                break
            record, streak, done, ended = _record(pending)
            t_last = _timed(record, pending.step, t_last, t0)
            history.records.append(record)
            if reporter is not None:
                reporter.epoch_end(record, done=done)
            if "train_nonfinite" in record and streak >= options.max_nonfinite:
                state = endings.diverged(history, record, keeper, state, streak, record["step"])
                endings.end_diverged(record, state, upcoming, callbacks, ahead.records_only)
                break
            keeper.epoch_end(record, upcoming.result.start if upcoming is not None else None)
            seen = ahead.handed(upcoming, state)
            new, stop = _run_callbacks(callbacks, record, seen, history, ahead.records_only)
            if ended and not stop:
                history.stopped = record["stopped"] = endings.ran_out(record["step"])
                stop = True
            state, upcoming = ahead.settle(state, upcoming, seen, new, stop)
            if stop:
                break
            if upcoming is not None:
                pending = upcoming
            elif done < total_steps and not stop_requested(interrupt):
                state, pending = dispatch(state, done, np.int32(streak))
            else:
                pending = None
        complete = int(first_member(state).step) >= start_step + total_steps
        if stop_requested(interrupt) and history.stopped is None and not complete:
            endings.interrupt(history, callbacks, state, cut, interrupt, steps_per_epoch, partial)
        else:
            state = _train_end(callbacks, state, ahead.records_only)
    except BaseException:
        endings.settle(callbacks)
        raise
    finally:
        if reporter is not None:
            reporter.close()
    return state, history


@dataclass(frozen=True)
class Ahead:
    """How far the host loop runs ahead of the callbacks (their kinds: `Callback`).

    ``dispatch``: epoch k+1 is dispatched before epoch k's record is read, since every
    callback only observes records or takes a copy of the state (``copies``: the copy
    epoch k+1's program makes of the state it starts from). An epoch in flight when a
    callback stops training or returns a state is discarded (`settle`). Epochs run in
    parts already overlap the host's work."""

    dispatch: bool
    copies: bool

    @classmethod
    def of(cls, run: Run, callbacks: Any) -> Ahead:
        observe = [getattr(cb, "needs_state", True) is False for cb in callbacks]
        copy = [getattr(cb, "takes_copy", False) is True for cb in callbacks]
        if run.split or not all(o or c for o, c in zip(observe, copy, strict=True)):
            return cls(dispatch=False, copies=False)
        return cls(dispatch=True, copies=not all(observe))

    @property
    def records_only(self) -> bool:  # every callback gets None for the state
        return self.dispatch and not self.copies

    def handed(self, upcoming: Dispatched | None, state: TrainState) -> TrainState:
        """The state the callbacks get: the copy the epoch in flight made, or ``state``."""
        return upcoming.result.start if self.copies and upcoming is not None else state

    def settle(self, state, upcoming, seen, new, stop: bool):
        """``(state, upcoming)`` after the callbacks returned ``new`` (``seen`` when they
        changed nothing) and ``stop``: the epoch in flight goes on, or it is discarded and
        the loop goes on from ``new`` (a copy, since the kept state shares its buffers)."""
        if upcoming is None:
            return new, None
        if not self.copies or (new is seen and not stop):
            return state, upcoming
        return (new if stop else device_copy(new)), None


def _timed(record: dict[str, Any], start_step: int, t_last: float, t0: float) -> float:
    """Add ``steps_per_s`` (since ``t_last``) and ``elapsed_s`` (since ``t0``); the time now."""
    now = time.perf_counter()
    record["steps_per_s"] = (record["step"] - start_step) / (now - t_last)
    record["elapsed_s"] = now - t0
    return now


def _train_end(callbacks: Any, state: TrainState, records_only: bool) -> TrainState:
    """Every callback's ``on_train_end(state)`` (not when they only observe records); the
    state a callback returns replaces it (e.g. the best one)."""
    for cb in callbacks:
        end = getattr(cb, "on_train_end", None)
        out = end(state) if end is not None and not records_only else None
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


@dataclass
class Dispatched:
    """An epoch in flight: its ``result`` (device arrays until read), its ``epoch``, the
    global ``step`` it starts at, its ``num_steps``, the steps of this call ``done``
    before it and the ``partial`` epoch it continues."""

    result: EpochResult
    epoch: int
    step: int
    num_steps: int
    done: int
    partial: dict[str, Any] | None = None
    """The steps of this epoch before a stop (`jtricks.training.partial`), if it resumes
    one."""

    @property
    def done_after(self) -> int:
        return self.done + self.num_steps


def _record(pending: Dispatched):
    """An epoch's record from its metrics; also the streak, the steps done in the call and
    whether the stream ran out."""
    result, epoch, step = pending.result, pending.epoch, pending.step
    data_state, ended = result.data_state, result.ended
    metrics = jax.device_get(result.metrics)
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
    return record, streak, pending.done + steps_done, ended


def _run_callbacks(callbacks, record, state, history, records_only):
    """Run the callbacks on an epoch's record; returns the state to continue from and
    whether to stop."""
    stop = False
    for cb in callbacks:
        out = cb.on_epoch_end(record, handed_state(cb, state, records_only))
        if isinstance(out, TrainState):
            state = out
        elif isinstance(out, StopTraining):
            state = out.state if out.state is not None else state
            history.stopped = record["stopped"] = out.reason or type(cb).__name__
            stop = True
        elif out:
            stop = True
    if stop and records_only:
        raise RuntimeError("a callback with needs_state=False must not stop training")
    return state, stop


class _FiniteKeeper:
    """Keeps on device the newest state that evaluated finite: the initial one, then the
    end of every epoch whose record is finite and sane (`_finite_record`). The epoch that
    would donate a state copies it first, inside its own program (`run_epoch`'s
    ``keep``), only when it may be needed (always when epochs are dispatched ahead, since the
    next one is dispatched before this one's record is read)."""

    def __init__(self, enabled: bool, ahead: Ahead) -> None:
        self.enabled, self.ahead = enabled, ahead
        self.good: TrainState | None = None
        self.initial_loss: float | None = None
        self._promote_next = False

    def wanted(self) -> bool:
        """Whether the next epoch should keep a copy of the state it starts from (always
        when the callbacks take copies)."""
        if self.ahead.copies:
            return True
        return self.enabled and (self.ahead.dispatch or self._promote_next or self.good is None)

    def started(self, start: TrainState | None) -> None:
        if self.enabled and start is not None and (self.good is None or self._promote_next):
            self.good, self._promote_next = start, False

    def epoch_end(self, record: dict[str, Any], upcoming_start: TrainState | None) -> None:
        self.initial_loss = record.get("initial_loss", self.initial_loss)
        if not self.enabled or not _finite_record(record, self.initial_loss):
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


def record_value(name: str, value: Any) -> float | list[float]:
    """A metric for a record: a float; an ensemble's per-member training metrics become
    their mean, its ``member_*`` metrics a list (one value per member)."""
    if np.ndim(value) == 0:
        return float(value)
    if "member_" in name:
        return np.asarray(value, np.float64).tolist()
    return float(np.mean(value))
