"""Segmentation of 1-D signals: per-position cross-entropy, with and without Dice (T20).

    python examples/segmentation.py

Which positions of a noisy signal carry a sine or a triangle pattern
(``segmentation1d``: 3 classes, about half the positions background). A dilated
fully convolutional network (``fcn1d``, 4 layers of 32 channels, receptive field 61)
is trained with Adam 3e-3, batch 50, for 2000 steps on the per-position cross-entropy,
then on cross-entropy plus the soft Dice loss (``segmentation(dice_weight=1.0)``), which
weighs every class alike whatever its share of the positions. Prints pixel accuracy,
mean IoU and Dice on the test split for both.
"""

from __future__ import annotations

import argparse

import jtricks

CONFIGS = [
    ("cross-entropy", "segmentation"),
    ("cross-entropy + Dice", "segmentation(dice_weight=1.0)"),
]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="1-D segmentation with cross-entropy and Dice")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--dataset", default="segmentation1d")
    p.add_argument("--model", default="fcn1d")
    args = p.parse_args(argv)
    rows = []
    for label, task in CONFIGS:
        r = jtricks.train(
            dataset=args.dataset,
            task=task,
            model=args.model,
            learning_rate=3e-3,
            batch_size=50,
            steps=args.steps,
        )
        rows.append({"config": label, **r.test})
    print(f"\nsegmentation1d, {args.model}, {args.steps} steps\n")
    print(f"{'loss':<24}{'pixel acc':>11}{'mean IoU':>10}{'Dice':>8}")
    for r in rows:
        print(
            f"{r['config']:<24}{100 * r['pixel_accuracy']:>10.1f}%{r['mean_iou']:>10.4f}"
            f"{r['dice']:>8.4f}"
        )
    return rows


if __name__ == "__main__":
    main()
