"""`load_run`: the model a run folder trained, back in Python with the preprocessing it
trained on, to evaluate it or predict on new inputs.

New here: orbax restores arrays into a given structure, and `jtricks.training.transfer`
copies matching layers into another model; this rebuilds the run's own model, optimizer
and input scaling from its ``config.json`` (the scaler fitted on the training rows and the
data's shapes, which the folder records: the dataset is not read again, so a folder whose
data moved still loads; an older folder's is read) and restores its last or best
checkpoint, the run identity checked as ``--resume`` checks it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from jtricks.data import Scaler
from jtricks.errors import ConfigError
from jtricks.run.build import build, initial_state
from jtricks.run.config import TrainConfig
from jtricks.run.data import RunData, load_run_data
from jtricks.run.outputs import RawModel
from jtricks.run.resume import foreign_checker, load_run_config, run_identity
from jtricks.tasks import Task
from jtricks.training.checkpoint import CheckpointError, restore_latest
from jtricks.training.state import TrainState, first_member


@dataclass
class LoadedRun(RawModel):
    """A trained run: its ``config``, the restored ``state`` (a stacked one for
    ``--ensemble``), the ``scaler`` its inputs went through (``None``: token ids, as they
    are) and the ``epoch`` and ``step`` of the state read (a run stopped early saves the
    best epoch's state last: its epoch and step, not the stopping epoch's)."""

    config: TrainConfig
    state: TrainState
    scaler: Scaler | None
    epoch: int
    step: int
    tta: tuple[Any, jax.Array] | None = field(default=None, repr=False)
    """With ``--tta V``: the views' augmentation and the key the run's summary used."""
    task: Task | None = field(default=None, repr=False)
    """The run's task: how an ensemble's outputs combine into one prediction."""
    classes: tuple[str, ...] | None = None
    """The class names, where the data named them (see `RawModel`)."""


def load_run(run_dir: str | os.PathLike, *, best: bool = False) -> LoadedRun:
    """The model run folder ``run_dir`` trained: its newest checkpoint (the end of a
    finished run, or the newest intact one of a stopped run), or with ``best`` the epoch of
    the lowest validation loss (``checkpoints/best``).

    Raises:
      ConfigError (``param="run"``): not a run folder, an edited ``config.json``, no
        checkpoint there, or none of this run's that restores.

    Example:
      >>> run = load_run("runs/a")
      >>> run.predict(new_x).argmax(-1)   # raw inputs: the run's scaling is applied
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir, param="run")
    recorded = json.loads((run_dir / "config.json").read_text())
    shapes = recorded.get("shapes")  # older folders: the dataset is read again
    data = RunData.from_shapes(shapes) if shapes is not None else load_run_data(config)
    if recorded.get("target_scale") is not None:  # as fitted when the run started
        data.target_scale = recorded["target_scale"]
    b = build(config, data, None, False, rebuild=True)
    state = initial_state(config, b, data.example)
    folder = run_dir / "checkpoints" / ("best" if best else "")
    foreign = foreign_checker(run_identity(run_dir), config.to_dict())
    try:
        restored = restore_latest(folder, state, foreign=foreign)
    except CheckpointError as e:
        raise ConfigError(f"cannot load {str(run_dir)!r}: {e}", param="run") from None
    if restored is None:
        raise ConfigError(f"cannot load {str(run_dir)!r}: no checkpoint in {folder}", param="run")
    state, meta = restored
    saved = recorded.get("scaler")
    scaler = Scaler.from_json(saved) if saved is not None else data.scaler  # older folders
    step = int(first_member(state).step)  # early stopping saves the kept state last
    kept = [r["epoch"] for r in meta.get("history", ()) if r.get("step") == step]
    epoch = kept[-1] if kept else int(meta["epoch"])  # mid-epoch (interrupted): no record
    tta = None if b.tta_augment is None else (b.tta_augment, b.tta_key)
    return LoadedRun(config, state, scaler, epoch, step, tta, b.task, data.classes)
