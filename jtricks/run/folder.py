"""A run's folder and state at its start: created new (``config.json`` first, with the
data's digest and the run's identity), or restored from ``--resume``'s newest intact
checkpoint with its history and callbacks, in one process or several.

`jtricks.run.runner.train` calls `start` once the data and the pieces are built; the
`Run` it returns is what `fit` writes through (metrics, step records, checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from jax.experimental.multihost_utils import sync_global_devices

from jtricks.errors import ConfigError
from jtricks.run.build import Build, initial_state, with_pretrained
from jtricks.run.config import TrainConfig
from jtricks.run.data import RunData
from jtricks.run.extend import lengthened, record_extension, whole_last_epoch
from jtricks.run.outputs import read_steps, record_logs
from jtricks.run.resume import config_digest, foreign_checker, new_identity, run_identity
from jtricks.rundir import create_run_dir, environment, write_json, write_jsonl
from jtricks.training import TrainState
from jtricks.training.checkpoint import (
    RUN_META,
    CheckpointError,
    best_checkpoint,
    restore,
    restore_latest,
)
from jtricks.training.checkpointer import Checkpointer, remove_leftovers
from jtricks.training.data_checks import check_data
from jtricks.training.state import first_member
from jtricks.training.tensorboard import writer_class


@dataclass
class Run:
    """The run folder of a started run: where it is, the records restored from its
    checkpoint, and the callbacks that write it."""

    dir: Path | None
    records: list[dict[str, Any]]
    checkpointer: Checkpointer | None
    callbacks: list[Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    """The step records kept from before a resume (``steps.jsonl`` up to its checkpoint)."""
    data_state: Any = None
    """A stream's position saved with an interrupted (mid-epoch) checkpoint."""
    partial_epoch: Any = None
    """The cut epoch's metrics so far, saved with an interrupted (mid-epoch) checkpoint."""


def start(
    config: TrainConfig,
    data: RunData,
    b: Build,
    out: Any,
    resume: Any,
    locks: contextlib.ExitStack,
) -> tuple[TrainState, Run]:
    """Create the state (checked against the task before any folder exists), then the run
    folder, or restore both from ``resume``'s newest intact checkpoint."""
    state = initial_state(config, b, data.example)
    if not data.on_disk:  # a mismatch leaves nothing behind
        one = first_member(state)  # an ensemble's member 0; a single state itself
        check_data(one, b.task, data.train, "training data")
        check_data(one, b.task, data.test, "test data")
    state, said = with_pretrained(config, b, state, load=resume is None)
    if said is not None and jax.process_index() == 0:
        print(f"jtricks: {said}", file=sys.stderr)
    if out is None:
        for name in ("tensorboard", "profile"):
            if getattr(config, name):
                raise ConfigError(f"{name} writes into the run folder: give out", param="out")
        return state, Run(None, [], None, b.callbacks)
    if config.tensorboard:
        writer_class()  # installed? (before the folder exists)
    if jax.process_index() > 0:  # another process of a multi-process run
        return other_process(config, b, state, Path(out), resume)
    run_dir = Path(out) if resume is not None else create_run_dir(out, locks)
    records: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    cut: dict[str, Any] = {}
    settings = config.to_dict()
    if resume is not None:
        state, records, cut = restore_run(run_dir / "checkpoints", state, b, settings)
        record_extension(run_dir, settings)  # the new length, when trained on past its end
        write_jsonl(run_dir / "metrics.jsonl", records)  # drop epochs after the checkpoint
        if config.log_every_steps is not None:  # and the steps after it: they run again
            done = int(first_member(state).step)
            steps = read_steps(run_dir / "steps.jsonl", done, config.log_every_steps)
            write_jsonl(run_dir / "steps.jsonl", steps)
    else:
        write_json(
            run_dir / "config.json",
            {
                "config": settings,
                "config_sha256": config_digest(json.loads(json.dumps(settings))),
                **data.recorded(),
                "run": new_identity(settings),
                "environment": environment(),
            },
        )
    resumed_at = int(first_member(state).step) if resume is not None else None
    logs = record_logs(run_dir, config, locks, resumed_at)
    if jax.process_count() > 1:  # the folder is there: the other processes go on
        sync_global_devices("jtricks: run folder ready")
    ckpt = checkpointer(run_dir, config, b, records)
    return state, Run(run_dir, records, ckpt, [*logs, *b.callbacks, ckpt], steps, **cut)


