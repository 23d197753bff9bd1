"""Trials side by side against one after another, in one process, each arm from empty
caches (`jtricks.clear_caches`, which clears JAX's too; run it with
``JTRICKS_COMPILATION_CACHE=0``, as below, so nothing comes from disk either):

* ``sequential``: the N trials' configs (`jtricks.search.trial_config`) trained one after
  another by `jtricks.train`, as a researcher's loop over runs does;
* ``one_by_one``: `jtricks.search.search` with ``parallel=1`` (each trial a program of
  one member; the programs are equal, so it compiles once);
* ``side_by_side``: `search` with ``parallel=N``, one vmapped program of N members.

The two searches draw the same trials (quasi-random rates) with the same keys, so every
trial's validation losses must agree (checked: allclose, rtol 1e-3). The default
optimizer is momentum SGD: with Adam the last-bit differences between the vmapped and
the single matrix products flip the sign of updates where a gradient is near zero
(``m / sqrt(v)`` is about +-1 there), and a few trials then drift apart by 1-4 %.
The figures: each arm's median wall time over ``--repeats`` rounds (arms in turn), ``ratio_parallel_over_sequential`` (side by side over
the training loop) and ``ratio_parallel_over_one_by_one``.

    JTRICKS_COMPILATION_CACHE=0 python benchmarks/bench_search.py   # 8 MLP trials, mnist1d
    JTRICKS_COMPILATION_CACHE=0 python benchmarks/bench_search.py --epochs 1 --trials 2

Prints JSON (one object) then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from timing import write_result

from jtricks import clear_caches
from jtricks.run import TrainConfig, environment, train
from jtricks.run.data import load_run_data
from jtricks.search.runner import SearchSettings, search
from jtricks.search.space import make_sampler, parse_space, trial_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--optimizer", default="momentum")
    p.add_argument("--space", default="lr=loguniform(1e-3, 1e-1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three arms, in turn")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def run_search(config: TrainConfig, space: str, trials: int, parallel: int, data) -> tuple:
    """Wall seconds of one search from empty caches, its trials' validation losses and
    the result."""
    clear_caches()
    t0 = time.perf_counter()
    settings = SearchSettings(space, trials, "random", parallel, metric="loss")
    result = search(config, settings, data=data)
    wall = time.perf_counter() - t0
    return wall, {r["trial"]: r["val_loss"] for r in result.records}, result


def run_loop(config: TrainConfig, space: str, trials: int) -> float:
    """Wall seconds of the same trials trained one after another by `jtricks.train`."""
    points = make_sampler("random", parse_space(space), trials, seed=config.seed)
    configs = [trial_config(config, values) for values in points]
    clear_caches()
    t0 = time.perf_counter()
    for c in configs:
        train(c)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = TrainConfig(
        dataset=args.dataset, model=args.model, epochs=args.epochs, optimizer=args.optimizer
    )
    data = load_run_data(config)  # loaded once, outside the search arms
    times: dict[str, list[float]] = {"sequential": [], "one_by_one": [], "parallel": []}
    for _ in range(args.repeats):  # A B C A B C: the machine's drift falls on every arm
        times["sequential"].append(run_loop(config, args.space, args.trials))
        wall, one, _ = run_search(config, args.space, args.trials, 1, data)
        times["one_by_one"].append(wall)
        wall, par, best = run_search(config, args.space, args.trials, args.trials, data)
        times["parallel"].append(wall)
    loop_s, one_s, par_s = (statistics.median(times[k]) for k in times)
    equal = sorted(one) == sorted(par) and all(np.allclose(one[t], par[t], rtol=1e-3) for t in one)
    worst = max(float(np.max(np.abs(np.subtract(one[t], par[t])) / np.abs(one[t]))) for t in one)
    result = {
        "benchmark": "search",
        "dataset": args.dataset,
        "model": args.model,
        "epochs": args.epochs,
        "trials": args.trials,
        "optimizer": args.optimizer,
        "space": args.space,
        "repeats": args.repeats,
        "sequential_s": loop_s,
        "one_by_one_s": one_s,
        "parallel_s": par_s,
        "times_s": times,
        "ratio_parallel_over_sequential": par_s / loop_s,
        "ratio_parallel_over_one_by_one": par_s / one_s,
        "equal_results": bool(equal),
        "max_relative_difference_val_loss": worst,
        "best_trial": best.best["trial"] if best.best else None,
        "environment": environment(),
    }
    print(json.dumps(result))
    print(
        f"\n{args.trials} trials, {args.model}, {args.epochs} epochs: median wall of "
        f"{args.repeats}, each from empty caches"
    )
    print(f"  jtricks.train, one after another  {loop_s:7.2f} s")
    print(f"  search, parallel=1                {one_s:7.2f} s")
    print(f"  search, side by side              {par_s:7.2f} s")
    print(f"  ratio over the loop {par_s / loop_s:.3f}, over parallel=1 {par_s / one_s:.3f}")
    print(f"  trials equal (rtol 1e-3): {equal} (largest difference {worst:.1e})")
    write_result(result, args.json_out)
    if not equal:
        raise SystemExit("bench_search: the two arms' trials differ")
    return result


if __name__ == "__main__":
    main()
