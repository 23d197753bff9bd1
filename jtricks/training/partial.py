"""An epoch cut by a stop (`jtricks.training.preemption`): its training metrics so far,
kept so that the epoch's record after a resume covers all of its steps.

`fit` stopped between the parts of an epoch (or a stream's chunks) returns
``history.interrupted["partial_epoch"]``: the epoch, the step reached, the number of
steps and the sums of the step metrics so far (`summarize`; JSON, saved in the
interrupted checkpoint's metadata). ``fit(..., partial_epoch=...)`` from that state adds
them into the epoch's means (`merge`)::

    train_m = (S_before + n_after * mean_after) / (n_before + n_after)

so a stopped and resumed epoch records what the uninterrupted epoch records (up to float
rounding: the sums are float32 on the device). The skipped-step count adds up the same
way.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jtricks.errors import ConfigError

FIELDS = ("epoch", "step", "steps", "sums")


def summarize(acc: Any, epoch: int, step: int, before: dict | None = None) -> dict[str, Any]:
    """The summary of an epoch cut after ``acc``'s steps (an accumulator,
    `jtricks.training.epoch.init_accumulator`): the 1-based ``epoch``, the global
    ``step`` reached, the ``steps`` done and the metric ``sums`` (lists for an
    ensemble's members), and ``nonfinite``. ``before``, a summary this call started from
    (a second stop in the same epoch), is added in."""
    host = jax.device_get({k: acc[k] for k in ("sums", "done", "nonfinite") if k in acc})
    sums = {k: np.asarray(v, np.float64) for k, v in host["sums"].items()}
    steps, nonfinite = int(host["done"]), int(host.get("nonfinite", 0))
    if before is not None and before["epoch"] == epoch:
        sums = {k: v + np.asarray(before["sums"].get(k, 0.0)) for k, v in sums.items()}
        steps += int(before["steps"])
        nonfinite += int(before.get("nonfinite", 0))
    return {
        "epoch": epoch,
        "step": step,
        "steps": steps,
        "sums": {k: v.tolist() for k, v in sums.items()},
        "nonfinite": nonfinite,
    }


def merge(metrics: dict[str, Any], steps_done: int, partial: dict[str, Any]) -> dict[str, Any]:
    """An epoch's host ``metrics`` (means over its last ``steps_done`` steps) with the
    ``partial`` summary of the steps before them: the means over all of them."""
    total = int(partial["steps"]) + steps_done
    for name, before in partial["sums"].items():
        if name in metrics:
            after = np.asarray(metrics[name], np.float64) * steps_done
            metrics[name] = (np.asarray(before) + after) / max(total, 1)
    if "nonfinite" in metrics:
        metrics["nonfinite"] = int(metrics["nonfinite"]) + int(partial.get("nonfinite", 0))
    return metrics


def check(partial: Any, step: int, steps_per_epoch: int) -> dict[str, Any] | None:
    """``partial`` if it belongs to a state at global ``step``, mid-epoch; else a
    `ConfigError` naming ``partial_epoch``."""
    if partial is None:
        return None
    if not isinstance(partial, dict) or any(k not in partial for k in FIELDS):
        raise ConfigError(
            f"partial_epoch must be a history.interrupted['partial_epoch'] dict with keys "
            f"{', '.join(FIELDS)}; got {partial!r:.200}",
            param="partial_epoch",
        )
    epoch = step // steps_per_epoch + 1
    if partial["step"] != step or partial["epoch"] != epoch or step % steps_per_epoch == 0:
        raise ConfigError(
            f"partial_epoch is of step {partial['step']} (epoch {partial['epoch']}), but the "
            f"state is at step {step} (epoch {epoch} of {steps_per_epoch} steps); give the "
            "partial_epoch saved with this state",
            param="partial_epoch",
        )
    return partial


__all__ = ["check", "merge", "summarize"]
