"""`train`: one whole run from a config, with its run folder, as named phases.

``train`` reads as the run does: resolve the config, load the data
(`jtricks.run.data`), build the task, model, optimizer, augmentation and callbacks
(`build`), create or restore the state and the run folder (`jtricks.run.folder.start`),
`fit`, evaluate (`final_metrics`), and write the summary. An ensemble (``ensemble`` N)
takes the same path with its N members stacked in one state. The CLI's ``jtricks train``
calls `train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax

from jtricks.data.memory import in_memory
from jtricks.errors import ConfigError, Interrupted, StreamError
from jtricks.plotting import preload
from jtricks.run.build import Build, build, name_the_dataset
from jtricks.run.config import TrainConfig, check_keys, check_recordable
from jtricks.run.data import RunData, load_run_data, refuse_on_disk
from jtricks.run.extend import extended
from jtricks.run.folder import Run, start
from jtricks.run.options import fit_options
from jtricks.run.outputs import (
    RunResult,
    class_entries,
    diverged_entries,
    floor_entries,
    huge_loss_warning,
    restored_entries,
    write_summary,
)
from jtricks.run.resume import LENGTHS, check_same_data, load_run_config
from jtricks.rundir import locked, refused_cleanly
from jtricks.training import History, TrainState, evaluate, fit
from jtricks.training.class_report import evaluate_with_report
from jtricks.training.distributed import is_sharded_mesh, parse_mesh
from jtricks.training.options import FitOptions
from jtricks.training.preemption import status_of
from jtricks.training.state import first_member


def train(
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    reporter: Any = None,
    resume: str | os.PathLike | None = None,
    stop: Any = None,
    **overrides: Any,
) -> RunResult:
    """Run one training job end to end: data, split, preprocessing, model, optimizer, `fit`, test.

    Args:
      config: a `TrainConfig`; fields may also be overridden by keyword, ``dataset`` also
        by arrays in memory (a dict, a tuple ``(x, y, x_test, y_test)`` or a `Dataset`,
        named by their contents: `jtricks.data.in_memory`).
      out: run folder to create (must not exist or be empty). It receives
        ``config.json`` (config + environment, written first), ``metrics.jsonl``
        (one line per epoch, as training goes), ``curves.png`` and
        ``summary.json`` (final test metrics). ``None`` writes nothing.
      progress: show a rich progress bar and a line per epoch on stdout.
      reporter: a custom progress reporter (overrides ``progress``).
      resume: a run folder to continue from its newest intact checkpoint, with its own
        ``config.json`` (``config`` and overrides are then not allowed, but ``epochs`` or
        ``steps``, which train it on to that length: `jtricks.run.extend`). The final
        parameters are bit-identical to an uninterrupted run's.
      stop: a flag `fit` reads between compiled programs
        (`jtricks.training.preemption.StopSignals`, as ``jtricks train`` passes; a
        context manager is entered around training only): once set, the run saves the
        state it reached as ``checkpoints/interrupted/`` and raises
        `jtricks.errors.Interrupted`; ``resume`` continues it exactly.

    Returns:
      A `RunResult`.

    Raises:
      ConfigError: for any bad name, number, or input data, before training starts
        and before the run folder is created.

    Example:
      >>> result = jtricks.train(model="mlp", steps=500)
      >>> result.test["accuracy"]
    """
    t0 = time.perf_counter()
    with contextlib.ExitStack() as locks:  # the run folder's lock, held for the whole run
        config, out = resolve_config(config, out, resume, locks, overrides)
        if out is not None:
            preload()  # matplotlib, for the plots at the end
        locks.enter_context(name_the_dataset(config))  # a model refused names its dataset
        data = load_run_data(config)
        if resume is not None:
            hint = f" (--pretrained {resume} starts a run from its weights)"
            check_same_data(Path(resume) / "config.json", config.dataset, data.digest, hint)
        refuse_on_disk(config, data)
        out = share_processes(config, data, out, resume)
        b = build(config, data, reporter, progress, rebuild=resume is not None)
        check_mesh(config)  # before any folder exists
        with refused_cleanly(out if resume is None else None):
            state, run = start(config, data, b, out, resume, locks)
            with stop if hasattr(stop, "__enter__") else contextlib.nullcontext():
                state, history = fit_run(config, data, b, state, run, stop)
        test, extra = final_metrics(config, data, b, state, history, run.dir)
        wall = time.perf_counter() - t0
        warning = extra.get("warning")
        if run.dir is not None:
            write_summary(run.dir, history, test, state.params, wall, **extra)
        return RunResult(
            config,
            state,
            history,
            test,
            run.dir,
            wall,
            data.loss_floor,
            warning,
            data.scaler,
            b.task,
            None if b.tta_augment is None else (b.tta_augment, b.tta_key),
            data.classes,
        )


def resolve_config(
    config: TrainConfig | None,
    out: Any,
    resume: Any,
    locks: contextlib.ExitStack,
    overrides: dict[str, Any],
) -> tuple[TrainConfig, Any]:
    """The run's checked config and folder: the saved ones of ``resume`` (locked before
    anything in it is read), else ``config`` with ``overrides``."""
    if resume is not None:
        length = {k: v for k, v in overrides.items() if k in LENGTHS}
        if config is not None or len(overrides) > len(length) or out is not None:
            raise ConfigError(
                "resume takes the run's own config.json; give no other settings (but epochs "
                "or steps, to train it on to that length)",
                param="resume",
            )
        if Path(resume).is_dir() and jax.process_index() == 0:  # one writer: process 0
            locks.enter_context(locked(resume, param="resume"))
        config, out = load_run_config(resume, finished=bool(length)), Path(resume)
        if length:  # recorded in its config.json once its checkpoint is restored (`start`)
            config, overrides = extended(config, out, length), {}
    check_keys(overrides)
    if not isinstance(overrides.get("dataset", ""), str):  # arrays: named by their contents
        overrides = {**overrides, "dataset": in_memory(overrides["dataset"])}
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    config.validate()
    if out is not None:
        check_recordable(config.to_dict())
    return config, out


def check_mesh(config: TrainConfig) -> None:
    """``--mesh`` against this machine's devices, and its refusals (an ``fsdp`` axis with
    ``--fused`` or ``--ensemble``), as `fit` would raise them later.

    Raises:
      ConfigError (``param="mesh"``).
    """
    if config.mesh is None:
        return
    mesh = parse_mesh(config.mesh)
    if is_sharded_mesh(mesh) and (config.fused or config.ensemble > 1):
        what = (
            "--fused keeps them in flat buffers"
            if config.fused
            else "an ensemble's states are stacked"
        )
        raise ConfigError(
            f"--mesh {config.mesh} shards each parameter array; {what}: use a data-only mesh",
            param="mesh",
        )


def share_processes(config: TrainConfig, data: RunData, out: Any, resume: Any) -> Any:
    """With several processes (`jax.distributed`), keep this process's shard of the
    training split (statistics and splits came from the whole split, identical in every
    process). Every process writes its part of the checkpoints; only process 0 writes the
    run folder's other files (`start`). Returns the run folder."""
    nproc, pid = jax.process_count(), jax.process_index()
    if nproc == 1:
        return out
    if config.ensemble > 1:
        raise ConfigError("multi-process runs do not train ensembles", param="num_processes")
    if data.streamed(config):  # each process streams its block of every batch
        return out
    n_each = len(data.train[1]) // nproc
    n_each -= n_each % len(jax.local_devices())  # equal shards, even over local devices
    data.labels = data.train[1]  # class weights count the whole split's, in every process
    data.train = tuple(a[pid::nproc][:n_each] for a in data.train)
    data.n_train = n_each * nproc
    return out


