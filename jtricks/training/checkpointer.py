"""The checkpointing callback of `fit`, on orbax's ``CheckpointManager``.

orbax does the writing: background saves, atomic commits, keep-the-last-N, clean-up of
temporary folders left by a crash. New here: the best epoch is held on device and written
lazily, with the next periodic checkpoint, into a second manager (``best/``); every
checkpoint carries jtricks' SHA-256 manifest (`jtricks.training.checkpoint`); a failed
write is raised as one `WriteError` naming the checkpoint, with nothing half-written left.
"""

from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental.multihost_utils import sync_global_devices

from jtricks.errors import ConfigError, WriteError
from jtricks.training.checkpoint import (
    INTERRUPTED,
    PREFIX,
    TMP,
    EpochNames,
    ManifestRename,
    check_space,
    items,
    list_checkpoints,
    quiet_writer_failures,
    save,
)
from jtricks.training.state import TrainState
from jtricks.training.state import device_copy as _device_copy


def epoch_manager(
    directory: Path, *, keep: int, background: bool, name: str = "epochs"
) -> ocp.CheckpointManager:
    """An orbax manager of ``epoch-NNNNNN`` checkpoints in ``directory``, keeping the newest
    ``keep``, written in the background or not.

    ``name`` prefixes the manager's barriers across processes: orbax names a background
    write's barriers after the checkpoint's folder (``epoch-000005``), so the epochs' and
    ``best/``'s managers writing the same epoch at once would meet at one barrier."""
    options = ocp.CheckpointManagerOptions(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=f"jtricks-{name}"
        ),
        max_to_keep=keep,
        step_name_format=EpochNames(),
        temporary_path_class=ManifestRename,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=background,
        save_root_metadata=False,
    )
    return ocp.CheckpointManager(
        directory.absolute(), options=options, item_names=("state", "meta", "arrays")
    )


