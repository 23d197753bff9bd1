"""`jtricks bench`: problems x optimizers x seeds, tuned, timed and scored.

Protocol, per optimization problem and optimizer:

1. **Tune** the learning rate on a log grid: every rate of the grid trains from the
   same initialisation in ONE compiled program (`jax.vmap` over the optimizer's
   injected learning rate, `lax.scan` over the step budget); the rate with the best
   final validation metric wins (a diverged rate scores worst).
2. **Seeds**: N runs at that rate (seed ``s`` draws the initialisation and the batches).
   Each run executes in chunks of ``eval_every`` steps, compiled ahead of time once
   (so compilation is measured on its own), evaluating the validation metric after
   every chunk; the wall clock after each chunk gives the curve against time.
3. **Time-to-target**: the wall time of the first evaluation that reaches the target,
   without and with the compilation time; ``inf`` if never reached. A problem's figure
   for an optimizer is the median over seeds.
4. **Scores** (`jtricks.bench.scoring`): ratios to the fastest optimizer per problem,
   performance profiles over tau in [1, 4] and their normalised areas (AlgoPerf), and
   the per-step runtime overhead relative to SGD on the same problem (DeepOBS).

Throughput problems time a compiled chunk of training steps (median of 3) and report
images/s and, when XLA's cost analysis gives the FLOPs and the device's peak is known,
the model FLOP utilisation.

Outputs in the run folder: ``results.json`` (schema ``jtricks.bench/1``), ``results.md``,
``curves.png`` (validation metric against steps per problem) and ``profile.png``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.bench.device import lowered_flops, peak_flops
from jtricks.bench.problems import LR_GRIDS, OPTIMIZERS, SEEDS, SUITES, Problem, suite_problems
from jtricks.bench.scoring import (
    default_taus,
    performance_profile,
    performance_ratios,
    profile_score,
)
from jtricks.errors import ConfigError, check_int, unknown_name
from jtricks.optim import build_optimizer, contract, set_learning_rate

SCHEMA = "jtricks.bench/1"


def _better(problem: Problem, a: float, b: float) -> bool:
    """Is metric value ``a`` better than ``b``? NaN is worst."""
    if not np.isfinite(a):
        return False
    if not np.isfinite(b):
        return True
    return a < b if problem.metric == "loss" else a > b


def tune(problem: Problem, inst, optimizer: str, lrs: np.ndarray) -> np.ndarray:
    """Final validation metric of every learning rate, trained side by side (one program)."""
    tx = build_optimizer(optimizer, 1.0)
    key = jax.random.key(0)
    params0 = inst.init(key)

    @jax.jit
    def run(lrs):
        def one(lr):
            opt_state = set_learning_rate(tx.init(params0), lr)

            def step(carry, t):
                params, opt_state = carry
                loss, grads = jax.value_and_grad(inst.loss)(params, key, t)
                updates, opt_state = contract.update(
                    tx,
                    grads,
                    opt_state,
                    params,
                    value=loss,
                    value_fn=lambda p: inst.loss(p, key, t),
                )
                return (optax.apply_updates(params, updates), opt_state), loss

            (params, _), _ = jax.lax.scan(step, (params0, opt_state), jnp.arange(problem.steps))
            return inst.evaluate(params)

        return jax.vmap(one)(lrs)

    return np.asarray(run(jnp.asarray(lrs, jnp.float32)), np.float64)


def _chunk_fn(problem: Problem, inst, optimizer: str):
    tx = build_optimizer(optimizer, 1.0)

    def chunk(params, opt_state, key, start):
        def step(carry, t):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(inst.loss)(params, key, t)
            updates, opt_state = contract.update(
                tx, grads, opt_state, params, value=loss, value_fn=lambda p: inst.loss(p, key, t)
            )
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), start + jnp.arange(problem.eval_every)
        )
        return params, opt_state, jnp.mean(losses), inst.evaluate(params)

    return tx, jax.jit(chunk, donate_argnums=(0, 1))


def timed_runs(problem: Problem, inst, optimizer: str, lr: float, seeds: int, progress=None):
    """Seeded runs at ``lr``: curves against steps and wall time, time-to-target."""
    tx, chunk = _chunk_fn(problem, inst, optimizer)
    key0 = jax.random.key(0)
    params = inst.init(key0)
    opt_state = set_learning_rate(tx.init(params), jnp.float32(lr))
    t = time.perf_counter()
    compiled = chunk.lower(params, opt_state, key0, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t
    runs = []
    n_chunks = problem.steps // problem.eval_every
    for seed in range(seeds):
        key = jax.random.key(seed)
        params = inst.init(key)
        opt_state = set_learning_rate(tx.init(params), jnp.float32(lr))
        jax.block_until_ready((params, opt_state))
        steps, metric, train_loss, wall = [], [], [], []
        t0 = time.perf_counter()
        for c in range(n_chunks):
            params, opt_state, loss, value = compiled(
                params, opt_state, key, jnp.int32(c * problem.eval_every)
            )
            loss, value = float(loss), float(value)
            wall.append(time.perf_counter() - t0)
            steps.append((c + 1) * problem.eval_every)
            metric.append(value)
            train_loss.append(loss)
        hit = next((i for i, v in enumerate(metric) if problem.reached(v)), None)
        runs.append(
            {
                "seed": seed,
                "steps": steps,
                "metric": metric,
                "train_loss": train_loss,
                "time_s": wall,
                "steps_to_target": steps[hit] if hit is not None else None,
                "time_to_target_s": wall[hit] if hit is not None else math.inf,
                "time_to_target_with_compile_s": wall[hit] + compile_s
                if hit is not None
                else math.inf,
                "final_metric": metric[-1],
                "steps_per_s": steps[-1] / wall[-1],
            }
        )
        if progress is not None:
            progress()
    return compile_s, runs


def throughput(
    problem: Problem,
    inst,
    optimizer: Any,
    precision_peak: str = "float32",
    *,
    label: str | None = None,
) -> dict:
    """Images/s of a compiled chunk of training steps (median of 3 after compilation)."""
    tx, chunk = _chunk_fn(problem, inst, optimizer)
    key = jax.random.key(0)
    params = inst.init(key)
    opt_state = set_learning_rate(tx.init(params), jnp.float32(1e-3))
    t = time.perf_counter()
    lowered = chunk.lower(params, opt_state, key, jnp.int32(0))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    flops = lowered_flops(lowered)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        params, opt_state, loss, _ = compiled(params, opt_state, key, jnp.int32(0))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    batch = int(problem.description.rsplit("batch", 1)[1].split()[0])
    dev = jax.devices()[0]
    peak = peak_flops(dev.device_kind, precision_peak)
    return {
        "problem": problem.name,
        "optimizer": optimizer if label is None else label,
        "batch_size": batch,
        "steps": problem.eval_every,
        "images_per_s": problem.eval_every * batch / med,
        "steps_per_s": problem.eval_every / med,
        "flops_per_step": flops / problem.eval_every if flops else None,
        "mfu": (flops / med / peak) if flops and peak else None,
        "compile_s": compile_s,
        "times_s": times,
    }


def run_suite(
    suite: str = "quick",
    *,
    optimizers: Sequence[Any] | Mapping[str, Any] | None = None,
    problems: list[str] | None = None,
    seeds: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a suite and return the results dict (``results.json``'s content).

    ``optimizers``: specs (strings, named in the results as written), Python callables
    ``lr -> GradientTransformation`` (named by ``__name__``), or a dict ``{label: spec}``
    for any mix (see `labelled_optimizers`); default: the suite's own list."""
    all_problems = _select(suite, problems)
    specs = labelled_optimizers(optimizers or OPTIMIZERS[suite])
    optimizers = list(specs)
    for spec in specs.values():
        build_optimizer(spec)  # any optimizer spec; a bad one is a ConfigError before any run
    seeds = check_int("seeds", seeds if seeds is not None else SEEDS[suite], low=1)
    grid = np.geomspace(*LR_GRIDS[suite])
    optim_problems = [p for p in all_problems if p.kind == "optimize"]
    tp_problems = [p for p in all_problems if p.kind == "throughput"]
    total = len(optim_problems) * len(optimizers) * (1 + seeds) + len(tp_problems) * len(optimizers)
    bar = _Progress(total) if progress else None
    results = _header(suite, all_problems, optimizers, grid, seeds)
    t_suite = time.perf_counter()
    try:
        for problem in optim_problems:
            inst = problem.build()
            for opt in optimizers:
                results["runs"].append(_tuned_run(problem, inst, opt, specs[opt], grid, seeds, bar))
        for problem in tp_problems:
            inst = problem.build()
            for opt in optimizers:
                if bar:
                    bar.describe(f"{problem.name} / {opt}")
                results["throughput"].append(throughput(problem, inst, specs[opt], label=opt))
                if bar:
                    bar.advance()
    finally:
        if bar:
            bar.close()
    results["wall_s"] = time.perf_counter() - t_suite
    results["scores"] = score(results)
    return results