def fit_run(
    config: TrainConfig, data: RunData, b: Build, state: TrainState, run: Run, stop: Any = None
) -> tuple[TrainState, History]:
    """`fit` for the steps still to go, from arrays or from a stream of the same batches."""
    history = History(list(run.records), steps=list(run.steps))
    done = int(first_member(state).step)  # an ensemble's members step together
    remaining = b.total_steps - done
    if remaining <= 0:
        return state, history
    saved = run.records[-1].get("data_state") if run.records else None
    saved = run.data_state or saved  # an interrupted checkpoint's, mid-epoch
    train_data, stream_kw = data.fit_input(config, b.streaming, b.data_key, at=done, saved=saved)
    state, new = fit_or_explain(
        run,
        state,
        train_data,
        fit_options(config, b, run.dir),
        val_data=data.val,
        **stream_kw,
        steps=remaining,
        data_key=b.data_key,
        callbacks=run.callbacks,
        reporter=b.reporter,
        stop=stop,
        partial_epoch=run.partial_epoch,
    )
    if new.interrupted is not None:
        raise Interrupted(interrupted_line(new, run), status_of(new.interrupted["signal"]))
    history.records.extend(new.records)
    history.steps.extend(new.steps)
    history.stopped, history.diverged, history.kept_step = new.stopped, new.diverged, new.kept_step
    return state, history


