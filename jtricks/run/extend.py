"""Training a run on past its end: ``jtricks train --resume RUN --epochs N`` (or
``--steps N``; in Python ``jtricks.train(resume=RUN, epochs=N)``).

The run goes on from its newest checkpoint as if it had been started with the longer
length: data order, dropout keys and a length-free learning-rate schedule are functions
of the seed and the step count, so the extended run ends with the parameters of a run
started with N epochs, bit for bit, and its records are that run's (an epoch the old end
cut short is recorded whole, as after a stop: `jtricks.training.partial`). Finished or
not: an interrupted run extended this way also trains on to N.

``config.json`` then holds the new length, its digest recomputed (jtricks made the edit),
and ``extended``, one entry per extension (``from``, ``to``, ``at``); the run keeps its
identity, and ``summary.json`` is removed until the longer run ends.

Refused before anything is read or written, naming why, where the run's end was more
than its length: a schedule laid over the whole run (``cosine``, ``warmup_cosine``,
``one_cycle``: a longer run has another rate at every step), early stopping or SWA (the
final checkpoint holds their chosen or averaged state, not the one training reached), a
run that diverged or was stopped; also a length that is not longer, the length field the
run does not count, and several processes (one process trains the run on: its
checkpoints restore onto any devices; a two-process extension hung once in four tries,
2026-12-08, and is refused until that is understood).

Whether a restored checkpoint's last epoch was cut by an old end is read from the
checkpoint's own config (`lengthened`, in `jtricks.run.folder.restore_run`), so an
extension stopped before its first checkpoint goes on alike with a plain resume.

New here: orbax restores a state and optax builds schedules, but neither knows a run's
length; this keeps one run's records, config and checkpoints consistent across it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax

from jtricks.errors import ConfigError, check_int
from jtricks.optim.schedules import spans_the_run
from jtricks.run.config import TrainConfig
from jtricks.run.resume import LENGTHS, config_digest
from jtricks.rundir import write_json


def extended(config: TrainConfig, run_dir: Path, length: dict[str, Any]) -> TrainConfig:
    """The run's ``config`` with the longer ``length`` (``{"epochs": N}`` or
    ``{"steps": N}``), checked as the module docstring says.

    Raises:
      ConfigError: naming the length flag, or ``resume`` for a run that cannot go on.
    """
    if len(length) != 1:
        raise ConfigError(
            f"give one of epochs and steps to train {str(run_dir)!r} on; got "
            f"{', '.join(f'{k}={v!r}' for k, v in length.items())}",
            param="epochs",
        )
    ((name, value),) = length.items()
    value = check_int(name, value, low=1)
    counted = "epochs" if config.epochs is not None else "steps"
    recorded = config.epochs if config.epochs is not None else config.steps
    recorded = TrainConfig.DEFAULT_STEPS if recorded is None else recorded
    if name != counted:
        raise ConfigError(
            f"run {str(run_dir)!r} counts {counted} ({counted}={recorded}); to train it on, "
            f"give {counted} (--{counted} N)",
            param=name,
        )
    if value <= recorded:
        raise ConfigError(
            f"{name}={value} does not train run {str(run_dir)!r} on: it has {name}={recorded}; "
            f"give more than {recorded}",
            param=name,
        )
    why = _why_not(config, run_dir)
    if why is not None:
        raise ConfigError(
            f"cannot train {str(run_dir)!r} on past its end: {why}; start a new run from its "
            f"final weights instead: --pretrained {run_dir}",
            param="resume",
        )
    return dataclasses.replace(config, **{name: value})


def _why_not(config: TrainConfig, run_dir: Path) -> str | None:
    """Why the run's end was more than its length, or ``None``."""
    if jax.process_count() > 1:
        return "extend a run from one process (its checkpoints restore onto any devices)"
    if config.early_stopping is not None:
        return "it stops early (--early-stopping), and its end holds the best epoch's state"
    if config.swa is not None:
        return "its end holds SWA's average (--swa), not the state training reached"
    if spans_the_run(config.schedule):
        return (
            f"its schedule {config.schedule!r} is laid over the whole run, so a longer run "
            "has another learning rate at every step"
        )
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # unfinished (or unreadable: the resume reads the checkpoints)
    if not isinstance(summary, dict):
        return None
    if summary.get("diverged"):
        return "it diverged"
    if summary.get("stopped"):
        return f"it stopped before its end ({summary['stopped']})"
    return None


def record_extension(run_dir: Path, settings: dict[str, Any]) -> bool:
    """Write the new length into ``run_dir/config.json`` (its digest anew, the extension
    listed under ``extended``) and remove ``summary.json``; ``False`` when ``settings``
    have the recorded length (nothing to do)."""
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    before = {k: saved["config"].get(k) for k in LENGTHS}
    after = {k: settings.get(k) for k in LENGTHS}
    if before == after:
        return False
    plain = json.loads(json.dumps(settings))
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    saved.update(config=plain, config_sha256=config_digest(plain))
    saved["extended"] = [*saved.get("extended", []), {"from": before, "to": after, "at": at}]
    write_json(path, saved)
    (run_dir / "summary.json").unlink(missing_ok=True)
    return True


def lengthened(saved: Any, settings: dict[str, Any]) -> bool:
    """Whether ``settings`` give the run another length than ``saved``, the config a
    checkpoint was written with (``False`` for a checkpoint that holds none): the run is
    being trained on past the end that checkpoint was saved for, so its records are taken
    as the longer run's (`whole_last_epoch`). Read from the checkpoint rather than from
    ``config.json``, so that an extension cut before its first checkpoint goes on alike
    when the run is resumed."""
    if not isinstance(saved, dict):
        return False
    return any(saved.get(k) != settings.get(k) for k in LENGTHS)


def whole_last_epoch(
    records: list[dict[str, Any]], cut: dict[str, Any], step: int, steps_per_epoch: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A finished run's records and checkpoint extras for going on from ``step``: when
    the old end cut its last epoch short, that epoch's record becomes the
    ``partial_epoch`` the next one is merged with (`jtricks.training.partial.merge`:
    its training means times its steps; the parameter norm is the new end's), so the
    epoch is recorded once, whole."""
    last = records[-1] if records else None
    if "partial_epoch" in cut or last is None or last.get("step") != step:
        return records, cut
    if step % steps_per_epoch == 0:
        return records, cut
    steps = step - (last["epoch"] - 1) * steps_per_epoch
    sums = {
        ("learning_rate" if k == "lr" else k.removeprefix("train_")): v * steps
        for k, v in last.items()
        if (k == "lr" or k.startswith("train_"))
        and k not in ("train_nonfinite", "train_param_norm")
        and isinstance(v, int | float)
    }
    partial = {"epoch": last["epoch"], "step": step, "steps": steps, "sums": sums}
    partial["nonfinite"] = int(last.get("train_nonfinite", 0))
    cut = {**cut, "partial_epoch": partial}
    if last.get("data_state") is not None:  # a stream goes on from where the old end left it
        cut["data_state"] = last["data_state"]
    return records[:-1], cut


__all__ = ["extended", "lengthened", "record_extension", "whole_last_epoch"]