def _select(suite: str, problems: list[str] | None) -> list[Problem]:
    """The suite's problems, or the named subset of them."""
    if suite not in SUITES:
        raise unknown_name("suite", suite, SUITES)
    all_problems = suite_problems(suite)
    if problems is None:
        return all_problems
    names = {p.name for p in all_problems}
    for name in problems:
        if name not in names:
            raise unknown_name("problem", name, names)
    return [p for p in all_problems if p.name in problems]


def _header(suite: str, problems: list[Problem], optimizers: list[str], grid, seeds: int) -> dict:
    """The results dict before any run: schema, environment, protocol and problems."""
    from jtricks.rundir import environment

    return {
        "schema": SCHEMA,
        "suite": suite,
        "environment": environment(),
        "protocol": {"lr_grid": grid.tolist(), "seeds": seeds, "tau_max": 4.0},
        "problems": [
            {
                "name": p.name,
                "description": p.description,
                "kind": p.kind,
                "metric": p.metric,
                "target": p.target,
                "steps": p.steps,
                "eval_every": p.eval_every,
            }
            for p in problems
        ],
        "optimizers": optimizers,
        "runs": [],
        "throughput": [],
    }


def _tuned_run(problem: Problem, inst, opt: str, spec: Any, grid, seeds: int, bar) -> dict:
    """Tune the learning rate of optimizer ``opt`` on the grid, then time ``seeds`` runs at
    the best rate: one entry of ``results["runs"]``."""
    if bar:
        bar.describe(f"{problem.name} / {opt}: tuning")
    t = time.perf_counter()
    finals = tune(problem, inst, spec, grid)
    tune_s = time.perf_counter() - t
    best = 0
    for i in range(1, len(grid)):
        if _better(problem, finals[i], finals[best]):
            best = i
    if bar:
        bar.advance()
        bar.describe(f"{problem.name} / {opt}: {seeds} seeds at lr {grid[best]:.2g}")
    lr = float(grid[best])
    compile_s, runs = timed_runs(problem, inst, spec, lr, seeds, bar.advance if bar else None)
    ttt = [r["time_to_target_s"] for r in runs]
    return {
        "problem": problem.name,
        "optimizer": opt,
        "lr": lr,
        "tune_final_metric": [float(v) if np.isfinite(v) else None for v in finals],
        "tune_s": tune_s,
        "compile_s": compile_s,
        "seeds": runs,
        "median_time_to_target_s": _median_inf(ttt),
        "median_time_to_target_with_compile_s": _median_inf(
            [r["time_to_target_with_compile_s"] for r in runs]
        ),
        "reached": sum(math.isfinite(v) for v in ttt),
        "steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
        "final_metric": statistics.median(r["final_metric"] for r in runs),
    }


