"""`search`: a hyper-parameter search (trick T21) end to end, with its folder.

The search draws trials in waves of ``parallel`` from its sampler, trains each wave's
groups side by side (`jtricks.search.trials`), scores every trial by its last epoch's
validation metric, tells the sampler, and keeps the best trial's state. Only when every
trial is done is the test split evaluated, once, for the best trial: selection never
reads it. A killed search continues with ``resume``: the finished trials (``trials.jsonl``)
are kept, the sampler replays them, and the rest are trained.

References:
  Bergstra & Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012);
  Akiba et al., "Optuna" (KDD 2019), https://arxiv.org/abs/1907.10902
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.data.stream import SequentialBatches
from jtricks.errors import ConfigError, check_int
from jtricks.optim import build_optimizer
from jtricks.run.build import build, ema_settings, name_the_dataset
from jtricks.run.config import TrainConfig
from jtricks.run.data import RunData, load_run_data
from jtricks.run.resume import check_same_data
from jtricks.run.runner import tta_metrics
from jtricks.rundir import create_run_dir, environment, locked, refused_cleanly, write_json
from jtricks.search import outputs
from jtricks.search.outputs import SearchResult
from jtricks.search.space import (
    SAMPLERS,
    check_grid,
    make_sampler,
    parse_space,
    trial_config,
)
from jtricks.search.trials import (
    GroupResult,
    default_parallel,
    group_trials,
    plain_state,
    train_group,
)
from jtricks.training import create_train_state
from jtricks.training.checkpoint import restore_latest
from jtricks.training.class_report import evaluate_with_report
from jtricks.training.state import init_variables
from jtricks.training.steps import EvalStep

FIXED = ("dataset", "task", "preprocess", "stream", "stratify", "val_fraction", "seed")
"""Fields a search cannot vary: they choose the data and its split, the same for all."""


NOT_IN_SEARCH = ("fused", "mesh", "tensorboard", "profile", "log_every_steps")
"""Run settings a search refuses rather than ignore."""


@dataclass(frozen=True)
class SearchSettings:
    """What a search draws and how: saved as ``search.json`` and read back by ``resume``."""

    space: str
    trials: int | None = None
    """``None``: `jtricks.search.space.DEFAULT_TRIALS`, or the whole grid."""
    method: str = "random"
    parallel: int | None = None
    metric: str | None = None
    grid_points: int = 3

    def check(self) -> None:
        """Raises `ConfigError` naming the bad setting."""
        if self.trials is not None:
            check_int("trials", self.trials, low=1)
        check_int("grid_points", self.grid_points, low=2)
        if self.parallel is not None:
            check_int("parallel", self.parallel, low=1)
        if self.method not in SAMPLERS:
            raise ConfigError(
                f"method must be one of {', '.join(SAMPLERS)}; got {self.method!r}",
                param="method",
            )
        if self.method == "grid":  # a new search's; one cut short before this was kept
            check_grid(parse_space(self.space), self.trials, self.grid_points)


@dataclass
class _Best:
    record: dict[str, Any] | None = None
    state: Any = None
    config: TrainConfig | None = None


def search(
    config: TrainConfig | None = None,
    settings: SearchSettings | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    data: RunData | None = None,
    reporter: Any = None,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search ``settings.space`` around ``config`` and return the trials and the best.

    Args:
      config: the base `TrainConfig`; each trial replaces the space's fields
        (`jtricks.search.trial_config`). Needs a validation split.
      settings: the space, number of trials, sampler ``method``, ``parallel`` (members per program;
        ``None``: as many as fit in memory, `jtricks.search.trials.default_parallel`),
        ``metric`` (default ``accuracy`` where the task reports it, else ``loss``).
      out: the search folder (new or empty): ``search.json``, ``trials.jsonl``,
        ``best.json``, ``search.png`` and ``best/``. ``None`` writes nothing.
      resume: a search folder to continue (``config`` and ``settings`` are its own).
      data: the loaded data (`jtricks.run.data.load_run_data`), if already at hand.
      reporter: a progress reporter for the groups' training.
      log: called with one line after each group (trials, time, best so far).

    Raises:
      ConfigError: a bad space, setting or config, before anything is written.
    """
    with contextlib.ExitStack() as locks:
        config, settings, out = _resolve(config, settings, out, resume, locks)
        space = parse_space(settings.space)
        check_space(config, space)
        fixed = sorted(set(space) & set(FIXED))
        if fixed:
            raise ConfigError(
                f"a search cannot vary {fixed}: they choose the data and its split, the same "
                "for every trial (each trial gets its own initialisation key)",
                param="space",
            )
        locks.enter_context(name_the_dataset(config))
        data = data if data is not None else load_run_data(config)
        if resume is not None:
            check_same_data(Path(resume) / "search.json", config.dataset, data.digest)
        check_trials(config, space, data)
        settings = check_metric(config, settings, data)
        records = [] if out is None else outputs.read_trials(out / "trials.jsonl")
        if out is not None and resume is None:
            out = create_run_dir(out, locks)
            write_json(
                out / "search.json",
                {
                    "config": config.to_dict(),
                    "search": dataclasses.asdict(settings),
                    "data_sha256": data.digest or None,
                    "environment": environment(),
                },
            )
        with refused_cleanly(out if resume is None else None):  # a refusal before a trial
            return _run(config, settings, space, data, out, records, reporter, log)