def checkpointer(run_dir: Path, config: TrainConfig, b: Build, records: list) -> Checkpointer:
    """The run's `Checkpointer` (every process of a multi-process run has one: orbax
    writes each array's shards once, from the process that holds them)."""
    settings = config.to_dict()
    run = run_identity(run_dir)  # every checkpoint says whose it is

    def meta(record: dict[str, Any], state: Any) -> dict[str, Any]:
        return {"callbacks": b.callback_states(), "config": settings, "run": run}

    ckpt = Checkpointer(
        run_dir / "checkpoints",
        every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        meta_fn=meta,
        arrays_fn=b.callback_arrays,
    )
    ckpt.records = list(records)
    ckpt.best = min((r["val_loss"] for r in records), default=None)
    return ckpt


def other_process(
    config: TrainConfig, b: Build, state: TrainState, run_dir: Path, resume: Any
) -> tuple[TrainState, Run]:
    """A process other than 0 of a multi-process run: it waits until process 0 has the
    run folder ready, restores the same checkpoint when resuming, and writes only its part
    of the checkpoints (no metrics, curves or summary: `Run.dir` is ``None``)."""
    records, cut = [], {}
    if resume is not None:
        state, records, cut = restore_run(run_dir / "checkpoints", state, b, config.to_dict())
    sync_global_devices("jtricks: run folder ready")
    ckpt = checkpointer(run_dir, config, b, records)
    return state, Run(None, records, ckpt, [*b.callbacks, ckpt], [], **cut)


def restore_run(
    ckpt_dir: Path, state: TrainState, b: Build, settings: dict[str, Any]
) -> tuple[TrainState, list, dict]:
    """The newest intact checkpoint of this run (another run's are skipped: `foreign_checker`)
    with its history and, for an interrupted checkpoint, where its epoch was cut
    (``partial_epoch``, a stream's ``data_state``), with the callbacks' saved states."""
    foreign = foreign_checker(run_identity(ckpt_dir.parent), settings)
    _remove_cut_writes(ckpt_dir)
    like = {"swa": state.params} if b.swa is not None else None  # SWA's average
    try:
        restored = restore_latest(
            ckpt_dir, state, required=RUN_META, foreign=foreign, arrays_like=like
        )
    except CheckpointError as e:
        raise ConfigError(f"cannot resume {str(ckpt_dir.parent)!r}: {e}", param="resume") from None
    if restored is None:
        return state, [], {}
    state, meta = restored
    devices = meta.get("devices")
    if isinstance(devices, int) and devices != jax.device_count():
        print(
            f"jtricks: the checkpoint at step {meta['step']} was saved from {devices} device(s) "
            f"in {meta.get('processes', 1)} process(es); restored onto {jax.device_count()} "
            "(its arrays resharded)",
            file=sys.stderr,
        )
    saved = meta.get("callbacks", {})
    if b.plateau is not None and "plateau" in saved:
        b.plateau.load_state_dict(saved["plateau"])
    if b.early is not None and "early_stopping" in saved:
        best_path = best_checkpoint(ckpt_dir)
        best = restore(best_path, state)[0] if best_path is not None else None
        b.early.load_state_dict(saved["early_stopping"], best)
    if b.swa is not None and "swa" in saved:
        b.swa.load_state_dict(saved["swa"], meta.get("arrays"))
    cut = {k: meta[k] for k in ("data_state", "partial_epoch") if meta.get(k) is not None}
    if lengthened(meta.get("config"), settings):  # trained on past the end it was saved for
        at = int(first_member(state).step)
        return state, *whole_last_epoch(meta["history"], cut, at, b.steps_per_epoch)
    return state, meta["history"], cut


def _remove_cut_writes(ckpt_dir: Path) -> None:
    """Process 0 removes what a cut checkpoint write left, saying so, while the other
    processes wait (none may list the checkpoints while it does)."""
    cut_writes = remove_leftovers(ckpt_dir) if jax.process_index() == 0 else []
    if cut_writes:
        print(
            f"jtricks: removed {len(cut_writes)} unfinished checkpoint write(s) a stopped run "
            f"left: {', '.join(cut_writes)}",
            file=sys.stderr,
        )
    if jax.process_count() > 1:
        sync_global_devices("jtricks: cut checkpoint writes removed")
