"""One compiled program per workload and algorithm, and the timed trials that run it.

The hyper-parameters of a trial are arguments of the program (traced scalars), so all
the trials of an algorithm on a workload run one compiled program. Each trial is still
charged the compilation, as AlgoPerf charges every run: the program is compiled ahead of
time once, its compile time measured, and that time added to every trial's training
time (`jtricks.bench.protocol.timed_trial` then times the steps and leaves evaluation
out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.bench.algorithms import DEFAULT_HPARAMS, build_algorithm, eval_params
from jtricks.bench.protocol import timed_trial
from jtricks.bench.workloads import Instance, Workload
from jtricks.training.epoch import ChunkFeed, make_part_program
from jtricks.training.state import TrainState


def as_hparams(point: Mapping[str, float]) -> dict[str, jax.Array]:
    """A trial's point, completed with `DEFAULT_HPARAMS`, as float32 scalars."""
    return {k: jnp.float32(point.get(k, v)) for k, v in DEFAULT_HPARAMS.items()}


@dataclass
class Program:
    """The compiled functions of one algorithm on one workload: ``init(key, hp)`` a
    trial's `TrainState`, ``chunk(state)`` its next ``eval_period`` steps (`fit`'s part
    program, compiled ahead of time), ``evaluate(state)`` its (validation, test) metric."""

    algorithm: str
    total_steps: int
    eval_period: int
    init: Callable[[jax.Array, Any], TrainState]
    chunk: Callable[[TrainState], TrainState]
    evaluate: Callable[[TrainState], tuple[jax.Array, jax.Array]]
    compile_s: float


def compile_program(w: Workload, inst: Instance, algorithm: str, total_steps: int) -> Program:
    """Build and compile ``algorithm``'s training chunk on ``w``: ``eval_period`` steps of
    `bench_step` in `fit`'s part program (`make_part_program`, every step run unmasked);
    the compile time is measured here."""
    if total_steps % w.eval_period:
        raise ValueError(f"{w.name}: {total_steps} steps are not whole evaluation periods")

    def init(key, hp):
        params = inst.init(key)
        opt_state = build_algorithm(algorithm, hp, total_steps).init(params)
        return TrainState(
            step=jnp.int32(0),
            apply_fn=None,
            params=params,
            tx=None,
            opt_state=opt_state,
            key=key,
            hparams=hp,
        )

    run_part = make_part_program(bench_step(inst.loss, algorithm, total_steps))
    feed = ChunkFeed(jnp.zeros((w.eval_period,), jnp.int32))  # the step reads its own count
    init = jax.jit(init)
    state = init(jax.random.key(0), as_hparams({}))
    args = (jnp.int32(0), feed, None, None)
    start = time.perf_counter()
    compiled = run_part.lower(state, *args, length=w.eval_period, finish=False).compile()
    compile_s = time.perf_counter() - start

    def chunk(state: TrainState) -> TrainState:
        return compiled(state, *args)[0]

    @jax.jit
    def evaluate(state):
        return inst.evaluate(eval_params(algorithm, state.params, state.opt_state))

    return Program(algorithm, total_steps, w.eval_period, init, chunk, evaluate, compile_s)


def bench_step(loss: Callable, algorithm: str, total_steps: int) -> Callable:
    """``step(state, batch) -> (state, {"loss"})``: a workload's step ``t = state.step``
    (its batch drawn from ``fold_in(state.key, t)`` inside ``loss``; ``batch`` unused),
    the optimizer built from the trial's hyper-parameters ``state.hparams`` (traced, so
    every trial of an algorithm shares the program)."""

    def step(state: TrainState, batch: Any):
        hp = state.hparams
        value, grads = jax.value_and_grad(loss)(
            state.params, state.key, state.step, hp["label_smoothing"]
        )
        tx = build_algorithm(algorithm, hp, total_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
            "loss": value
        }

    return step


def run_trial(
    program: Program,
    point: Mapping[str, float],
    seed: int,
    reached: Callable[[float], bool],
    max_runtime: float,
    better: Callable[[float, float], bool],
) -> dict[str, Any]:
    """One trial: initialise from ``seed``, train under the timing rules until the
    validation metric ``reached`` the target or the budget ends. Returns its record."""
    hp = as_hparams(point)
    key = jax.random.fold_in(jax.random.key(seed % 2**32), seed // 2**32)  # 64-bit seeds
    state = [program.init(key, hp)]
    tests: list[float] = []

    def train(n: int) -> None:
        state[0] = program.chunk(state[0])
        jax.block_until_ready(state[0].params)

    def evaluate() -> float:
        val, test = program.evaluate(state[0])
        tests.append(float(test))
        return float(val)

    timing = timed_trial(
        train,
        evaluate,
        reached,
        eval_period=program.eval_period,
        total_steps=program.total_steps,
        max_runtime=max(max_runtime - program.compile_s, 1e-9),  # the budget counts compiling
    )
    vals = [c["metric"] for c in timing.curve]
    best = _best_index(vals, better)
    hit = math.isfinite(timing.time_to_target)
    return {
        "seed": seed,
        "hparams": {k: float(v) for k, v in point.items()},
        "time_to_target": program.compile_s + timing.time_to_target if hit else math.inf,
        "steps_to_target": timing.steps_to_target,
        "compile_s": program.compile_s,
        "train_s": timing.train_time,
        "eval_s": timing.eval_time,
        "best_validation": vals[best] if vals else math.nan,
        "test_at_best": tests[best] if tests else math.nan,
        "test_at_target": tests[-1] if hit else None,
        "curve": [{**c, "test": t} for c, t in zip(timing.curve, tests, strict=True)],
    }


def _best_index(values: list[float], better: Callable[[float, float], bool]) -> int:
    best = 0
    for i, v in enumerate(values):
        if np.isfinite(v) and (not np.isfinite(values[best]) or better(v, values[best])):
            best = i
    return best
