"""Trials side by side: the trials of a group train as one vmapped program of K members.

A group is a set of trials whose configs differ only in the learning rate. Their states
are stacked like an ensemble's (`jtricks.training.ensemble.create_ensemble`) and trained
by `fit` in one compiled program; what differs between members lives in the state:

* the initialisation and dropout key: trial ``t`` starts from ``fold_in(init_key, t)``,
  its own seed (all trials of a search see the same batch order, the search's seed:
  a paired comparison);
* the learning rate: the optimizer of a search is `scaled_optimizer`, the run's pipeline
  and schedule with the base rate injected into the optimizer state as
  ``base_learning_rate``; member ``i`` holds its trial's rate there. The schedule is
  ``base_learning_rate * unit_schedule(step)``, so warm-up, cosine and one-cycle scale
  with the trial's rate, and the update is the pipeline's own, for any optimizer.

Trials that change anything else (batch size, widths, label smoothing, the optimizer's
arguments, ...) form separate groups, each one program. A member that diverges has its
non-finite steps skipped (`fit`'s guard, per member) and never stops the others; its
non-finite validation loss marks it failed.

What is new here: K hyper-parameter trials as one XLA program. Keras Tuner and Optuna
run trials one after another.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.optim import build_optimizer, build_schedule
from jtricks.optim.sweep import Keyed, freeze
from jtricks.run.build import Build, build, optimizer, run_length
from jtricks.run.config import TrainConfig
from jtricks.run.data import RunData
from jtricks.run.options import fit_options
from jtricks.training import History, TrainState
from jtricks.training.ensemble import create_ensemble, fit_ensemble

SIDE_BY_SIDE = ("learning_rate",)
"""The config fields whose values may differ between the members of one program."""

NEVER_STOP = 2**31 - 1
"""``max_nonfinite`` of a search: a diverging member is masked, the others go on."""


def group_key(config: TrainConfig) -> str:
    """What must be equal for two trials to share a program: the config without the
    `SIDE_BY_SIDE` fields."""
    settings = config.to_dict()
    for name in SIDE_BY_SIDE:
        settings.pop(name, None)
    return json.dumps(settings, sort_keys=True, default=repr)


def group_trials(configs: Sequence[TrainConfig], parallel: int) -> list[list[int]]:
    """The indices of ``configs`` in groups of at most ``parallel`` that can share one
    program (equal `group_key`), in order of their first trial."""
    groups: dict[str, list[list[int]]] = {}
    for i, config in enumerate(configs):
        chunks = groups.setdefault(group_key(config), [[]])
        if len(chunks[-1]) == parallel:
            chunks.append([])
        chunks[-1].append(i)
    return sorted((c for chunks in groups.values() for c in chunks), key=lambda c: c[0])


def scaled_optimizer(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> Keyed:
    """The run's optimizer (`jtricks.run.build.optimizer`) with its base learning rate in
    the state: ``inject_hyperparams(make)(base_learning_rate=lr)`` where ``make(b)`` is
    ``build_optimizer(config.optimizer, lambda step: b * unit(step))`` and ``unit`` the
    config's schedule at rate 1. Two equal configs give equal optimizers whatever their
    rates (`Keyed`), so every group of a search with equal settings reuses one program."""
    length = dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    unit = build_schedule(config.schedule, 1.0, **length)

    def make(base_learning_rate):
        return build_optimizer(config.optimizer, lambda step: base_learning_rate * unit(step))

    tx = optax.inject_hyperparams(make)(base_learning_rate=float(config.learning_rate))
    key = ("search", freeze(config.optimizer), config.schedule, steps_per_epoch, total_steps)
    return Keyed(tx, key)


def with_rates(states: TrainState, rates: Sequence[float]) -> TrainState:
    """Stacked ``states`` whose member ``i`` trains at base rate ``rates[i]``."""
    opt = states.opt_state
    hyper = {**opt.hyperparams, "base_learning_rate": jnp.asarray(rates, jnp.float32)}
    return states.replace(opt_state=opt._replace(hyperparams=hyper))


def plain_state(state: TrainState, config: TrainConfig, length: tuple[int, int]) -> TrainState:
    """A member of a search as the state `jtricks train` makes for its config: the plain
    optimizer (`jtricks.run.build.optimizer`; ``length`` is ``(steps_per_epoch,
    total_steps)``) and its state (the scaled optimizer's inner one, of the same
    structure), so ``--resume`` and ``--pretrained`` take it."""
    tx, _ = optimizer(config, *length)
    return state.replace(tx=tx, opt_state=state.opt_state.inner_state)


@dataclass
class GroupResult:
    """A trained group: its trials' numbers, stacked states and history."""

    trials: list[int]
    states: TrainState
    history: History
    build: Build
    length: tuple[int, int]
    """``(steps_per_epoch, total_steps)``."""

    def curve(self, metric: str, i: int) -> list[float]:
        """Member ``i``'s validation ``metric`` at each epoch."""
        return [float(r[f"val_member_{metric}"][i]) for r in self.history.records]

    def member(self, i: int) -> TrainState:
        """Member ``i``'s state (no leading axis)."""
        return jax.tree.map(lambda a: a[i], self.states)


def train_group(
    configs: Sequence[TrainConfig], trials: Sequence[int], data: RunData, reporter: Any = None
) -> GroupResult:
    """Train the trials ``trials`` (their ``configs``, equal but for `SIDE_BY_SIDE`) as the
    members of one program: member ``i`` from ``fold_in(init_key, trials[i])`` at base rate
    ``configs[i].learning_rate``."""
    config = dataclasses.replace(configs[0], ensemble=1)
    b = build(config, data, None, reporter, False)
    steps_per_epoch, total_steps = run_length(config, data.n_train)
    b.tx = scaled_optimizer(config, steps_per_epoch, total_steps)
    keys = jax.vmap(lambda t: jax.random.fold_in(b.init_key, t))(jnp.asarray(trials))
    states = create_ensemble(b.model, b.tx, data.train[0], keys, ema_decay=config.ema)
    states = with_rates(states, [c.learning_rate for c in configs])
    options = dataclasses.replace(fit_options(config, b, None), mesh=None, max_nonfinite=NEVER_STOP)
    states, history = fit_ensemble(
        states,
        data.train,
        options,
        val_data=data.val,
        steps=b.total_steps,
        data_key=b.data_key,
        reporter=b.reporter,
        callbacks=list(b.callbacks),
    )
    return GroupResult(list(trials), states, history, b, (steps_per_epoch, total_steps))


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
    example = data.train[0]
    per_member = 4 * state_bytes(b, example)
    per_member += 64 * batch_size * int(np.prod(example.shape[1:])) * example.dtype.itemsize
    return max(1, min(trials, device_budget() // max(per_member, 1)))


def device_budget() -> int:
    """Half the first device's memory limit, or a quarter of the host's memory."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