def interrupted_line(history: History, run: Run) -> str:
    """What a stopped run says: the signal, the step, where it was saved, how to go on."""
    if run.checkpointer is None:
        return f"{history.stopped}; nothing saved (no run folder or no checkpoints)"
    folder = run.checkpointer.directory.parent  # also for the processes that do not write it
    return (
        f"{history.stopped}; saved in {folder}/checkpoints/interrupted; continue with: "
        f"jtricks train --resume {folder}"
    )


def fit_or_explain(
    run: Run, state: TrainState, train_data: Any, options: FitOptions, **kw: Any
) -> tuple[TrainState, History]:
    """`fit`; a failing stream stops the run with one line that says what is left: the
    writes in flight are finished, and the newest checkpoint continues it."""
    try:
        return fit(state, train_data, options, **kw)
    except StreamError as e:
        if run.checkpointer is None:
            raise
        run.checkpointer.wait()
        raise StreamError(
            f"{e}; the run stopped there, its newest checkpoint is intact: fix the data, then "
            f"jtricks train --resume {run.dir}",
            e.state,
        ) from e


def final_metrics(
    config: TrainConfig,
    data: RunData,
    b: Build,
    state: TrainState,
    history: History,
    run_dir: Path | None,
) -> tuple[dict, dict]:
    """Test metrics (with the EMA's and test-time augmentation's), and the summary's extra
    entries: a diverged run's kept state, the loss floor, a warning."""
    kw = dict(task=b.task, batch_size=config.eval_batch_size)
    extra: dict[str, Any] = restored_entries(history, b.early)
    if history.diverged:  # the kept state's own validation metrics, not the stopping epoch's
        kept_val = evaluate(state, data.val, params=config.eval_params, **kw)
        extra = diverged_entries(history, kept_val, run_dir)
    test, report = evaluate_with_report(
        state, data.test, b.task, config.eval_batch_size, config.eval_params
    )
    extra.update(class_entries(report, run_dir, data.classes))
    if state.ema_params is not None and config.eval_params != "ema":
        ema = evaluate(state, data.test, params="ema", **kw)
        test.update({f"ema_{k}": v for k, v in ema.items()})
        extra.update({f"test_ema_{k}": v for k, v in ema.items()})
    if b.tta_augment is not None:
        extra.update(tta_metrics(config, data, b, state, test))
    if config.ensemble > 1:  # every member's test metrics beside the ensemble's
        extra.update({f"test_{k}": v for k, v in test.items() if k.startswith("member_")})
        extra["ensemble"] = config.ensemble
    warning = huge_loss_warning(history, test["loss"])
    if warning:
        extra["warning"] = warning
    return test, {**extra, **floor_entries(data.loss_floor, b.task, test)}


def tta_metrics(
    config: TrainConfig, data: RunData, b: Build, state: TrainState, test: dict[str, Any]
) -> dict[str, Any]:
    """Test-time augmentation on the test and validation splits: updates ``test`` (the
    single-view figures move to ``single_view_*``) and returns the summary's entries."""
    from jtricks.training.tta import evaluate_tta

    kw = dict(
        views=config.tta,
        key=b.tta_key,
        task=b.task,
        batch_size=config.eval_batch_size,
        params=config.eval_params,
    )
    tta_test = evaluate_tta(state, data.test, b.tta_augment, **kw)
    tta_val = evaluate_tta(state, data.val, b.tta_augment, **kw)
    single = {f"single_view_{k}": test[k] for k in tta_test}
    test.update({**single, **tta_test, "tta_views": config.tta})
    return {
        **{f"test_{k}": v for k, v in single.items() if k != "single_view_loss"},
        **{f"val_tta_{k}": v for k, v in tta_val.items()},
        "tta_views": config.tta,
    }