def _resolve(config, settings, out, resume, locks):
    if resume is None:
        if settings is None:
            raise ConfigError("give settings (a SearchSettings with the space)", param="space")
        config = config or TrainConfig()
        config.validate()
        settings.check()
        stacked(config)
        return config, settings, None if out is None else Path(out)
    if config is not None or settings is not None or out is not None:
        raise ConfigError(
            "resume takes the search's own search.json; give no other settings", param="resume"
        )
    path = Path(resume) / "search.json"
    if not path.is_file():
        raise ConfigError(f"cannot resume {str(resume)!r}: it has no search.json", param="resume")
    locks.enter_context(locked(resume, param="resume"))
    saved = json.loads(path.read_text())
    return TrainConfig(**saved["config"]), SearchSettings(**saved["search"]), Path(resume)


def stacked(config: TrainConfig) -> None:
    """Refuse what trials trained side by side and scored on their last epoch's
    validation metric cannot do, in the search's words.

    Raises:
      ConfigError: naming the setting.
    """
    if config.ensemble != 1:
        raise ConfigError(
            f"a search trains its trials stacked, one model each; got ensemble={config.ensemble}",
            param="ensemble",
        )
    for name in NOT_IN_SEARCH:
        if getattr(config, name) not in (None, False):
            raise ConfigError(
                f"a search does not support {name} (its trials train stacked on one device "
                f"and write no run folders of their own); got {name}={getattr(config, name)!r}",
                param=name,
            )
    own = {  # what each trial would have to do on its own validation metrics
        "swa": (config.swa, "be tested on an average that was never scored"),
        "schedule": (
            config.schedule if config.schedule.startswith("plateau") else None,
            "lower its learning rate on its own validation loss",
        ),
    }
    for name, (value, would) in own.items():
        if value is not None:
            raise ConfigError(
                f"a search does not support {name}={value!r}: it scores every trial on its "
                f"last epoch's validation metric, and each trial would {would}; search the "
                "number of epochs or the schedule instead",
                param=name,
            )


def check_space(config: TrainConfig, space: dict[str, Any]) -> None:
    """Each dimension's ends (a range's bounds and its middle, a choice's values) as trial
    configs, checked as `TrainConfig` and by `stacked`, before anything trains (the middle:
    a range over an optimizer argument that takes integers draws values between them).

    Raises:
      ConfigError: naming the dimension and the value.
    """
    for name, dim in space.items():
        middle = () if hasattr(dim, "values") else (dim.value(0.5),)
        for value in dict.fromkeys((*_ends(dim), *middle)):
            try:
                trial = trial_config(config, {name: value})
                trial.validate()
                stacked(trial)
                build_optimizer(trial.optimizer, trial.learning_rate)  # its arguments
            except ConfigError as e:
                said = str(e)  # a message that names the entry already is not prefixed again
                if not said.startswith(f"space {name}"):
                    said = f"space {name}={value!r}: {said}"
                raise ConfigError(said, param="space") from None


LENGTH = ("batch_size", "accumulate", "epochs", "steps", "schedule", "swa")
"""Fields that set a trial's length in steps and what its schedule and SWA make of it."""


def check_trials(config: TrainConfig, space: dict[str, Any], data: RunData) -> None:
    """Every trial checked on the data before anything trains, as its run checks itself:
    built (`jtricks.run.build.build`: its batch against the training split, its schedule
    over its length, its augmentation on an example, ...) and its model initialised in
    shapes only (`jax.eval_shape`). Probed: every combination of the ends of the `LENGTH`
    dimensions, then each other dimension's ends. A trial refused on its turn would leave
    the trials before it written, and a resume would meet the same refusal: a search
    folder that could never finish.

    Raises:
      ConfigError: naming the trial's values, or the base setting where none varies.
    """
    for values in _probes(space):
        trial = trial_config(config, values)
        try:
            b = build(trial, data, None, False)
            if "model" in values and isinstance(b.model, nn.Module):
                jax.eval_shape(
                    lambda key, b=b: init_variables(b.model, key, data.example), b.init_key
                )
        except ConfigError as e:
            if not values:
                raise
            said = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"space {said}: {e}", param="space") from None


