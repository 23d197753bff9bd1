"""Steps/s of `jtricks.fit` against a hand-written `lax.scan` loop, in one run.

Both train the same model (default: the MNIST-1D paper's CNN) with the same
optax Adam and the same shuffled batches (gathered on device from the same
index arrays), one compiled scan per epoch, and both evaluate the validation split after
every epoch (``--no-val``: neither does; the hand loop in one forward pass,
`baselines.flax_step.make_eval`). `fit` additionally checks every step for non-finite
values, logs the per-step norms, and returns its history: that is the overhead measured
here. ``validation_flop_share`` in the JSON is validation's FLOPs over an epoch's
training FLOPs (XLA's cost analysis of both programs). Compilation is excluded
(one warm-up call each), and so is making a repeat's starting state (both clocks start
once it is on the device); each repeat times ``--epochs`` epochs (``--min-time S``:
doubled until a hand-written repeat lasts S seconds); medians over
``--repeats``. Runs alternate between the two, and which goes first alternates too
(fit, hand, hand, fit, ...), so drift and any after-effect of the other loop hit both
alike; besides the ratio of the medians, the median of the paired ratios (each fit
run against the hand run beside it) is reported, the steadier figure on a shared
machine.

    python benchmarks/bench_fit.py                 # CPU, CNN
    python benchmarks/bench_fit.py --model mlp --json-out results.json
    python benchmarks/bench_fit.py --model mlp --unroll 4      # fit's loop unrolled 4 steps
    python benchmarks/bench_fit.py --dataset tokens --batch-size 50 \\
        --model "transformer_lm(d_model=64, heads=4, layers=2)"    # a causal LM

The hand-written loss is the softmax cross-entropy with integer targets, averaged over
examples (and, for token sequences, over positions): the classification and the
language-model tasks' objectives. `fit` takes the dataset's own task.

Prints JSON (one object) then a short table.
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

from baselines import flax_step
from jtricks.bench.device import lowered_flops
from jtricks.data import Scaler, epoch_indices, load_dataset, train_val_split
from jtricks.nn import build_model
from jtricks.run import environment
from jtricks.training import create_train_state, fit


def hand_written(model, tx, x, y, batch_size: int, data_key, val=None):
    """The loop a user would write by hand (`baselines.flax_step`: loss, grad, optax
    update), scanned over one epoch of the batches `fit` draws; with ``val = (x_val,
    y_val)``, each epoch ends with `flax_step.make_eval`'s pass over the validation split
    (in the epoch's program, its metrics left on the device: the fastest a hand loop
    validates)."""
    steps = x.shape[0] // batch_size
    step = flax_step.make_step(model, tx, x, y)
    evaluate = flax_step.make_eval(model, *val) if val is not None else None

    @partial(jax.jit, donate_argnums=0)
    def epoch(carry, key):
        carry, losses = jax.lax.scan(step, carry, epoch_indices(key, x.shape[0], batch_size, steps))
        metrics = evaluate(carry[0], carry[1]) if evaluate is not None else {}
        return carry, (losses, metrics)

    def run(params, opt_state, first_epoch: int, epochs: int):
        carry = (params, {}, opt_state)
        for e in range(first_epoch, first_epoch + epochs):
            carry, _ = epoch(carry, jax.random.fold_in(data_key, e))
        jax.block_until_ready(carry)
        return carry

    return run, steps


def validation_share(model, params, tx, x, y, x_val, batch_size: int) -> float:
    """FLOPs of one pass over the validation inputs over those of an epoch of training
    steps (`lowered_flops` of the hand-written step and of the forward pass)."""
    step = flax_step.make_step(model, tx, jnp.asarray(x), jnp.asarray(y))
    carry = (params, {}, tx.init(params))
    idx = jnp.arange(batch_size)
    step_flops = lowered_flops(jax.jit(step).lower(carry, idx)) or float("nan")
    forward = jax.jit(lambda p, xv: model.apply({"params": p}, xv, train=False))
    val_flops = lowered_flops(forward.lower(params, jnp.asarray(x_val))) or float("nan")
    return val_flops / (step_flops * (x.shape[0] // batch_size))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10, help="epochs per timed repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--min-time",
        type=float,
        default=0.0,
        help="double the epochs per repeat until a hand-written repeat lasts this many "
        "seconds (0: --epochs as given)",
    )
    p.add_argument(
        "--no-val",
        dest="val",
        action="store_false",
        help="neither loop validates (the engine's training overhead alone)",
    )
    p.add_argument(
        "--no-norms",
        dest="norms",
        action="store_false",
        help="fit without the per-step gradient norm",
    )
    p.add_argument(
        "--update-norm", action="store_true", help="fit with per-step update and parameter norms"
    )
    p.add_argument(
        "--unroll", type=int, default=1, help="fit's unroll: steps per compiled loop iteration"
    )
    p.add_argument("--json-out", default=None)
    return p.parse_args()


def splits(dataset: str):
    """The dataset's training and validation splits, standardised unless integer tokens."""
    data = load_dataset(dataset)
    classify = data.task == "classification"
    x_tr, y_tr, x_val, y_val = train_val_split(
        data.x_train, data.y_train, 0.1, seed=0, stratify=classify
    )
    if not np.issubdtype(x_tr.dtype, np.integer):
        scaler = Scaler.fit("standardize", x_tr)
        x_tr, x_val = scaler(x_tr), scaler(x_val)
    return data, x_tr, y_tr, x_val, y_val


