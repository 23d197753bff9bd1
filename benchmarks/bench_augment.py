"""Cost of on-device augmentation: `jtricks.fit` steps/s with and without ``--augment``, in one run.

Same model (default: the MNIST-1D paper's CNN), optimizer, batches and
validation pass in both arms; the augmented arm also draws one key per
example and applies the pipeline with `vmap` inside the compiled epoch.
Compilation is excluded (one warm-up run each); each repeat times
``--epochs`` epochs; medians over ``--repeats``; runs alternate between the
arms so drift hits both alike. ``--mix mixup`` adds mixup to the augmented arm.

    python benchmarks/bench_augment.py
    python benchmarks/bench_augment.py --augment "shift(3)" --json-out results.json

Prints JSON (one object) then a short table. ``overhead`` is
``median step time augmented / median step time plain - 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import optax

from jtricks.data import Scaler, load_dataset, train_val_split
from jtricks.data.augment import build_augment
from jtricks.nn import build_model
from jtricks.run import environment
from jtricks.training import create_train_state, fit

DEFAULT_AUGMENT = "shift(4) | time_stretch(0.1)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--augment", default=DEFAULT_AUGMENT)
    p.add_argument("--mix", choices=["mixup"], default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10, help="epochs per timed repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    data = load_dataset(args.dataset)
    x_tr, y_tr, x_val, y_val = train_val_split(
        data.x_train, data.y_train, 0.1, seed=0, stratify=True
    )
    scaler = Scaler.fit("standardize", x_tr)
    x_tr, x_val = scaler(x_tr), scaler(x_val)
    model = build_model(args.model, data.num_classes)
    tx = optax.adam(1e-2)
    key, data_key = jax.random.key(0), jax.random.key(1)
    augment = build_augment(args.augment)
    mix = (args.mix, 1.0) if args.mix else None
    steps = args.epochs * (len(y_tr) // args.batch_size)

    def timed(aug, mix_) -> float:
        s = create_train_state(model, tx, x_tr, key)
        t = time.perf_counter()
        s, _ = fit(
            s,
            (x_tr, y_tr),
            val_data=(x_val, y_val),
            batch_size=args.batch_size,
            epochs=args.epochs,
            data_key=data_key,
            augment=aug,
            mix=mix_,
        )
        jax.block_until_ready(s)
        return time.perf_counter() - t

    timed(None, None), timed(augment, mix)  # compile both
    plain, augmented = [], []
    for _ in range(args.repeats):
        plain.append(timed(None, None))
        augmented.append(timed(augment, mix))
    plain_ms = 1e3 * statistics.median(plain) / steps
    aug_ms = 1e3 * statistics.median(augmented) / steps
    result = {
        "benchmark": "bench_augment",
        "model": args.model,
        "dataset": args.dataset,
        "augment": args.augment,
        "mix": args.mix,
        "batch_size": args.batch_size,
        "steps_per_repeat": steps,
        "repeats": args.repeats,
        "plain_ms_per_step_median": plain_ms,
        "augmented_ms_per_step_median": aug_ms,
        "overhead": aug_ms / plain_ms - 1,
        "plain_times_s": plain,
        "augmented_times_s": augmented,
        "environment": environment(),
    }
    print(json.dumps(result))
    print(f"\n{'arm':<14}{'ms/step (median)':>18}")
    print(f"{'plain':<14}{plain_ms:>18.3f}")
    print(f"{'augmented':<14}{aug_ms:>18.3f}")
    print(
        f"overhead = {100 * result['overhead']:+.1f}%   device: {result['environment']['device_kind']}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