def labelled_optimizers(optimizers: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """``{label: spec}`` for the results tables: a dict as given; a string labels itself;
    a callable by its ``__name__``.

    Raises:
      ConfigError: a lambda (no name: give a dict ``{label: callable}``), a repeated
        label, or an empty list.
    """
    if isinstance(optimizers, Mapping):
        items = list(optimizers.items())
    elif isinstance(optimizers, str):
        items = [(optimizers, optimizers)]
    else:
        items = []
        for spec in optimizers:
            if isinstance(spec, str):
                items.append((spec, spec))
                continue
            name = getattr(spec, "__name__", None)
            if not callable(spec) or not name or name == "<lambda>":
                raise ConfigError(
                    f"optimizer {spec!r} has no name for the results; pass a dict "
                    "{label: spec} (e.g. {'nesterov': lambda lr: optax.sgd(lr, 0.9, nesterov=True)})",
                    param="optimizers",
                )
            items.append((name, spec))
    labels = [label for label, _ in items]
    if not items or any(not isinstance(label, str) or not label for label in labels):
        raise ConfigError(
            f"optimizers must be non-empty, with non-empty string labels; got {labels!r}",
            param="optimizers",
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"optimizer labels repeat: {repeated}", param="optimizers")
    return dict(items)


def _median_inf(values: list[float]) -> float:
    """Median where ``inf`` (target missed) sorts last."""
    return float(statistics.median(sorted(values)))


def score(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios, profiles and profile scores from the runs; overhead per step vs SGD."""
    times: dict[str, dict[str, float]] = {}
    step_rate: dict[str, dict[str, float]] = {}
    for run in results["runs"]:
        times.setdefault(run["problem"], {})[run["optimizer"]] = run["median_time_to_target_s"]
        step_rate.setdefault(run["problem"], {})[run["optimizer"]] = run["steps_per_s"]
    for tp in results.get("throughput", []):
        step_rate.setdefault(tp["problem"], {})[tp["optimizer"]] = tp["steps_per_s"]
    out: dict[str, Any] = {}
    if times:
        ratios = performance_ratios(times)
        taus = default_taus(results["protocol"]["tau_max"])
        out["ratios"] = ratios
        out["profile"] = {"taus": taus, **performance_profile(ratios, taus)}
        out["score"] = profile_score(ratios, results["protocol"]["tau_max"])
    out["overhead_vs_sgd"] = {
        p: {o: rate["sgd"] / r for o, r in rate.items()}
        for p, rate in step_rate.items()
        if "sgd" in rate
    }
    return out


class _Progress:
    """A rich progress bar over the whole suite."""

    def __init__(self, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self.p.start()
        self.task = self.p.add_task("bench", total=total)

    def describe(self, text: str) -> None:
        self.p.update(self.task, description=text)

    def advance(self) -> None:
        self.p.advance(self.task)

    def close(self) -> None:
        self.p.stop()


# ----------------------------------------------------------------------------- reports


def jsonable(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON; ``null`` time-to-target
    means the target was not reached)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj
