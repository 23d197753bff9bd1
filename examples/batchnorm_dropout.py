"""Batch normalisation and dropout on MNIST-1D (T05, T06, T11).

    python examples/batchnorm_dropout.py        # ~1.5 min on 2 CPU cores

The paper's MLP (40-100-100-10), Adam 1e-2, batch 100, 3000 steps, with and without
BatchNorm (after each Dense, before the ReLU) and dropout (drop probability 0.3
after each hidden activation), averaged over 3 seeds. Expected (measured on the
2-core CPU): the plain MLP memorises the 3600 training examples (train accuracy
100%) and tests at 65.0%; BatchNorm 66.0%; dropout 67.3% with the train/test gap
down from 35 to 5 points; both 68.0% with a gap of 2 points.

Prints mean test accuracy, mean final train accuracy (in training mode, i.e. with
dropout on) and their gap, per configuration.
"""

from __future__ import annotations

import argparse
import statistics

import jtricks

CONFIGS = [
    ("plain", "mlp"),
    ("batchnorm", "mlp(norm='batch')"),
    ("dropout 0.3", "mlp(dropout=0.3)"),
    ("batchnorm + dropout 0.3", "mlp(norm='batch', dropout=0.3)"),
]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="BatchNorm and dropout on MNIST-1D")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", default="mnist1d")
    args = p.parse_args(argv)
    rows = []
    for label, model in CONFIGS:
        test, train = [], []
        for seed in range(args.seeds):
            r = jtricks.train(dataset=args.dataset, model=model, steps=args.steps, seed=seed)
            test.append(r.test["accuracy"])
            train.append(r.history.records[-1]["train_accuracy"])
        rows.append(
            {
                "config": label,
                "test": statistics.mean(test),
                "train": statistics.mean(train),
                "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            }
        )
        print(f"done {label}", flush=True)
    print(f"\nMNIST-1D MLP, {args.steps} steps, mean over {args.seeds} seeds\n")
    print(f"{'config':<26}{'test acc':>10}{'± std':>7}{'train acc':>11}{'gap':>7}")
    for r in rows:
        print(
            f"{r['config']:<26}{100 * r['test']:>9.1f}%{100 * r['test_std']:>6.1f}{100 * r['train']:>10.1f}%"
            f"{100 * (r['train'] - r['test']):>7.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
