"""Weight averaging and ensembles on the MNIST-1D paper CNN (T09).

    python examples/ensembles.py                # ~1.5 min on 2 CPU cores

All runs use the paper's setting (CNN, Adam 1e-2, batch 100, 6000 steps,
seed 0 for the split and data order):

* ``single``: one model;
* ``ema``: the same run, also tested on the Polyak average of its parameters
  (decay 0.999, kept in the `TrainState` and updated every step);
* ``swa``: the same run with the parameters averaged over the epochs from 100 on
  (stochastic weight averaging);
* ``ensemble``: 5 models trained at once in one vmapped program (different
  initialisations and dropout keys, same batches); each member's test accuracy
  and the ensemble's (mean of the members' softmax probabilities).

Prints the accuracy table.
"""

from __future__ import annotations

import argparse
import statistics

import jtricks


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description="EMA, SWA and a vmapped ensemble on MNIST-1D")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--swa-epoch", type=int, default=100)
    args = p.parse_args(argv)
    common = dict(dataset=args.dataset, model="cnn", steps=args.steps, seed=0)

    rows: dict[str, float] = {}
    ema = jtricks.train(**common, ema=0.999)
    rows["single"] = 100 * ema.test["accuracy"]
    rows["ema (0.999)"] = 100 * ema.test["ema_accuracy"]
    swa = jtricks.train(**common, swa=args.swa_epoch)
    rows[f"swa (from epoch {args.swa_epoch})"] = 100 * swa.test["accuracy"]
    ens = jtricks.train(**common, ensemble=args.members)
    members = [100 * a for a in ens.test["member_accuracy"]]
    rows[f"ensemble member (mean of {args.members})"] = statistics.mean(members)
    rows[f"ensemble of {args.members}"] = 100 * ens.test["accuracy"]

    print(f"{'run':<30}{'test %':>8}")
    for name, acc in rows.items():
        print(f"{name:<30}{acc:>8.1f}")
    print("members: " + "  ".join(f"{a:.1f}" for a in members))
    print(
        f"ensemble training took {ens.wall_s:.1f}s for {args.members} models; one model {ema.wall_s:.1f}s"
    )
    return rows


if __name__ == "__main__":
    main()
