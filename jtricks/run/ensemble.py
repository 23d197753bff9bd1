"""`train` for ``ensemble > 1``: N members trained in one vmapped program."""

from __future__ import annotations

import time
from typing import Any

from jtricks.errors import ConfigError
from jtricks.run.build import Build, initial_state
from jtricks.run.config import TrainConfig
from jtricks.run.data import RunData
from jtricks.run.options import fit_options
from jtricks.run.outputs import RunResult, class_entries, record_logs, write_summary
from jtricks.rundir import create_run_dir, environment, write_json
from jtricks.training.class_report import evaluate_with_report
from jtricks.training.data_checks import check_data
from jtricks.training.ensemble import fit_ensemble
from jtricks.training.fit import first_member
from jtricks.training.tensorboard import writer_class


def train_ensemble(
    config: TrainConfig, data: RunData, b: Build, out: Any, t0: float, locks: Any
) -> RunResult:
    """Member ``i`` uses init key ``fold_in(init_key, i)`` (`fit_ensemble`). Writes config,
    metrics, curves and a summary with every member's test metrics and the ensemble's;
    no intermediate checkpoints. Returns a `RunResult`."""
    states = initial_state(config, b, data.example)
    if not data.on_disk:  # checked before any folder exists, as a single run's
        check_data(first_member(states), b.task, data.train, "training data")
        check_data(first_member(states), b.task, data.test, "test data")
    if config.tensorboard:
        writer_class()  # installed? (before the folder exists)
    for name in ("tensorboard", "profile"):
        if getattr(config, name) and out is None:
            raise ConfigError(f"{name} writes into the run folder: give out", param="out")
    run_dir = create_run_dir(out, locks) if out is not None else None
    logs = []
    if run_dir is not None:
        write_json(
            run_dir / "config.json", {"config": config.to_dict(), "environment": environment()}
        )
        logs = record_logs(run_dir, config, locks)
    train_data, stream_kw = data.fit_input(config, b.streaming, b.data_key)
    states, history = fit_ensemble(
        states,
        train_data,
        fit_options(config, b, run_dir),
        val_data=data.val,
        **stream_kw,
        steps=b.total_steps,
        data_key=b.data_key,
        reporter=b.reporter,
        callbacks=logs,
    )
    test, report = evaluate_with_report(
        states, data.test, b.task, config.eval_batch_size, config.eval_params
    )
    wall = time.perf_counter() - t0
    if run_dir is not None:
        members = {f"test_{k}": v for k, v in test.items() if k.startswith("member_")}
        members.update(class_entries(report, run_dir))
        write_summary(
            run_dir, history, test, states.params, wall, **members, ensemble=config.ensemble
        )
    return RunResult(config, states, history, test, run_dir, wall)
