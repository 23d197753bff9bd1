"""What one `fit` call costs beyond its steps, for research code that calls `fit` in a loop.

Three arms train the same MLP with the same optax SGD for ``--steps`` steps per call on
one synthetic set of ``--examples`` x ``--features`` float32 inputs:

* ``fit, NumPy data``: `fit(state, (x, y), steps=K)` with host arrays, which it copies to
  the device and scans for NaN and inf at every call (they can change in place);
* ``fit, device data``: the same with the arrays put on the device once, whose scan runs
  once per array (a JAX array cannot change);
* ``hand-written``: one jitted `lax.scan` of the same K steps on the device data
  (`baselines.flax_step`), its loss read back as `fit` reads its records.

With ``--val N`` every call also evaluates N held-out examples (`fit`'s ``val_data``,
given as the arm's kind of array; the hand-written arm's pass is
`baselines.flax_step.make_eval`, in the same program as its steps).

Each repeat times one call of each arm, in turn (`timing.time_arms`); medians and the
ratios to the hand-written arm are printed as JSON, then a short table.

    python benchmarks/bench_fit_calls.py                      # 50,000 x 784, 5 steps
    python benchmarks/bench_fit_calls.py --examples 4000 --features 40 --steps 36
    python benchmarks/bench_fit_calls.py --examples 2000 --features 40 --val 500
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import time_arms, write_result

from baselines import flax_step
from jtricks.data import epoch_indices
from jtricks.nn import MLP
from jtricks.run import environment
from jtricks.training import create_train_state, fit


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=50_000)
    p.add_argument("--features", type=int, default=784)
    p.add_argument("--steps", type=int, default=5, help="steps per call")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--val", type=int, default=0, help="validation examples per call")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--json-out", default=None)
    return p.parse_args()


def arms(args: argparse.Namespace) -> dict:
    """The three arms (module docstring), each returning the seconds of one call."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples, args.features)).astype(np.float32)
    y = rng.integers(0, 10, args.examples).astype(np.int32)
    xd, yd = jax.device_put(x), jax.device_put(y)
    val = (x[: args.val], y[: args.val]) if args.val else None
    val_d = jax.device_put(val)
    model, tx, key = MLP(features=(32,), num_classes=10), optax.sgd(1e-2), jax.random.key(1)
    holder = {"s": create_train_state(model, tx, x, jax.random.key(0))}

    def fit_call(data, val_data) -> float:
        t = time.perf_counter()
        holder["s"], _ = fit(
            holder["s"], data, steps=args.steps, batch_size=args.batch_size, val_data=val_data
        )
        jax.block_until_ready(holder["s"])
        return time.perf_counter() - t

    step = flax_step.make_step(model, tx, xd, yd)
    evaluate = flax_step.make_eval(model, *val_d) if val else None

    @partial(jax.jit, donate_argnums=0)
    def hand(carry, k):
        idx = epoch_indices(k, args.examples, args.batch_size, args.steps)
        carry, losses = jax.lax.scan(step, carry, idx)
        if evaluate is not None:
            losses = (losses, evaluate(carry[0], carry[1]))
        return carry, losses

    params = jax.tree.map(jnp.copy, holder["s"].params)
    carry = {"c": (params, {}, tx.init(params))}

    def hand_call() -> float:
        t = time.perf_counter()
        carry["c"], losses = hand(carry["c"], key)
        jax.device_get(losses)  # read back, as fit reads its records
        return time.perf_counter() - t

    return {
        "fit, NumPy data": lambda: fit_call((x, y), val),
        "fit, device data": lambda: fit_call((xd, yd), val_d),
        "hand-written": hand_call,
    }


def main() -> None:
    args = parse_args()
    times = time_arms(arms(args), args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["hand-written"]
    result = {
        "benchmark": "bench_fit_calls",
        "examples": args.examples,
        "features": args.features,
        "steps_per_call": args.steps,
        "val_examples": args.val,
        "repeats": args.repeats,
        "median_ms": {name: 1e3 * m for name, m in medians.items()},
        "ratio_to_hand_written": {name: m / base for name, m in medians.items()},
        "times_s": times,
        "environment": environment(),
    }
    print(json.dumps(result))
    print(f"\n{'arm':<20}{'ms per call (median)':>22}{'x hand-written':>16}")
    for name, m in medians.items():
        print(f"{name:<20}{1e3 * m:>22.2f}{m / base:>16.2f}")
    print(f"device: {result['environment']['device_kind']}")
    write_result(result, args.json_out)


if __name__ == "__main__":
    main()
