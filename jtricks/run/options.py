"""The one place a run's config becomes `fit`'s options (`jtricks.training.FitOptions`).

Single runs and ensembles both train through `fit_options`, so a setting reaches `fit`
the same way whatever the path (an ensemble once kept `fit`'s own default of
``max_nonfinite`` because its wiring was a second copy).
"""

from __future__ import annotations

from pathlib import Path

from jtricks.run.build import Build
from jtricks.run.config import TrainConfig, parse_steps
from jtricks.training.options import FitOptions
from jtricks.training.profile import Profile


def fit_options(config: TrainConfig, b: Build, run_dir: Path | None) -> FitOptions:
    """``config`` (with what `build` made of it: task, augmentation, mixing) as `fit`'s
    options. The profile writes into ``run_dir/profile``; without ``--mesh`` a single run
    takes `fit`'s ``"auto"`` mesh and an ensemble one device (its members are stacked)."""
    profile = None
    if config.profile is not None and run_dir is not None:
        profile = Profile(run_dir / "profile", *parse_steps(config.profile))
    mesh = config.mesh
    if mesh is None:
        mesh = "auto" if config.ensemble == 1 else None
    return FitOptions(
        batch_size=None if b.streaming else config.batch_size,
        task=b.task,
        sampler=config.sampler,
        eval_batch_size=config.eval_batch_size,
        max_nonfinite=config.max_nonfinite,
        augment=b.augment,
        mix=b.mix,
        accumulate=config.accumulate,
        precision=config.precision,
        mesh=mesh,
        eval_params=config.eval_params,
        chunk=config.chunk,
        log_every_steps=config.log_every_steps,
        profile=profile,
    )