def main() -> None:
    args = parse_args()
    data, x_tr, y_tr, x_val, y_val = splits(args.dataset)
    model = build_model(args.model, data.num_classes)
    tx = optax.adam(1e-2)
    key = jax.random.key(0)
    data_key = jax.random.key(1)

    state = create_train_state(model, tx, x_tr, key)
    val = (jnp.asarray(x_val), jnp.asarray(y_val)) if args.val else None
    run_hand, steps_per_epoch = hand_written(
        model, tx, jnp.asarray(x_tr), jnp.asarray(y_tr), args.batch_size, data_key, val
    )

    def time_fit(epochs: int) -> float:
        s = jax.block_until_ready(create_train_state(model, tx, x_tr, key))
        t = time.perf_counter()
        s, _ = fit(
            s,
            (x_tr, y_tr),
            val_data=(x_val, y_val) if args.val else None,
            batch_size=args.batch_size,
            epochs=epochs,
            data_key=data_key,
            norms=args.norms,
            update_norm=args.update_norm,
            task=data.task,
            unroll=args.unroll,
        )
        jax.block_until_ready(s)
        return time.perf_counter() - t

    share = validation_share(model, state.params, tx, x_tr, y_tr, x_val, args.batch_size)

    def time_hand(epochs: int) -> float:
        params = jax.tree.map(jnp.copy, state.params)
        opt_state = jax.block_until_ready(tx.init(params))
        t = time.perf_counter()
        run_hand(params, opt_state, 0, epochs)
        return time.perf_counter() - t

    time_fit(1), time_hand(1)  # compile both
    epochs = lasting(time_hand, args.epochs, args.min_time)
    steps = epochs * steps_per_epoch
    fit_times, hand_times = alternate(
        partial(time_fit, epochs), partial(time_hand, epochs), args.repeats
    )
    paired = [h / f for f, h in zip(fit_times, hand_times, strict=True)]
    fit_sps = steps / statistics.median(fit_times)
    hand_sps = steps / statistics.median(hand_times)
    result = {
        "benchmark": "bench_fit",
        "model": args.model,
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "fit_validation": args.val,
        "hand_validation": args.val,
        "fit_norms": args.norms,
        "fit_update_norm": args.update_norm,
        "fit_unroll": args.unroll,
        "epochs_per_repeat": epochs,
        "min_time_s": args.min_time,
        "steps_per_repeat": steps,
        "repeats": args.repeats,
        "fit_steps_per_s_median": fit_sps,
        "hand_scan_steps_per_s_median": hand_sps,
        "ratio_fit_over_hand": fit_sps / hand_sps,
        "validation_flop_share": share if args.val else 0.0,
        "paired_ratio_median": statistics.median(paired),
        "fit_times_s": fit_times,
        "hand_times_s": hand_times,
        "environment": environment(),
    }
    report(result, args.json_out)


def lasting(time_hand, epochs: int, min_time: float) -> int:
    """``epochs``, doubled until one hand-written repeat lasts ``min_time`` seconds (a
    GPU runs a small model's 10 epochs in milliseconds, where dispatch jitter and the
    loops' fixed per-call costs would be what is measured)."""
    while min_time > 0 and time_hand(epochs) < min_time and epochs < 2**16:
        epochs *= 2
    return epochs


def alternate(time_fit, time_hand, repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` timings of each, in turn, which goes first alternating too (fit, hand,
    hand, fit, ...)."""
    fit_times, hand_times = [], []
    for i in range(repeats):
        if i % 2:
            hand_times.append(time_hand())
            fit_times.append(time_fit())
        else:
            fit_times.append(time_fit())
            hand_times.append(time_hand())
    return fit_times, hand_times


def report(result: dict, json_out: str | None) -> None:
    """The JSON line, the short table, and the JSON file when asked."""
    fit_sps, hand_sps = result["fit_steps_per_s_median"], result["hand_scan_steps_per_s_median"]
    print(json.dumps(result))
    print(f"\n{'loop':<22}{'steps/s (median)':>18}")
    print(f"{'hand-written scan':<22}{hand_sps:>18,.0f}")
    print(f"{'jtricks.fit':<22}{fit_sps:>18,.0f}")
    print(f"{result['epochs_per_repeat']} epochs ({result['steps_per_repeat']:,} steps) per repeat")
    if result["fit_validation"]:
        share = result["validation_flop_share"]
        print(f"validation adds {share:.1%} to an epoch's FLOPs (both loops validate)")
    print(
        f"ratio fit / hand = {fit_sps / hand_sps:.3f} (paired: "
        f"{result['paired_ratio_median']:.3f})   device: {result['environment']['device_kind']}"
    )
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