class Checkpointer:
    """Fit callback: save every ``every`` epochs (and at the end), keep the last ``keep``,
    and keep the best epoch by ``monitor`` in ``directory/best``.

    The best state is held on device when it improves and written just before the next
    periodic checkpoint (and at the end), so a run whose validation loss improves every
    epoch does not pay a disk write per epoch; ``best`` on disk always matches the newest
    periodic checkpoint's view of the run, which is what a resume continues from.

    ``meta_fn(record, state)`` may add JSON-able data (e.g. callback states) to each
    checkpoint's metadata; the fit history so far is always included. ``arrays_fn()`` may
    return named array trees a callback keeps beside the state (`SWA`'s average: its
    ``arrays()``), written with each epoch's and an interrupted checkpoint (`items`).

    With ``background=True`` (the default) orbax writes a checkpoint while training goes
    on: the callback hands it a device copy of the state (the next epoch donates its
    buffers) and returns; the next save first waits for the one before, so at most one is
    in flight. A crash loses at most the checkpoint being written and resume falls back to
    the previous one; `on_train_end` waits for every write, and a failed write is raised at
    the next checkpoint or at the end. ``background=False`` writes before returning.
    With several processes every process has a Checkpointer and writes its shards in the
    background too; orbax's writer threads meet at coordination-service barriers, named
    apart for the epochs and ``best/`` (see `epoch_manager`).

    Saving epoch ``e`` first removes any checkpoint of epoch ``e`` or later: they belong to
    a run this one is rewriting (a resume past a damaged checkpoint).

    When `fit` stops a diverging run it passes the state it kept (the last that evaluated
    finite) with the record marked ``diverged``; that state is written as the newest
    checkpoint and as ``best``, so ``--pretrained RUN`` continues from it.
    """

    takes_copy = True  # reads the state: fit runs the next epoch meanwhile (`Callback`)

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int = 1,
        keep: int = 3,
        monitor: str | None = "val_loss",
        mode: str = "min",
        meta_fn=None,
        arrays_fn=None,
        background: bool = True,
    ) -> None:
        if every < 1 or keep < 1:
            raise ConfigError(
                f"every and keep must be >= 1; got every={every}, keep={keep}", param="checkpoint"
            )
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max'; got {mode!r}", param="mode")
        self.directory = Path(directory)
        self.every, self.keep, self.monitor, self.mode = every, keep, monitor, mode
        self.meta_fn, self.arrays_fn, self.background = meta_fn, arrays_fn, background
        self.records: list[dict[str, Any]] = []
        self.best: float | None = None
        self._last_saved_epoch: int | None = None
        self._epoch_state: weakref.ref | None = None  # no reference: its buffers go
        self._pending_best: tuple[int, TrainState, dict[str, Any]] | None = None
        self._managers: dict[str, ocp.CheckpointManager] = {}
        self._in_flight: dict[str, Path] = {}

    def _manager(self, which: str) -> ocp.CheckpointManager:
        if which not in self._managers:
            folder = self.directory / "best" if which == "best" else self.directory
            keep = 1 if which == "best" else self.keep
            self._managers[which] = epoch_manager(
                folder, keep=keep, background=self.background, name=which
            )
        return self._managers[which]

    def _write(
        self, which: str, epoch: int, state: TrainState, meta: dict[str, Any], arrays=None
    ) -> None:
        """Hand checkpoint ``epoch`` (with the callbacks' ``arrays``) to the ``which``
        manager ("epochs" or "best")."""
        quiet_writer_failures()
        self._finish(which)
        manager = self._manager(which)
        path = Path(manager.directory) / EpochNames().build_name(epoch)
        self._in_flight[which] = path
        with self._reported(which):
            for step in manager.all_steps():
                if step >= epoch:
                    manager.delete(step)
            if which == "epochs":  # an interrupted checkpoint this one supersedes
                for old in list_checkpoints(self.directory / INTERRUPTED):
                    if int(old.name.removeprefix(PREFIX)) <= epoch:
                        shutil.rmtree(old, ignore_errors=True)
            check_space(Path(manager.directory), state, arrays=arrays)
            manager.save(epoch, args=items(state, meta, arrays), force=True)
        if not self.background:
            self._finish(which)

    def _finish(self, which: str) -> None:
        """Wait for the ``which`` manager's save in flight; raise its failure."""
        if which in self._managers:
            with self._reported(which):
                self._managers[which].wait_until_finished()
        self._in_flight.pop(which, None)

    def _reported(self, which: str | None):
        return _Reported(self._in_flight.get(which), self.directory, lambda: self._settle(which))

    def _settle(self, failed: str | None) -> None:
        """Let every writer but ``failed`` finish its save in flight (their own failures
        are not reported: the first one is), so no temporary folder is removed mid-write."""
        for which, manager in self._managers.items():
            if which != failed:
                try:
                    manager.wait_until_finished()
                except Exception:  # the run stops with the first failure
                    pass

    def wait(self) -> None:
        """Block until every checkpoint handed to orbax is on disk (every writer waited
        for, also after one failed; the first failure is raised)."""
        failure = None
        for which in list(self._managers):
            try:
                self._finish(which)
            except WriteError as e:
                failure = failure or e
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Wait for the writes, then release orbax's threads; a failed save's temporary
        folders are removed once no writer can still add to them."""
        try:
            self.wait()
        finally:
            for manager in self._managers.values():
                manager.close()
            self._managers.clear()
            remove_leftovers(self.directory)

    def _meta(self, record: dict[str, Any], state: TrainState) -> dict[str, Any]:
        meta = {
            "epoch": record["epoch"],
            "step": record["step"],
            "history": list(self.records),
            "best": self.best,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
        }
        if self.meta_fn is not None:
            meta.update(self.meta_fn(record, state))
        return meta

    def _keep_best(self, record: dict[str, Any], state: TrainState) -> None:
        # a device copy (the next epoch donates ``state``); written with the next checkpoint
        self._pending_best = (record["epoch"], _device_copy(state), self._meta(record, state))

    def on_epoch_end(self, record: dict[str, Any], state: TrainState) -> None:
        self.records.append(record)
        self._epoch_state = weakref.ref(state)  # compared by identity at the end, never read
        if record.get("diverged"):  # `fit` passes the kept state: it is the run's final word
            self._keep_best(record, state)
            self._save(record, state)
            return
        value = record.get(self.monitor) if self.monitor else None
        improved = (
            value is not None
            and np.isfinite(value)
            and (
                self.best is None
                or (value < self.best if self.mode == "min" else value > self.best)
            )
        )
        if improved:
            self.best = float(value)
            self._keep_best(record, state)
        if record["epoch"] % self.every == 0:
            self._save(record, state)

    def on_train_end(self, state: TrainState) -> None:
        """Save the final state unless the last epoch's checkpoint holds it already: a
        callback before this one that replaced the state at the end (SWA's average, early
        stopping's best epoch when patience never ran out) had it written over that
        checkpoint, so the newest checkpoint is the state the run reports."""
        replaced = self._epoch_state is None or state is not self._epoch_state()
        if self.records and (replaced or self._last_saved_epoch != self.records[-1]["epoch"]):
            self._save(self.records[-1], state)
        self._flush_best()
        self.close()

    def on_interrupt(self, state: TrainState, info: dict[str, Any]) -> None:
        """`fit` was stopped (`jtricks.training.preemption`): wait for the writes in flight,
        write the best state held on device, then ``state`` (the step ``info["step"]``
        reached, maybe mid-epoch) as ``interrupted/epoch-NNNNNN`` (the epoch it falls in),
        synchronously; `restore_latest` prefers it to the epoch checkpoints before it.
        Its metadata holds ``interrupted: true``, the ``step``, the records of the
        finished epochs, the cut epoch's ``partial_epoch`` (`jtricks.training.partial`)
        and a stream's ``data_state``."""
        self.wait()
        self._flush_best()
        self.wait()
        record = {"epoch": len(info["history"]), "step": info["step"]}
        meta = self._meta(record, state)
        meta.update(interrupted=True, signal=info.get("signal"))
        for name in ("partial_epoch", "data_state"):
            if info.get(name) is not None:
                meta[name] = info[name]
        folder = self.directory / INTERRUPTED
        if jax.process_index() == 0:  # one process clears the folder, then all write
            for old in list_checkpoints(folder):
                shutil.rmtree(old, ignore_errors=True)
        if jax.process_count() > 1:
            sync_global_devices("jtricks: interrupted checkpoint")
        save(folder, EpochNames().build_name(info["epoch"]), state, meta, self._arrays())
        self.close()

    def _flush_best(self) -> None:
        if self._pending_best is not None:
            self._write("best", *self._pending_best)
            self._pending_best = None

    def _save(self, record: dict[str, Any], state: TrainState) -> None:
        if self._pending_best is not None:  # two saves at once: room for both, first
            path = self.directory / EpochNames().build_name(record["epoch"])
            with _Reported(path, self.directory, lambda: self._settle(None)):
                check_space(self.directory, state, copies=2)
        self._flush_best()  # the best so far goes to disk with every checkpoint
        if self.background:  # the next epoch donates ``state``: orbax gets a device copy
            state = _device_copy(state)
        meta = self._meta(record, state)
        self._write("epochs", record["epoch"], state, meta, self._arrays())
        self._last_saved_epoch = record["epoch"]

    def _arrays(self) -> dict[str, Any] | None:
        """The callbacks' arrays (``arrays_fn``); a callback replaces its arrays rather than
        writing into them, so a background write may read them while training goes on."""
        return None if self.arrays_fn is None else self.arrays_fn()


def remove_leftovers(directory: Path) -> list[str]:
    """Remove the temporary folders (``.tmp-*``) failed or cut saves left in
    ``directory``, its ``best/`` and ``interrupted/`` (committed checkpoints are never
    named so); returns their paths relative to ``directory``."""
    removed = []
    for root in (directory, directory / "best", directory / INTERRUPTED):
        for leftover in sorted(root.glob(f"{TMP}*")) if root.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(str(leftover.relative_to(directory)))
    return removed


class _Reported:
    """Turn an orbax failure into one `WriteError` naming the checkpoint, after the other
    writers have finished (``settle``: the best state's writer and the epochs' run side
    by side, and removing a temporary folder another is still writing would leave a
    committed checkpoint without its files) and the temporary folders are removed (the
    committed checkpoints are untouched)."""

    def __init__(self, path: Path | None, directory: Path, settle: Any) -> None:
        self.path, self.directory, self.settle = path, directory, settle

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        self.settle()
        remove_leftovers(self.directory)
        raise WriteError(f"checkpoint {self.path or self.directory}", error) from None