def check_metric(config: TrainConfig, settings: SearchSettings, data: RunData) -> SearchSettings:
    """``settings`` with its ``metric`` checked against the validation metrics the task
    reports (the evaluation step traced in shapes only, `jax.eval_shape`, on a state of
    shapes and the validation split's first rows); ``val_loss`` is read as ``loss``.

    Raises:
      ConfigError (``param="metric"``): a metric the task does not report, naming those it
        does (a search would have trained its first trials, then stopped on it).
    """
    if settings.metric is None:
        return settings
    b = build(dataclasses.replace(config, ensemble=1), data, None, False)
    names = sorted(validation_metrics(b, data))
    name = settings.metric
    if name not in names and name.removeprefix("val_") in names:
        name = name.removeprefix("val_")
    if name not in names:
        raise ConfigError(
            f"metric={settings.metric!r} is not a validation metric of the {b.task.name} "
            f"task; it reports: {', '.join(names)}",
            param="metric",
        )
    return dataclasses.replace(settings, metric=name)


def validation_metrics(b: Any, data: RunData) -> dict[str, Any]:
    """The validation metrics of a run built as ``b``, in shapes: `EvalStep` and its
    ``metrics`` traced on a state of shapes and the validation split's first rows."""
    val = next(iter(data.val)) if isinstance(data.val, SequentialBatches) else data.val
    rows = jax.tree.map(lambda a: a[:2], val)
    n = len(jax.tree.leaves(rows)[0])
    step = EvalStep(b.task)

    def metrics(key):
        state = create_train_state(b.model, b.tx, data.example, key)
        return step.metrics(step(state, rows, jnp.ones((n,), jnp.float32)))

    return jax.eval_shape(metrics, b.init_key)


def _probes(space: dict[str, Any]) -> list[dict[str, Any]]:
    """`check_trials`' trial values: the `LENGTH` dimensions' ends in every combination
    (the base alone where none varies), then every other dimension's ends one at a time."""
    dims = {name: _ends(dim) for name, dim in space.items() if name in LENGTH}
    probes = [dict(zip(dims, ends, strict=True)) for ends in itertools.product(*dims.values())]
    others = [name for name in space if name not in LENGTH]
    return probes + [{name: value} for name in others for value in _ends(space[name])]


def _ends(dim: Any) -> tuple[Any, ...]:
    """A dimension's ends: a choice's values, a range's bounds."""
    return tuple(dim.values) if hasattr(dim, "values") else (dim.low, dim.high)


def _run(config, settings, space, data, out, records, reporter, log) -> SearchResult:
    seed = config.seed
    sampler = make_sampler(
        settings.method, space, settings.trials, seed=seed, points=settings.grid_points
    )
    finished = {r["trial"]: r for r in records}
    parallel = settings.parallel or _default_parallel(config, data, sampler.size)
    metric = settings.metric
    best = _Best()
    for r in records:
        metric = metric or r["metric"]
        if best.record is None or outputs.better(metric, r["score"], best.record["score"]):
            best.record = r
    wave: list[tuple[int, dict[str, Any]]] = []
    for number, values in enumerate(sampler):
        wave.append((number, values))
        if len(wave) == parallel:
            metric = _wave(config, wave, data, finished, sampler, metric, best, out, reporter, log)
            wave = []
    if wave:
        metric = _wave(config, wave, data, finished, sampler, metric, best, out, reporter, log)
    records = sorted(finished.values(), key=lambda r: r["trial"])
    metric = metric or "loss"
    result = SearchResult(records, metric, best.record, out=out)
    if best.record is not None:
        result.best_config = trial_config(config, best.record["values"])
        _test_best(result, best, data, out)
    if out is not None and records:
        outputs.plot_search(records, space, metric, out / "search.png")
    return result


def _default_parallel(config: TrainConfig, data: RunData, trials: int) -> int:
    b = build(dataclasses.replace(config, ensemble=1), data, None, False)
    return default_parallel(b, data, config.batch_size, trials)


def _wave(config, wave, data, finished, sampler, metric, best, out, reporter, log) -> str | None:
    """Train the wave's unfinished trials group by group; tell the sampler every score."""
    todo = [(n, v) for n, v in wave if n not in finished]
    values = [v for _, v in todo]
    for group in group_trials(config, values, len(todo) or 1):
        trials = [todo[i][0] for i in group]
        t0 = time.perf_counter()
        result = train_group(config, trials, [values[i] for i in group], data, reporter)
        took = time.perf_counter() - t0
        if log is not None and result.loaded and trials[0] == 0:  # said once, as train does
            log(result.loaded)
        metric = metric or ("accuracy" if "val_member_accuracy" in _first(result) else "loss")
        for i, t in enumerate(trials):
            record = _trial_record(result, i, t, values[group[i]], metric, config.max_nonfinite)
            finished[t] = record
            if best.record is None or outputs.better(metric, record["score"], best.record["score"]):
                trial = trial_config(config, record["values"])
                _new_best(best, record, result, i, trial, out, data.recorded())
            if out is not None:  # after best/: a kill in between trains this trial again
                outputs.append_trial(out / "trials.jsonl", record)
        if log is not None:
            log(_progress(trials, took, metric, best.record))
    for n, v in wave:
        score = finished[n]["score"]
        sign = -1.0 if metric in outputs.LOWER_IS_BETTER else 1.0
        sampler.tell(v, None if score is None else sign * score)
    return metric


