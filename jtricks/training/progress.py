"""Progress display for `fit`: a rich progress bar plus one printed line per epoch."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def format_record(record: dict[str, Any]) -> str:
    """One line per epoch: train loss, validation loss and the task's headline metric
    (``val_acc`` for classification), steps/s."""
    parts = [
        f"epoch {record['epoch']:>3}",
        f"step {record['step']:>6}",
        f"train_loss {record['train_loss']:.4f}",
    ]
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
        metric = next(
            (
                k
                for k, v in record.items()
                if k.startswith("val_")
                and k != "val_loss"
                and not k.startswith(("val_ema_", "val_member_"))
                and isinstance(v, float)
            ),
            None,
        )
        if metric is not None:
            name = "val_acc" if metric == "val_accuracy" else metric
            parts.append(f"{name} {record[metric]:.4f}")
    parts.append(f"steps/s {record['steps_per_s']:,.0f}")
    return "  ".join(parts)


class RichReporter:
    """Shows a progress bar over all steps and prints `format_record` after each epoch.

    With ``every=k`` only the first, every k-th and the last epoch are printed. On a
    terminal the bar redraws in place; elsewhere (CI, files) only the lines appear.
    Inside an epoch run in parts (`fit`'s ``chunk``) the bar advances after each part
    with the epoch's running training loss; elsewhere an ``(in progress)`` line is
    printed after a part when ``in_progress_s`` seconds passed since the last line.
    """

    def __init__(
        self, *, file: TextIO | None = None, every: int = 1, in_progress_s: float = 30.0
    ) -> None:
        self.console = Console(file=file or sys.stdout, highlight=False)
        self.every = max(1, every)
        self.in_progress_s = in_progress_s
        self._last_line = time.monotonic()
        self._progress: Progress | None = None
        self._task = None
        self._total = 0

    def start(self, *, total_steps: int, done: int = 0) -> None:
        self._total = total_steps
        self._progress = Progress(
            TextColumn("training {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("", total=total_steps, completed=done)

    def epoch_end(self, record: dict[str, Any], *, done: int) -> None:
        if record["epoch"] == 1 or record["epoch"] % self.every == 0 or done >= self._total:
            self.console.print(format_record(record), soft_wrap=True)
            self._last_line = time.monotonic()
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def part_end(self, *, epoch: int, step: int, loss: float, done: int) -> None:
        """A part of a long epoch finished (`fit`'s ``chunk``) at global ``step``: the bar
        advances to ``done`` steps of the call and shows the epoch's running training
        loss."""
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, description=f"epoch {epoch} loss {loss:.4f}"
            )
        if (
            not self.console.is_terminal
            and time.monotonic() - self._last_line >= self.in_progress_s
        ):
            self.console.print(
                f"epoch {epoch:>3}  step {step:>6}  train_loss {loss:.4f}  (in progress)",
                soft_wrap=True,
            )
            self._last_line = time.monotonic()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
