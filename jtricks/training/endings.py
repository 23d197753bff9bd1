"""How a `fit` run ends early: interrupted by a stop between programs (`interrupt`),
diverged (`diverged`, `end_diverged`), its stream run out (`ran_out`), or an exception
(`settle`). The host loop (`jtricks.training.loop`) calls these; none runs on a run that
trains to its end."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from jtricks.training.history import handed_state
from jtricks.training.partial import summarize
from jtricks.training.state import TrainState, first_member


def end_diverged(record, state, upcoming, callbacks, records_only: bool) -> None:
    """A diverged run's last epoch: the epoch already in flight is discarded, and the
    callbacks see the stopping record with the kept state (``None`` for those that only
    observe records)."""
    if upcoming is not None:
        jax.block_until_ready(upcoming.result.metrics)
    for cb in callbacks:
        cb.on_epoch_end(record, handed_state(cb, state, records_only))


def interrupt(history, callbacks, state, cut, stop, steps_per_epoch: int, partial=None) -> None:
    """Mark the run interrupted at the step its state reached and hand that state to every
    callback's ``on_interrupt(state, info)`` (a `Checkpointer` saves it); ``info`` holds
    the ``step``, the ``epoch`` it falls in (1-based), the ``signal``'s name and, for an
    epoch cut between its parts or chunks, the ``partial_epoch`` summary
    (`jtricks.training.partial.summarize`, with ``partial`` added in) and a stream's
    ``data_state``. ``on_train_end`` is not called: the run is not over."""
    step = int(first_member(state).step)
    name = getattr(stop, "name", None) or "a stop request"
    info = {"step": step, "epoch": step // steps_per_epoch + 1, "signal": name}
    if cut is not None and cut.partial is not None:
        info["partial_epoch"] = summarize(cut.partial, info["epoch"], step, partial)
    if cut is not None and cut.data_state is not None:
        info["data_state"] = cut.data_state
    history.interrupted = info
    history.stopped = f"interrupted by {name} at step {step}"
    for cb in callbacks:
        on_interrupt = getattr(cb, "on_interrupt", None)
        if on_interrupt is not None:
            on_interrupt(state, dict(info, history=list(history.records)))


def settle(callbacks) -> None:
    """After an exception or an interrupt inside `fit`: let every callback that writes in
    the background (a `Checkpointer`) finish what it started and release its threads, so
    the newest checkpoint is on disk and the process can exit. A failure of those writes
    does not hide the error being raised."""
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


def ran_out(step: int) -> str:
    """Why a run ended when its one-shot stream ran out."""
    return f"the training stream ran out at step {step}"


def diverged(history, record, keeper, state, streak: int, end_step: int) -> TrainState:
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
