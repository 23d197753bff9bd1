"""Regression with MSE on a generated set whose noise floor is known (T20).

    python examples/regression.py

``y = tanh(x W) V + 0.1 eps``: no model can beat the noise variance, 0.01, in expected
test MSE, so the gap to it shows what is left to learn. Trains an MLP (64-64, Adam 3e-3,
batch 64, 3000 steps) plain, then with a cosine decay of the learning rate and with
decoupled weight decay (AdamW) on top, and prints test MSE, MAE, R² and the gap to the
floor for each.
"""

from __future__ import annotations

import argparse

import jtricks

CONFIGS = [
    ("adam, constant rate", "adam", "constant"),
    ("adam, cosine decay", "adam", "cosine"),
    ("adamw(1e-4), cosine decay", "adamw(weight_decay=1e-4)", "cosine"),
]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="Regression with MSE against the noise floor")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--dataset", default="regression(num_train=4000, num_test=1000)")
    p.add_argument("--model", default="mlp(features=(64, 64))")
    args = p.parse_args(argv)
    rows = []
    for label, optimizer, schedule in CONFIGS:
        r = jtricks.train(
            dataset=args.dataset,
            model=args.model,
            optimizer=optimizer,
            learning_rate=3e-3,
            schedule=schedule,
            batch_size=64,
            steps=args.steps,
        )
        rows.append({"config": label, **r.test, "floor": r.loss_floor})
    print(f"\nregression, {args.model}, {args.steps} steps (noise floor {rows[0]['floor']:.4f})\n")
    print(f"{'config':<28}{'test mse':>10}{'mae':>8}{'r2':>8}{'gap to floor':>14}")
    for r in rows:
        print(
            f"{r['config']:<28}{r['mse']:>10.4f}{r['mae']:>8.4f}{r['r2']:>8.4f}"
            f"{r['mse'] - r['floor']:>14.4f}"
        )
    return rows


if __name__ == "__main__":
    main()
