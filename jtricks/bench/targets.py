"""Workload targets: how they are set, stored and checked.

AlgoPerf sets each workload's target from the best of a few well-tuned standard
algorithms. `set_targets` does the same on every workload of a suite: AdamW, NadamW,
heavy-ball and Nesterov momentum are each tuned (one study of quasi-random trials from
its search space, `jtricks.bench.search.space_for` unless one is given, run on the
target-setting seeds, which no scored trial uses); the algorithm and point with the best validation metric is rerun ``reruns`` times (further
target-setting seeds), and the targets are the medians over the reruns of the best
validation metric and of the test metric at that evaluation.

The suite's targets ship with the package (``jtricks/bench/targets/<suite>.json``,
written by ``jtricks bench targets --suite <suite>``); `load_targets` reads them or a
user's file and refuses a file of the wrong schema, naming what is wrong.

References:
  Dahl et al., "Benchmarking Neural Network Training Algorithms" (AlgoPerf, 2023),
  https://arxiv.org/abs/2306.07179 (target setting).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from jtricks.bench.search import Range, make_studies, space_for, target_seeds
from jtricks.bench.workloads import Workload
from jtricks.errors import ConfigError

SCHEMA = "jtricks.bench.targets/1"
TARGET_ALGORITHMS = ("adamw", "nadamw", "heavy_ball", "nesterov")
TARGET_TRIALS = {"quick": 6, "full": 10}  # trials per algorithm and workload
RERUNS = 3
HERE = Path(__file__).parent / "targets"


def _bad(source: str, message: str) -> ConfigError:
    return ConfigError(f"target file {source}: {message}", param="targets")


def check_targets(obj: Any, workloads: list[Workload], source: str) -> dict[str, dict]:
    """The ``{workload: {"validation": v, "test": t, ...}}`` of a parsed target file,
    checked: its schema, a finite validation and test target for every workload of the
    run, and the workload's metric.

    Raises:
      ConfigError: naming the file and what is wrong.
    """
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        got = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
        raise _bad(source, f"schema must be {SCHEMA!r}; got {got!r}")
    entries = obj.get("workloads")
    if not isinstance(entries, dict):
        raise _bad(source, "'workloads' must map workload names to targets")
    out = {}
    for w in workloads:
        entry = entries.get(w.name)
        if not isinstance(entry, dict):
            raise _bad(
                source,
                f"no targets for workload {w.name!r}; set them with `jtricks bench targets "
                f"--workloads {w.name} --out FILE` and pass --targets FILE",
            )
        for key in ("validation", "test"):
            value = entry.get(key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise _bad(source, f"{w.name}: {key!r} must be a finite number; got {value!r}")
        if entry.get("metric") != w.metric:
            raise _bad(
                source,
                f"{w.name}: targets are for metric {entry.get('metric')!r}, the "
                f"workload is judged on {w.metric!r}",
            )
        out[w.name] = entry
    return out


def load_targets(path: str | None, suite: str, workloads: list[Workload]) -> dict[str, dict]:
    """Targets from ``path`` (a JSON file), or the suite's stored ones."""
    source = Path(path) if path is not None else HERE / f"{suite}.json"
    try:
        obj = json.loads(source.read_text())
    except OSError as e:
        raise ConfigError(
            f"cannot read target file {source}: {e.strerror}", param="targets"
        ) from None
    except ValueError as e:
        raise _bad(str(source), f"not valid JSON ({e})") from None
    return check_targets(obj, workloads, str(source))


def set_targets(
    workloads: list[Workload],
    space: dict[str, Range] | None,
    *,
    num_trials: int,
    reruns: int,
    seed: int = 0,
    progress=None,
) -> dict[str, Any]:
    """Tune the target-setting algorithms on every workload and return the target file's
    content (module docstring)."""
    from jtricks.bench.trials import compile_program, run_trial

    seeds = target_seeds(num_trials + reruns, seed=seed)
    points = {
        a: [t.hparams for t in make_studies(space or space_for(a), num_trials, 1, seed=seed + 1)[0]]
        for a in TARGET_ALGORITHMS
    }
    out: dict[str, Any] = {"schema": SCHEMA, "trials": num_trials, "reruns": reruns}
    out["workloads"] = {}
    for w in workloads:
        inst = w.build()
        better = w.better
        best: tuple[float, str, dict] | None = None
        programs = {}
        for algorithm in TARGET_ALGORITHMS:
            programs[algorithm] = compile_program(w, inst, algorithm, w.total_steps)
            for point, s in zip(points[algorithm], seeds, strict=False):
                trial = run_trial(programs[algorithm], point, s, _never, w.max_runtime, better)
                value = trial["best_validation"]
                if math.isfinite(value) and (best is None or better(value, best[0])):
                    best = (value, algorithm, point)
                if progress:
                    progress()
        if best is None:
            raise RuntimeError(f"{w.name}: no target-setting trial ended finite")
        _, algorithm, point = best
        reruns_ = [
            run_trial(programs[algorithm], point, s, _never, w.max_runtime, better)
            for s in seeds[num_trials:]
        ]
        out["workloads"][w.name] = {
            "metric": w.metric,
            "validation": statistics.median(r["best_validation"] for r in reruns_),
            "test": statistics.median(r["test_at_best"] for r in reruns_),
            "set_by": {"algorithm": algorithm, "hparams": point, "reruns": len(reruns_)},
        }
    return out


def _never(value: float) -> bool:
    return False
