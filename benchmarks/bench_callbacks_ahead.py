"""What the callbacks of a run cost `fit` when it waits for them, and when it runs ahead.

The same training (Adam, MNIST-1D, validation every epoch) with the callbacks a
``jtricks train`` run attaches (a `Checkpointer` saving every ``--every`` epochs in the
background and keeping the best state, `EarlyStopping` with a patience that never runs
out, the last epoch's state kept), in three arms timed in turn (A B C A B C ...):

* ``none``: no callbacks, epochs dispatched ahead: the floor;
* ``waits``: the callbacks behind a proxy that hides their ``takes_copy``, so `fit`
  hands them the live state and dispatches the next epoch only after they return (the
  loop before `jtricks.training.loop.Ahead`): the device idles while the host reads the
  record and runs the callbacks, checkpoint writes included;
* ``ahead``: the callbacks as they are (``takes_copy = True``): epoch k+1 runs while
  they handle epoch k's copy of the state.

Reported per arm: the median seconds of ``--epochs`` epochs over ``--repeats`` (after one
compiling call each), steps/s, the ratio against ``waits`` measured in the same run, and
the final parameters' largest difference from ``waits`` (``max_param_diff``: running
ahead must not change training). On a 2-core CPU the host's work competes with XLA's for
the cores; on a GPU the device otherwise idles for it every epoch.

    python benchmarks/bench_callbacks_ahead.py                  # CNN, 30 epochs, 5 repeats
    python benchmarks/bench_callbacks_ahead.py --model mlp --json-out ahead.json

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import optax
from bench_fit import splits
from timing import time_arms, write_result

from jtricks.nn import build_model
from jtricks.run import environment
from jtricks.training import Checkpointer, EarlyStopping, create_train_state, fit


class Waits:
    """A callback seen through a proxy without ``takes_copy``: `fit` waits for it."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def on_epoch_end(self, record, state):
        return self.inner.on_epoch_end(record, state)

    def on_train_end(self, state):
        return self.inner.on_train_end(state)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist1d", help="a dataset spec (default mnist1d)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N epochs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json-out", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    data, x_tr, y_tr, x_val, y_val = splits(args.dataset)
    model = build_model(args.model, data.num_classes)
    tx, key, data_key = optax.adam(1e-2), jax.random.key(0), jax.random.key(1)
    folder = tempfile.mkdtemp(prefix="bench_ahead_")
    finals = {}

    def arm(name: str):
        def run() -> float:
            shutil.rmtree(folder, ignore_errors=True)
            callbacks = [
                Checkpointer(folder, every=args.every),
                EarlyStopping(10**6, restore_best=False),
            ]
            if name == "waits":
                callbacks = [Waits(cb) for cb in callbacks]
            state = jax.block_until_ready(create_train_state(model, tx, x_tr, key))
            t = time.perf_counter()
            state, _ = fit(
                state,
                (x_tr, y_tr),
                val_data=(x_val, y_val),
                batch_size=100,
                epochs=args.epochs,
                data_key=data_key,
                task=data.task,
                callbacks=[] if name == "none" else callbacks,
            )
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - t
            finals[name] = jax.device_get(state.params)
            return elapsed

        return run

    times = time_arms({name: arm(name) for name in ("none", "waits", "ahead")}, args.repeats)
    shutil.rmtree(folder, ignore_errors=True)
    steps = args.epochs * (x_tr.shape[0] // 100)
    medians = {name: statistics.median(t) for name, t in times.items()}
    arms = {
        name: {
            "median_s": medians[name],
            "steps_per_s": steps / medians[name],
            "speed_vs_waits": medians["waits"] / medians[name],
            "max_param_diff": _max_diff(finals[name], finals["waits"]),
            "times_s": times[name],
        }
        for name in times
    }
    result = {
        "benchmark": "bench_callbacks_ahead",
        "model": args.model,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "checkpoint_every": args.every,
        "steps_per_repeat": steps,
        "repeats": args.repeats,
        "arms": arms,
        "environment": environment(),
    }
    write_result(result, args.json_out)
    print(json.dumps(result, indent=1))
    print(f"\n{'arm':<8}{'median s':>10}{'steps/s':>10}{'vs waits':>10}{'max diff':>10}")
    for name, a in arms.items():
        print(
            f"{name:<8}{a['median_s']:>10.3f}{a['steps_per_s']:>10,.0f}"
            f"{a['speed_vs_waits']:>9.3f}x{a['max_param_diff']:>10.1e}"
        )
    print(f"device: {jax.devices()[0].device_kind}")


def _max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(u - v))) for u, v in pairs)


if __name__ == "__main__":
    main()