def _progress(trials: list[int], took: float, metric: str, best: dict[str, Any] | None) -> str:
    line = f"trial {trials[0]} in {took:.1f} s"
    if len(trials) > 1:
        line = f"trials {', '.join(map(str, trials))} side by side in {took:.1f} s"
    if best is not None:
        line += f"; best so far: trial {best['trial']}, val_{metric} {best['score']:.4f}"
    return line


def _first(result: GroupResult) -> dict[str, Any]:
    return result.history.records[0] if result.history.records else {}


def _trial_record(result: GroupResult, i: int, trial: int, values, metric: str, limit: int):
    """One line of ``trials.jsonl``: the values, the per-epoch validation curves, the
    score (the last epoch's value), the skipped steps and the status (``failed``: a
    non-finite validation value, or ``limit`` skipped steps, or all of them). Under
    early stopping the curves end at the trial's stop and it is scored on the epoch whose
    state it keeps (``kept_epoch``)."""
    curve = result.curve(metric, i) if result.history.records else []
    loss = result.curve("loss", i) if result.history.records else []
    kept = result.kept(i) if curve else 0
    skipped = result.skipped(i)
    ok = bool(curve) and math.isfinite(curve[kept - 1]) and math.isfinite(loss[kept - 1])
    ok = ok and skipped < min(limit, int(result.states.step[i]))
    record = {
        "trial": trial,
        "values": values,
        "metric": metric,
        f"val_{metric}": curve,
        "val_loss": loss,
        "score": curve[kept - 1] if ok else None,
        "status": "ok" if ok else "failed",
        "skipped_steps": skipped,
        "init_key": f"fold_in(init_key, {trial})",
    }
    if result.early is not None and curve:
        record["kept_epoch"] = result.records(i)[kept - 1]["epoch"]
    return record


def _new_best(best: _Best, record, result: GroupResult, i: int, config, out, recorded) -> None:
    state = plain_state(result.member(i), result.build)
    best.record, best.state, best.config = record, jax.device_get(state), config
    if out is None:
        return
    own = outputs.member_records(result.records(i), i)
    outputs.write_best_run(out / "best", config, state, own, recorded)
    write_json(out / "best.json", {**record, "config": config.to_dict()})


def _test_best(result: SearchResult, best: _Best, data: RunData, out) -> None:
    """The best trial's test metrics: the one time the search reads the test split."""
    config = result.best_config
    state = best.state
    if state is None:  # found before a resume: its checkpoint in best/
        saved = json.loads((out / "best.json").read_text())
        if saved["trial"] != result.best["trial"]:
            raise ConfigError(
                f"cannot resume {str(out)!r}: best/ holds trial {saved['trial']}, "
                f"trials.jsonl's best is trial {result.best['trial']}",
                param="resume",
            )
        state = _restore_best(config, data, out)
    b = build(config, data, None, False)
    result.state, result.scaler, result.task = state, data.scaler, b.task  # its model
    result.tta = None if b.tta_augment is None else (b.tta_augment, b.tta_key)
    result.classes = data.classes
    test, _ = evaluate_with_report(
        state, data.test, b.task, config.eval_batch_size, config.eval_params
    )
    if b.tta_augment is not None:  # as the best trial's own run would report it
        tta_metrics(config, data, b, state, test)
    result.test = {k: v for k, v in test.items() if isinstance(v, float)}
    if out is not None:
        write_json(
            out / "best.json", {**result.best, "config": config.to_dict(), "test": result.test}
        )
        if result.best.get("kept_epoch") is not None:  # stopped early: a finished run
            outputs.write_stopped_summary(out / "best", result.best["kept_epoch"], result.test)


def _restore_best(config: TrainConfig, data: RunData, out: Path):
    b = build(config, data, None, False)
    template = create_train_state(b.model, b.tx, data.example, b.init_key, **ema_settings(config))
    restored = restore_latest(out / "best" / "checkpoints", template)
    if restored is None:
        raise ConfigError(f"{out / 'best'} has no checkpoint to test", param="resume")
    return restored[0]
