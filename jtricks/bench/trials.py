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


def as_hparams(point: Mapping[str, float]) -> dict[str, jax.Array]:
    """A trial's point, completed with `DEFAULT_HPARAMS`, as float32 scalars."""
    return {k: jnp.float32(point.get(k, v)) for k, v in DEFAULT_HPARAMS.items()}


@dataclass
class Program:
    """The compiled functions of one algorithm on one workload."""

    algorithm: str
    total_steps: int
    eval_period: int
    init: Callable[[jax.Array, Any], tuple[Any, Any]]
    chunk: Any
    evaluate: Callable[[Any, Any], tuple[jax.Array, jax.Array]]
    compile_s: float


def compile_program(w: Workload, inst: Instance, algorithm: str, total_steps: int) -> Program:
    """Build and compile ``algorithm``'s training chunk (``eval_period`` steps in a
    `jax.lax.scan`) on ``w``; the compile time is measured here."""
    if total_steps % w.eval_period:
        raise ValueError(f"{w.name}: {total_steps} steps are not whole evaluation periods")

    def init(key, hp):
        params = inst.init(key)
        return params, build_algorithm(algorithm, hp, total_steps).init(params)

    def chunk(params, opt_state, key, start, hp):
        tx = build_algorithm(algorithm, hp, total_steps)

        def step(carry, t):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(inst.loss)(params, key, t, hp["label_smoothing"])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        steps = start + jnp.arange(w.eval_period)
        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), steps)
        return params, opt_state

    def evaluate(params, opt_state):
        return inst.evaluate(eval_params(algorithm, params, opt_state))

    hp = as_hparams({})
    init = jax.jit(init)
    params, opt_state = init(jax.random.key(0), hp)
    start = time.perf_counter()
    compiled = (
        jax.jit(chunk, donate_argnums=(0, 1))
        .lower(params, opt_state, jax.random.key(0), jnp.int32(0), hp)
        .compile()
    )
    compile_s = time.perf_counter() - start
    return Program(
        algorithm, total_steps, w.eval_period, init, compiled, jax.jit(evaluate), compile_s
    )


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
    state = list(program.init(key, hp))
    tests: list[float] = []

    def train(n: int) -> None:
        start = jnp.int32(len(tests) * program.eval_period)
        state[:] = program.chunk(state[0], state[1], key, start, hp)
        jax.block_until_ready(state[0])

    def evaluate() -> float:
        val, test = program.evaluate(*state)
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
