"""Trials side by side: the trials of a group train as one vmapped program of K members.

A group is a set of trials whose configs differ only in the learning rate, numeric
arguments of the optimizer (weight decay, momentum, betas, ...) and label smoothing.
Their states are stacked like an ensemble's (`jtricks.training.ensemble.create_ensemble`)
and trained by `fit` in one compiled program; what differs between members lives in the
state:

* the initialisation and dropout key: trial ``t`` starts from ``fold_in(init_key, t)``,
  its own seed (all trials of a search see the same batch order, the search's seed:
  a paired comparison);
* the learning rate and the optimizer's arguments: the optimizer of a search is
  `scaled_optimizer`, the run's pipeline and schedule with the base rate (as
  ``base_learning_rate``) and the searched arguments injected into the optimizer state
  (`optax.inject_hyperparams`); member ``i`` holds its trial's values there. The
  schedule is ``base_learning_rate * unit_schedule(step)``, so warm-up, cosine and
  one-cycle scale with the trial's rate, and the update is the pipeline's own, for any
  optimizer;
* label smoothing: in the state's ``hparams``, which the train and evaluation steps
  set on the task (`jtricks.tasks.Task.using`).

Trials that change anything else (batch size, widths, dropout, ...) form separate
groups, each one program. A member that diverges has its non-finite steps skipped (`fit`'s guard, per member) and never stops the others; a
non-finite validation loss, or as many skipped steps as the config's ``max_nonfinite``
(where a run of its own would have stopped as diverged) or all its steps skipped, marks
it failed.

What is new here: K hyper-parameter trials as one XLA program. Keras Tuner and Optuna
run trials one after another.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.caches import jitted
from jtricks.errors import ConfigError
from jtricks.optim import build_optimizer, build_schedule
from jtricks.optim.sweep import Keyed, freeze, is_injected
from jtricks.run.build import Build, build, ema_settings, run_length, with_pretrained
from jtricks.run.config import TrainConfig
from jtricks.run.data import RunData
from jtricks.run.options import fit_options
from jtricks.search.space import stage_arguments, trial_config
from jtricks.training import History, TrainState, transfer
from jtricks.training.callbacks import MemberEarlyStopping
from jtricks.training.ensemble import create_ensemble, fit_ensemble

NEVER_STOP = 2**31 - 1
"""``max_nonfinite`` of a search: a diverging member is masked, the others go on."""


TASK_SIDE = ("label_smoothing",)
"""Task fields a member may have of its own (`jtricks.training.TrainState.hparams`)."""


def split_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's values as ``(fixed, side)``: the config fields a program is built with,
    and what its members may differ in, held in the state (the learning rate, any real
    optimizer argument, the `TASK_SIDE` fields). An integer argument is fixed: it may
    shape the program (Muon's ``ns_steps`` iterations, Lookahead's ``sync_period``)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    side = {
        k: v
        for k, v in values.items()
        if (k in ("learning_rate", *TASK_SIDE) or (k not in fields and not isinstance(v, int)))
        and is_injected(v)
    }
    return {k: v for k, v in values.items() if k not in side}, side


def group_key(config: TrainConfig, values: dict[str, Any]) -> str:
    """What must be equal for two trials to share a program: the config with the trial's
    fixed values, and the names of its side-by-side values (`split_values`)."""
    fixed, side = split_values(values)
    settings = trial_config(config, fixed).to_dict()
    return json.dumps([settings, sorted(side)], sort_keys=True, default=repr)


def group_trials(
    config: TrainConfig, values: Sequence[dict[str, Any]], parallel: int
) -> list[list[int]]:
    """The indices of the trials ``values`` in groups of at most ``parallel`` that can
    share one program (equal `group_key`), in order of their first trial."""
    groups: dict[str, list[list[int]]] = {}
    for i, v in enumerate(values):
        chunks = groups.setdefault(group_key(config, v), [[]])
        if len(chunks[-1]) == parallel:
            chunks.append([])
        chunks[-1].append(i)
    return sorted((c for chunks in groups.values() for c in chunks), key=lambda c: c[0])


def traced_arguments(spec: Any, arguments: dict[str, Any]) -> Any:
    """The optimizer spec ``spec`` with ``arguments`` (maybe traced) on their stages
    (`jtricks.search.space.stage_arguments`), as a list spec whose stages with arguments
    are dicts (a string cannot hold a traced value)."""
    if not arguments:
        return spec
    parts = []
    for text, name, args, kwargs, given in stage_arguments(spec, arguments):
        if given and args:
            raise ConfigError(
                f"a search over optimizer arguments needs {text!r}'s arguments by name "
                f"(e.g. momentum(gamma=0.9), l2(lam=1e-4)); got positional {list(args)}",
                param="optimizer",
            )
        parts.append({"name": name, **kwargs, **given} if given else text)
    return parts


def _injectable(name: str) -> str:
    """A search name as `optax.inject_hyperparams` can hold it (``l2.lam`` -> ``l2__lam``)."""
    return name.replace(".", "__")


def scaled_optimizer(
    config: TrainConfig,
    length: tuple[int, int],
    side: dict[str, Any],
    trainable: Sequence[str] | None = None,
) -> Keyed:
    """The run's optimizer (`jtricks.run.build.optimizer`) with its base learning rate and
    the optimizer arguments ``side`` in the state: ``inject_hyperparams(make)(
    base_learning_rate=lr, **side)`` where ``make(b, **side)`` is
    ``build_optimizer(<config.optimizer with side>, lambda step: b * unit(step))`` and
    ``unit`` the config's schedule at rate 1. Two equal configs give equal optimizers
    whatever the numbers (`Keyed`), so a search's groups with equal settings share one
    program. ``length`` is ``(steps_per_epoch, total_steps)``."""
    unit = build_schedule(config.schedule, 1.0, steps_per_epoch=length[0], total_steps=length[1])
    arguments = {k: v for k, v in side.items() if k not in ("learning_rate", *TASK_SIDE)}

    def make(base_learning_rate, **values):
        values = {name: values[_injectable(name)] for name in arguments}
        spec = traced_arguments(config.optimizer, values)
        tx = build_optimizer(spec, lambda step: base_learning_rate * unit(step))
        return tx if trainable is None else transfer.freeze(tx, trainable=trainable)

    names = ("base_learning_rate", *map(_injectable, arguments))  # read by inject_hyperparams
    make.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )

    rate = float(side.get("learning_rate", config.learning_rate))
    injected = {_injectable(k): v for k, v in arguments.items()}
    tx = optax.inject_hyperparams(make)(base_learning_rate=rate, **injected)
    key = ("search", freeze(config.optimizer), config.schedule, length, tuple(sorted(arguments)))
    key += (None if trainable is None else tuple(trainable),)
    return Keyed(tx, key)


def with_values(states: TrainState, values: dict[str, Sequence[float]]) -> TrainState:
    """Stacked ``states`` whose member ``i`` trains with ``values[name][i]`` for each
    hyper-parameter ``name``: the `TASK_SIDE` ones in ``hparams``, the others injected
    into the optimizer state (``learning_rate`` as the base rate)."""
    opt = states.opt_state
    hyper, task = dict(opt.hyperparams), {}
    for name, column in values.items():
        if name in TASK_SIDE:
            task[name] = jnp.asarray(column, jnp.float32)
            continue
        key = "base_learning_rate" if name == "learning_rate" else _injectable(name)
        hyper[key] = jnp.asarray(column, hyper[key].dtype)
    return states.replace(opt_state=opt._replace(hyperparams=hyper), hparams=task or None)


def plain_state(state: TrainState, b: Build) -> TrainState:
    """A member of a search as the state `jtricks train` makes for its config: the run's
    own optimizer (``b.tx``, with ``finetune``'s frozen layers) and its state (the scaled
    optimizer's inner one, of the same structure), so ``--resume`` and ``--pretrained``
    take it."""
    return state.replace(tx=b.tx, opt_state=state.opt_state.inner_state)


@dataclass
class GroupResult:
    """A trained group: its trials' numbers, stacked states and history."""

    trials: list[int]
    states: TrainState
    history: History
    build: Build
    """The group's run as `jtricks train` builds it (its plain optimizer: `plain_state`)."""
    early: MemberEarlyStopping | None = None
    """With ``early_stopping``: each member's best and stopping epochs."""
    loaded: str | None = None
    """With ``pretrained``: the line that says which layers were loaded."""

    def records(self, i: int) -> list[dict[str, Any]]:
        """The group's epoch records up to member ``i``'s last: the epoch it stopped at
        (early stopping), else the last one."""
        stopped = self.early.stopped_epoch[i] if self.early is not None else None
        return [r for r in self.history.records if stopped is None or r["epoch"] <= stopped]

    def kept(self, i: int) -> int:
        """How many of `records` lead to member ``i``'s state: its best epoch under early
        stopping (whose state it keeps), else all of them."""
        if self.early is not None and self.early.best_epoch[i] is not None:
            return self.early.best_epoch[i] - self.history.records[0]["epoch"] + 1
        return len(self.records(i))

    def curve(self, metric: str, i: int) -> list[float]:
        """Member ``i``'s validation ``metric`` at each of its epochs (`records`)."""
        return [float(r[f"val_member_{metric}"][i]) for r in self.records(i)]

    def skipped(self, i: int) -> int:
        """Member ``i``'s skipped (non-finite) steps: its steps less its optimizer's count
        (`fit`'s guard keeps the optimizer state of a skipped step)."""
        return int(self.states.step[i]) - int(self.states.opt_state.count[i])

    def member(self, i: int) -> TrainState:
        """Member ``i``'s state (no leading axis)."""
        return _take(self.states, i)


@jitted
def _take(states: TrainState, i: jax.Array) -> TrainState:
    """Member ``i`` of stacked states: one program for every member and leaf."""
    return jax.tree.map(lambda a: a[i], states)


def train_group(
    config: TrainConfig,
    trials: Sequence[int],
    values: Sequence[dict[str, Any]],
    data: RunData,
    reporter: Any = None,
) -> GroupResult:
    """Train ``trials`` (their ``values``, equal but for the side-by-side ones,
    `split_values`) as the members of one program around ``config``: member ``i`` from
    ``fold_in(init_key, trials[i])`` with its own learning rate and optimizer arguments."""
    fixed, side = split_values(values[0])
    config = dataclasses.replace(trial_config(config, fixed), ensemble=1)
    config.validate()
    b = build(config, data, reporter, False)
    length = run_length(config, data.n_train)
    tx = scaled_optimizer(config, length, side, b.trainable)
    keys = jax.vmap(lambda t: jax.random.fold_in(b.init_key, t))(jnp.asarray(trials))
    states = create_ensemble(b.members, tx, data.example, keys, **ema_settings(config))
    states, loaded = with_pretrained(config, b, states)
    states = with_values(states, {k: [split_values(v)[1][k] for v in values] for k in side})
    options = dataclasses.replace(fit_options(config, b, None), mesh=None, max_nonfinite=NEVER_STOP)
    train_data, stream_kw = data.fit_input(config, b.streaming, b.data_key)
    early = None if b.early is None else MemberEarlyStopping(config.early_stopping)
    callbacks = [early if cb is b.early else cb for cb in b.callbacks]
    states, history = fit_ensemble(
        states,
        train_data,
        options,
        val_data=data.val,
        **stream_kw,
        steps=b.total_steps,
        data_key=b.data_key,
        reporter=b.reporter,
        callbacks=callbacks,
    )
    return GroupResult(list(trials), states, history, b, early, loaded)


def state_bytes(b: Build, example: Any) -> int:
    """Bytes of one member's state, from `jax.eval_shape` (nothing is allocated)."""
    from jtricks.training import create_train_state

    shapes = jax.eval_shape(
        lambda k: create_train_state(b.model, b.tx, example[:1], k), jax.random.key(0)
    )
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def default_parallel(b: Build, data: RunData, batch_size: int, trials: int) -> int:
    """As many members as fit in half the device's memory (the whole machine's memory
    over 4 on a CPU): each member needs its state four times over (state, gradients,
    updates, the donated copy) and its batch's activations, taken as 64 copies of the
    batch. At least 1, at most ``trials``."""
    example = data.example
    per_member = 4 * state_bytes(b, example)
    per_member += 64 * batch_size * int(np.prod(example.shape[1:])) * example.dtype.itemsize
    return max(1, min(trials, device_budget() // max(per_member, 1)))


def device_budget() -> int:
    """Half the first device's memory limit, or a quarter of the host's memory."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
