"""`jtricks bench`, protocol v2: algorithms tuned, timed and scored as AlgoPerf v0.6 does.

Per workload of the suite (`jtricks.bench.workloads`) and algorithm
(`jtricks.bench.algorithms`):

* **External tuning** (ruleset ``external``): ``M`` studies of ``N`` quasi-random trials
  drawn from one search space for all workloads (`jtricks.bench.search.make_studies`),
  each algorithm's own as AlgoPerf's baselines have theirs (`space_for`: the learning
  rate range moves for momentum SGD and Lion); the same quasi-random points and run
  seeds for every algorithm;
  every trial has its own run seed, none of them a target-setting seed.
* **Self-tuning** (ruleset ``self-tuning``): no tuning. Each of the ``M`` studies is one
  run at the algorithm's defaults (`defaults_for`) with 1.5 times the step budget
  and ``max_runtime``.
* **Timing** (`jtricks.bench.protocol.timed_trial`): compilation counted, evaluation
  every ``eval_period`` steps untimed, a trial that passes ``max_runtime`` stops unreached.
  A trial's time is its time to reach the workload's validation target (the suite's
  stored targets, `jtricks.bench.targets`).
* **Scores** (`jtricks.bench.scoring`): a workload's time is the median over studies of
  each study's fastest trial; performance profiles over tau in [1, 4] and their score;
  the geometric-mean speedup over the NadamW baseline.

The results (schema ``jtricks.bench/2``) keep every trial: its point, seed, time, the
validation and test metric of every evaluation, so the learning-rate sensitivity of each
algorithm can be drawn from them.

References:
  Dahl et al., "Benchmarking Neural Network Training Algorithms" (AlgoPerf, 2023),
  https://arxiv.org/abs/2306.07179, and the AlgoPerf v0.6 rules; Kasimbeg et al.,
  "Accelerating Neural Network Training: An Analysis of the AlgoPerf Competition" (2025).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from jtricks.bench.algorithms import (
    BASELINE,
    DEFAULT_HPARAMS,
    check_algorithm,
    defaults_for,
    labelled_algorithms,
)
from jtricks.bench.protocol import reaches
from jtricks.bench.scoring import (
    default_taus,
    geometric_mean_speedup,
    performance_profile,
    performance_ratios,
    profile_score,
    workload_time,
)
from jtricks.bench.search import Range, make_studies, space_for
from jtricks.bench.workloads import Workload
from jtricks.errors import check_int, unknown_name

SCHEMA = "jtricks.bench/2"
RULESETS = ("external", "self-tuning")
ALGORITHMS = {
    "quick": ("nadamw", "adamw", "heavy_ball", "lion", "schedule_free_adamw", "muon"),
    "full": ("nadamw", "adamw", "heavy_ball", "nesterov", "lion", "schedule_free_adamw", "muon"),
}
TRIALS = {"quick": (5, 3), "full": (5, 5)}  # (trials per study, studies), as AlgoPerf: 5 x 5
SELF_TUNING_FACTOR = 1.5


def check_ruleset(ruleset: str) -> str:
    if ruleset not in RULESETS:
        raise unknown_name("ruleset", ruleset, RULESETS)
    return ruleset


def plan(
    ruleset: str,
    space: dict[str, Range],
    num_trials: int,
    num_studies: int,
    seed: int,
    defaults: dict[str, float] = DEFAULT_HPARAMS,
) -> list[list[dict[str, Any]]]:
    """The studies of a run: lists of ``{"point", "seed"}`` trials (self-tuning: one run
    at ``defaults`` per study)."""
    studies = make_studies(
        space, num_trials if ruleset == "external" else 1, num_studies, seed=seed
    )
    if ruleset == "self-tuning":
        return [[{"point": dict(defaults), "seed": s[0].seed}] for s in studies]
    return [[{"point": t.hparams, "seed": t.seed} for t in s] for s in studies]


def run_algoperf(
    workloads: list[Workload],
    targets: dict[str, dict],
    *,
    suite: str = "quick",
    ruleset: str = "external",
    algorithms: Sequence[Any] | Mapping[str, Any] | None = None,
    num_trials: int | None = None,
    num_studies: int | None = None,
    space: dict[str, Range] | None = None,
    seed: int = 0,
    progress=None,
) -> dict[str, Any]:
    """Run the protocol; return the results dict (``results.json``'s content).

    ``algorithms``: names of `ALGORITHMS`, optimizer specs, or callables
    ``learning_rate -> GradientTransformation`` (labelled by their ``__name__``), or a
    dict ``{label: any of these}`` (`labelled_algorithms`); default the suite's."""
    from jtricks.rundir import environment

    check_ruleset(ruleset)
    specs = labelled_algorithms(algorithms or ALGORITHMS[suite])  # {label: name or callable}
    for spec in specs.values():
        check_algorithm(spec)
    algorithms = list(specs)
    n, m = TRIALS[suite]
    n = check_int("trials", num_trials if num_trials is not None else n, low=1)
    m = check_int("studies", num_studies if num_studies is not None else m, low=1)
    spaces = {a: space or space_for(a) for a in algorithms}
    studies = {a: plan(ruleset, spaces[a], n, m, seed, defaults_for(a)) for a in algorithms}
    results = {
        "schema": SCHEMA,
        "suite": suite,
        "ruleset": ruleset,
        "environment": environment(),
        "protocol": {
            "trials": n if ruleset == "external" else 1,
            "studies": m,
            "seed": seed,
            "spaces": {a: {k: vars(r) for k, r in sp.items()} for a, sp in spaces.items()},
            "tau_max": 4.0,
            "baseline": BASELINE,
            "compilation_cache": _cache_dir(),
        },
        "workloads": [_describe(w, targets[w.name]) for w in workloads],
        "algorithms": algorithms,
        "trials": [],
    }
    start = time.perf_counter()
    for w in workloads:
        results["trials"] += _run_workload(w, targets[w.name], specs, studies, ruleset, progress)
    results["wall_s"] = time.perf_counter() - start
    results["workload_times"] = workload_times(results)
    results["scores"] = score(results["workload_times"], algorithms)
    return results


def _cache_dir() -> str | None:
    """JAX's persistent compilation cache, if the user set one: compile times then
    include cache hits (``jtricks bench`` itself never sets it)."""
    import jax

    return jax.config.jax_compilation_cache_dir or None


def _describe(w: Workload, target: dict) -> dict[str, Any]:
    keys = ("name", "description", "metric", "batch_size", "total_steps", "eval_period")
    return {
        **{k: getattr(w, k) for k in keys},
        "max_runtime": w.max_runtime,
        "target": {"validation": target["validation"], "test": target["test"]},
    }


def _run_workload(w, target, specs, studies, ruleset, progress) -> list[dict[str, Any]]:
    from jtricks.bench.trials import compile_program, run_trial

    if ruleset == "self-tuning":
        w = replace(
            w,
            total_steps=int(w.total_steps * SELF_TUNING_FACTOR) // w.eval_period * w.eval_period,
            max_runtime=w.max_runtime * SELF_TUNING_FACTOR,
        )
    inst = w.build()
    reached = reaches(w.metric, target["validation"])
    test_reached = reaches(w.metric, target["test"])
    better = w.better
    out = []
    for algorithm, spec in specs.items():
        program = compile_program(w, inst, spec, w.total_steps)
        for s, study in enumerate(studies[algorithm]):
            for i, trial in enumerate(study):
                record = run_trial(
                    program, trial["point"], trial["seed"], reached, w.max_runtime, better
                )
                at = record["test_at_target"]
                out.append(
                    {
                        "workload": w.name,
                        "algorithm": algorithm,
                        "study": s,
                        "trial": i,
                        **record,
                        "test_reached": at is not None and test_reached(at),
                    }
                )
                if progress:
                    progress(f"{w.name} / {algorithm}: study {s + 1}, trial {i + 1}")
    return out


def workload_times(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{workload: {algorithm: time}}``: the median over studies of each study's fastest
    trial to the validation target (`jtricks.bench.scoring.workload_time`)."""
    table: dict[str, dict[str, dict[int, list[float]]]] = {}
    for t in results["trials"]:
        row = table.setdefault(t["workload"], {}).setdefault(t["algorithm"], {})
        row.setdefault(t["study"], []).append(t["time_to_target"])
    return {
        w: {a: workload_time(list(studies.values())) for a, studies in row.items()}
        for w, row in table.items()
    }


def score(times: dict[str, dict[str, float]], algorithms: list[str]) -> dict[str, Any]:
    """Performance ratios, profiles, their score, and the speedup over the baseline."""
    ratios = performance_ratios(times)
    taus = default_taus(4.0)
    out: dict[str, Any] = {
        "ratios": ratios,
        "profile": {"taus": taus, **performance_profile(ratios, taus)},
        "score": profile_score(ratios, 4.0),
    }
    if BASELINE in algorithms:
        out["speedup_vs_baseline"] = geometric_mean_speedup(times, BASELINE)
    out["reached"] = {
        a: sum(math.isfinite(row.get(a, math.inf)) for row in times.values()) for a in algorithms
    }
    return out


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
