"""Every jtricks optimizer on the same MNIST-1D model (T12-T17).

    python examples/optimizers.py                 # ~2 min on 2 CPU cores

The paper's CNN, batch 100, 2000 steps, seed 0, each optimizer at a usual
learning rate for it. Expected (measured on the 2-core CPU): Adam about 91% and
AdamW about 89% test accuracy, Adagrad and Adadelta 85-87%, SGD and the
momentum forms about 83% (damped momentum at lr 0.1 tracks classic at 0.01, as
T13 says it should), Adam with Lookahead about 88%, RMSProp at 1e-3 about 71%
and normalised GD about 68% at this budget.

Prints a table: learning rate, final train loss, validation loss, test accuracy
and wall time (compilation included).
"""

from __future__ import annotations

import argparse

import jtricks

OPTIMIZERS = [
    ("sgd", 0.1),
    ("momentum", 0.01),
    ("momentum(form='damped')", 0.1),
    ("momentum(form='torch', nesterov=True)", 0.01),
    ("adagrad", 0.05),
    ("normalized_sgd", 0.1),
    ("rmsprop", 1e-3),
    ("adam", 1e-2),
    ("adamw(weight_decay=1e-2)", 1e-2),
    ("adam | lookahead", 1e-2),  # 5 fast steps, then halfway back (sync_period=5, alpha=0.5)
    ("adadelta", 1.0),
]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="compare optimizers on MNIST-1D")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist1d")
    args = p.parse_args(argv)

    rows = []
    for spec, lr in OPTIMIZERS:
        r = jtricks.train(
            dataset=args.dataset,
            model=args.model,
            optimizer=spec,
            learning_rate=lr,
            steps=args.steps,
        )
        last = r.history.records[-1]
        rows.append(
            {
                "optimizer": spec,
                "lr": lr,
                "train_loss": last["train_loss"],
                "val_loss": last["val_loss"],
                "test_accuracy": r.test["accuracy"],
                "wall_s": r.wall_s,
            }
        )
        print(f"done {spec}", flush=True)
    print(f"\n{args.model} on {args.dataset}, {args.steps} steps, batch 100, seed 0\n")
    print(
        f"{'optimizer':<40}{'lr':>8}{'train loss':>12}{'val loss':>10}{'test acc':>10}{'time':>8}"
    )
    for row in rows:
        print(
            f"{row['optimizer']:<40}{row['lr']:>8.0e}{row['train_loss']:>12.4f}{row['val_loss']:>10.4f}"
            f"{100 * row['test_accuracy']:>9.1f}%{row['wall_s']:>7.1f}s"
        )
    return rows


if __name__ == "__main__":
    main()
