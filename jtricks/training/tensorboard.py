"""TensorBoard event files of a run's records: `TensorBoard`, a `fit` callback.

Every numeric entry of an epoch's record becomes a scalar at the record's global
``step`` (``train_loss``, ``val_accuracy``, ``lr``, ``train_grad_norm``, ...; the
epoch number as ``epoch``); an ensemble's per-member lists become ``<name>/member_<i>``. Per-step records
(``fit(log_every_steps=N)``) become ``step/<name>`` (``step/loss``, ``step/lr``,
``step/grad_norm``, ...) at their step. The run's config, when given,
is written once as text. Written by tensorboardX, which needs no TensorFlow (``pip
install 'jtricks[tensorboard]'``); view with ``tensorboard --logdir RUN/tensorboard``.
The run folder's ``metrics.jsonl`` stays the record of the run; the event files are a
view of it. New here: the mapping from jtricks' records (and their member lists) to
scalars; writing the events is tensorboardX's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jtricks.errors import ConfigError


def writer_class() -> Any:
    """tensorboardX's ``SummaryWriter``.

    Raises:
      ConfigError (``param="tensorboard"``): tensorboardX is not installed.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError(
            "tensorboard needs tensorboardX: pip install 'jtricks[tensorboard]' "
            "(or pip install tensorboardX)",
            param="tensorboard",
        ) from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric entries as TensorBoard tags and floats (lists of an ensemble's
    members as ``name/member_i``); ``epoch`` and ``step`` are the axes, not scalars."""
    out: dict[str, float] = {}
    for name, value in record.items():
        if name in ("epoch", "step") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            out.update({f"{name}/member_{i}": float(v) for i, v in enumerate(value)})
    return out


class TensorBoard:
    """A `fit` callback writing every epoch's record as scalars to ``logdir``.

    Args:
      logdir: the folder of the event files (created).
      config: the run's settings, written once as text (``config``), or ``None``.
      purge_step: for a resumed run, the first step it runs again (the restored step
        + 1): TensorBoard hides the events an earlier writer logged at that step or later
        (tensorboardX writes a ``SessionLog.START`` there), so the steps run again are not
        drawn twice. ``config`` is written by a new run only (``purge_step`` None).

    Raises:
      ConfigError: tensorboardX is not installed (when constructed).

    Example:
      >>> with TensorBoard("runs/a/tb") as board:
      ...     fit(state, data, batch_size=100, epochs=10, callbacks=[board])
    """

    needs_state = False  # it only reads records: the next epoch is dispatched meanwhile

    def __init__(
        self,
        logdir: str | os.PathLike,
        config: dict[str, Any] | None = None,
        *,
        purge_step: int | None = None,
    ) -> None:
        self.writer = writer_class()(logdir=str(logdir), purge_step=purge_step)
        if config is not None and purge_step is None:
            text = json.dumps(config, indent=1, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", 0)
            self.writer.flush()

    def on_epoch_end(self, record: dict[str, Any], state: Any) -> bool:
        del state
        step = int(record["step"])
        for tag, value in scalars(record).items():  # NaN and inf too: a diverging run shows
            self.writer.add_scalar(tag, value, step)
        if "epoch" in record:  # the epoch axis against the step axis
            self.writer.add_scalar("epoch", float(record["epoch"]), step)
        self.writer.flush()
        return False

    def on_steps(self, records: list[dict[str, Any]]) -> None:
        """Per-step records (``fit(log_every_steps=N)``) as scalars ``step/<name>`` at
        their step."""
        for record in records:
            step = int(record["step"])
            for tag, value in scalars(record).items():
                self.writer.add_scalar(f"step/{tag}", value, step)
        self.writer.flush()

    def close(self) -> None:
        """Write the queued events and close the file (tensorboardX writes from a
        background queue: events still queued when the process ends are lost)."""
        self.writer.close()

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["TensorBoard", "scalars", "writer_class"]
