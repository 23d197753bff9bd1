"""Tools for long-tailed data against plain training: balanced test accuracy on
``mnist1d(imbalance=R)``, the balanced dataset's as the reference.

Each arm is one `jtricks.train` run (the default CNN and schedule unless told) per seed:
plain training, ``class_weight=balanced``, ``sampler=balanced``, ``loss=focal(gamma=2)``
and ``logit_adjust=1``, on the long-tailed training split with its clean, balanced
validation split; then plain training on the balanced dataset. The figure is the test
split's balanced accuracy (mean per-class recall; the test split is balanced, so it is
close to the accuracy), mean and sample standard deviation over seeds.

    python benchmarks/bench_imbalance.py                       # R = 100, 3 seeds, CNN
    python benchmarks/bench_imbalance.py --steps 300 --seeds 1 --model mlp   # quick

Prints JSON (one object) then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from timing import write_result

from jtricks.run import environment, train

ARMS = {
    "plain": {},
    "class_weight=balanced": {"class_weight": "balanced"},
    "sampler=balanced": {"sampler": "balanced"},
    "focal(gamma=2)": {"loss": "focal(gamma=2.0)"},
    "logit_adjust=1": {"logit_adjust": 1.0},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="cnn")
    p.add_argument("--steps", type=int, default=None, help="default: the config's 6000")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def run_arm(dataset: str, settings: dict, args: argparse.Namespace) -> dict:
    """Balanced test accuracy (and accuracy) of one arm over the seeds."""
    balanced, accuracy = [], []
    for seed in range(args.seeds):
        kw = {"steps": args.steps} if args.steps else {}
        result = train(dataset=dataset, model=args.model, seed=seed, **kw, **settings)
        balanced.append(result.test["balanced_accuracy"])
        accuracy.append(result.test["accuracy"])
    spread = statistics.stdev(balanced) if len(balanced) > 1 else 0.0
    return {
        "balanced_accuracy_mean": statistics.fmean(balanced),
        "balanced_accuracy_std": spread,
        "accuracy_mean": statistics.fmean(accuracy),
        "balanced_accuracy": balanced,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    long_tailed = f"mnist1d(imbalance={args.imbalance})"
    t0 = time.perf_counter()
    names = args.arms.split(",")
    unknown = sorted(set(names) - set(ARMS))
    if unknown or "plain" not in names:
        raise SystemExit(f"--arms: need plain and names among {', '.join(ARMS)}; got {unknown}")
    arms = {name: run_arm(long_tailed, ARMS[name], args) for name in names}
    reference = run_arm("mnist1d", {}, args)
    plain = arms["plain"]["balanced_accuracy_mean"]
    result = {
        "benchmark": "imbalance",
        "dataset": long_tailed,
        "model": args.model,
        "steps": args.steps or "default (6000)",
        "seeds": args.seeds,
        "arms": arms,
        "balanced_dataset": reference,
        "gain_over_plain": {k: v["balanced_accuracy_mean"] - plain for k, v in arms.items()},
        "wall_s": time.perf_counter() - t0,
        "environment": environment(),
    }
    print(json.dumps(result))
    print(f"\n{long_tailed}, model {args.model}, {args.seeds} seed(s): test balanced accuracy")
    for name, arm in [*arms.items(), ("balanced dataset (reference)", reference)]:
        mean, std = arm["balanced_accuracy_mean"], arm["balanced_accuracy_std"]
        print(f"  {name:30s} {mean:.3f} ± {std:.3f}")
    write_result(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
