"""`Profile`: a `jax.profiler` trace of chosen training steps, one annotated dispatch each.

`fit` runs an epoch as one compiled loop, so there is no per-step dispatch to annotate.
``fit(profile=Profile(logdir, 10, 15))`` cuts the epochs that meet steps 10 to 15 so that
each of those steps is its own dispatch of a one-step program (compiled on step 9, before
the trace starts), wraps each in `jax.profiler.StepTraceAnnotation` (``train``, with its
``step_num``, the names TensorBoard's profile plugin groups steps by), and traces them
with `jax.profiler.start_trace` into ``logdir/plugins/profile/<time>/`` (an ``xplane.pb``
and a Chrome ``trace.json.gz``). Open it with ``tensorboard --logdir LOGDIR`` (the
profile plugin, ``pip install tensorboard-plugin-profile``) or drop the
``trace.json.gz`` on https://ui.perfetto.dev. The steps' arithmetic is the same, in
programs of another length. A stream's chunks cannot be cut (the feeder plans them
ahead): there every chunk that meets the range is traced as one annotated dispatch
(``step_num`` its first step).

New here: `jax.profiler` traces and annotates; choosing the steps of a compiled,
chunked training loop and cutting it for them is jtricks' own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import jax

from jtricks.errors import ConfigError, check_int


class Profile:
    """Trace steps ``first`` to ``last`` (numbered from 1 as in the records, inclusive).

    Args:
      logdir: the folder of the trace (created).
      first: the first traced step.
      last: the last traced step (default ``first``).

    Raises:
      ConfigError: steps not ``1 <= first <= last``.
    """

    def __init__(self, logdir: str | os.PathLike, first: int, last: int | None = None) -> None:
        first = check_int("profile", first, low=1)
        last = first if last is None else check_int("profile", last, low=1)
        if last < first:
            raise ConfigError(
                f"profile: the last step ({last}) comes before the first ({first})", param="profile"
            )
        self.logdir = Path(logdir)
        self.lo, self.hi = first - 1, last  # steps done before each traced step: [lo, hi)
        self.tracing = self.done = False

    def pieces(self, start: int, num_steps: int, length: int) -> list[int]:
        """The dispatches of ``num_steps`` steps after ``start`` done: one per step inside
        the range and for the step before it (it compiles the one-step program outside
        the trace); elsewhere up to ``length`` steps each."""
        cuts = [] if self.done else sorted({max(self.lo - 1, 0), self.lo, self.hi})
        out, done = [], start
        end = start + num_steps
        while done < end:
            single = bool(cuts) and self.lo - 1 <= done < self.hi
            stop = min([c for c in cuts if c > done] + [end, done + length])
            n = 1 if single else stop - done
            out.append(n)
            done += n
        return out

    def meets(self, start: int, num_steps: int) -> bool:
        """Whether steps ``start .. start + num_steps`` (done before each) meet the range."""
        return not self.done and start < self.hi and start + num_steps > self.lo

    def before(self, start: int, num_steps: int) -> contextlib.AbstractContextManager:
        """Called around the dispatch of ``num_steps`` steps after ``start`` done: starts
        the trace at the range, and annotates a dispatch inside it."""
        if not self.meets(start, num_steps):
            return contextlib.nullcontext()
        if not self.tracing:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.tracing = True
        return jax.profiler.StepTraceAnnotation("train", step_num=start + 1)

    def after(self, end: int, outputs: Any) -> None:
        """After a dispatch that ends with ``end`` steps done: once past the range, wait
        for ``outputs`` (the device has run the traced steps) and write the trace."""
        if self.tracing and end >= self.hi:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.tracing, self.done = False, True

    def close(self) -> None:
        """Stop a trace still running (a run that ended inside the range)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing, self.done = False, True

    def trace_files(self) -> list[Path]:
        """The trace files written (``*.xplane.pb`` and ``*.trace.json.gz``)."""
        return sorted(self.logdir.glob("plugins/profile/*/*"))


__all__ = ["Profile"]
