"""A learning-rate sweep with `fit`: compilations and seconds for K rates, per way of
building the optimizer.

Arms (each starts from empty caches, `jtricks.clear_caches` + `jax.clear_caches`):

* ``fresh``: a new ``optax.adam(lr)`` per rate, the baseline: every rate is a new
  closure, so every rate compiles the epoch program again;
* ``sweepable``: ``jtricks.optim.sweepable(optax.adam)(learning_rate=lr)``, the rate
  injected into the optimizer state and the optimizers equal (`jtricks.optim.sweep`);
* ``build``: ``jtricks.optim.build_optimizer("adam", lr)``, the same by spec.

Each rate: `create_train_state`, then `fit` for ``--epochs`` on MNIST-1D. Reported per arm:
the XLA compilations of the epoch program (counted from `jax.log_compiles`), all XLA
compilations, and the median over ``--repeats`` (arms alternate) of the sweep's seconds,
with the ratio against ``fresh`` in the same run. The final losses of every arm are
compared with ``fresh``'s, rate by rate (``max_loss_diff``): the shared program must
train exactly as a fresh one.

    python benchmarks/bench_sweep.py                  # MLP, 8 rates, 2 epochs, 3 repeats
    python benchmarks/bench_sweep.py --model cnn --json-out sweep.json

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import jax
import numpy as np
import optax

import jtricks
from jtricks.data import Scaler, load_dataset
from jtricks.nn import build_model
from jtricks.optim import build_optimizer, sweepable
from jtricks.run import environment
from jtricks.training import create_train_state, fit

ARMS = {
    "fresh": lambda lr: optax.adam(lr),
    "sweepable": lambda lr: sweepable(optax.adam)(learning_rate=lr),
    "build": lambda lr: build_optimizer("adam", lr),
}


class CompileCounter(logging.Handler):
    """Counts JAX's "Finished XLA compilation of jit(NAME)" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of jit("):
            self.names.append(message.split("jit(", 1)[1].split(")", 1)[0])


def run_sweep(arm: str, model, x, y, rates, args) -> dict:
    """One sweep from empty caches: seconds, compilations and each rate's final loss."""
    jtricks.clear_caches()
    jax.clear_caches()
    counter = CompileCounter()
    log = logging.getLogger("jax")
    log.addHandler(counter)
    losses = []
    start = time.perf_counter()
    try:
        with jax.log_compiles(True):
            for lr in rates:
                state = create_train_state(model, ARMS[arm](lr), x, jax.random.key(0))
                _, hist = fit(state, (x, y), batch_size=args.batch_size, epochs=args.epochs)
                losses.append(float(hist.records[-1]["train_loss"]))
    finally:
        log.removeHandler(counter)
    return {
        "seconds": time.perf_counter() - start,
        "epoch_compiles": counter.names.count("run_part"),
        "all_compiles": len(counter.names),
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--rates", type=int, default=8, help="K, the number of learning rates")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    logging.getLogger("jax").propagate = False  # the compile log is counted, not printed

    data = load_dataset(args.dataset)
    x = Scaler.fit("standardize", data.x_train)(data.x_train)
    model = build_model(args.model, data.num_classes)
    rates = [float(r) for r in np.geomspace(1e-4, 1e-1, args.rates)]
    runs = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            runs[arm].append(run_sweep(arm, model, x, data.y_train, rates, args))

    base = statistics.median(r["seconds"] for r in runs["fresh"])
    result = {"environment": environment(), "args": vars(args), "rates": rates, "arms": {}}
    for arm, rs in runs.items():
        median = statistics.median(r["seconds"] for r in rs)
        result["arms"][arm] = {
            "median_s": median,
            "ratio_vs_fresh": median / base,
            "epoch_compiles": rs[0]["epoch_compiles"],
            "all_compiles": rs[0]["all_compiles"],
            "max_loss_diff": max(
                abs(a - b) for a, b in zip(rs[0]["losses"], runs["fresh"][0]["losses"], strict=True)
            ),
            "seconds": [r["seconds"] for r in rs],
        }
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{args.rates} rates x {args.epochs} epochs, {args.model} on {args.dataset}")
    print(f"{'arm':<10} {'median s':>9} {'ratio':>6} {'epoch compiles':>15} {'all':>5}")
    for arm, r in result["arms"].items():
        print(
            f"{arm:<10} {r['median_s']:9.2f} {r['ratio_vs_fresh']:6.2f} "
            f"{r['epoch_compiles']:15d} {r['all_compiles']:5d}"
        )
    return result


if __name__ == "__main__":
    main()
