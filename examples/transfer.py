"""Transfer learning by freezing on MNIST-1D (T26): pretrain on digits 0-4, fine-tune on 5-9.

    python examples/transfer.py                 # 4 regimes x 3 seeds, ~1 min on 2 CPU cores

Pretraining: the paper's CNN on every training example of digits 0-4 (relabelled
0-4), Adam 1e-2, batch 100, 3000 steps, saved as a jtricks checkpoint. Target
task: digits 5-9 (relabelled 0-4) with only 100 labelled examples per class
(500 in all), Adam 1e-3, batch 50, 1000 steps, then the test split's digits 5-9.
Regimes (T26): ``head`` trains only the last layer on top of the frozen
pretrained convolutions; ``last:2`` also the third convolution; ``all`` starts
from the pretrained weights and trains everything; ``scratch`` trains the same
model from a fresh initialisation. The head is re-initialised in every regime
(its shape matches, but its classes mean other digits).

Prints one line per run and the table of mean test accuracies.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import jax
import optax

from jtricks.data import Scaler, load_dataset, select_classes
from jtricks.nn import build_model
from jtricks.training import create_train_state, evaluate, fit
from jtricks.training.checkpoint import save
from jtricks.training.transfer import forward_layers, freeze, load_pretrained, preset_patterns

REGIMES = ("scratch", "head", "last:2", "all")


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description="MNIST-1D transfer: digits 0-4 -> 5-9")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)

    data = load_dataset(args.dataset)
    scaler = Scaler.fit("standardize", data.x_train)
    x_all, x_test_all = scaler(data.x_train), scaler(data.x_test)
    src = select_classes(x_all, data.y_train, range(5))
    test = select_classes(x_test_all, data.y_test, range(5, 10))
    model = build_model("cnn", 5)

    pre = create_train_state(model, optax.adam(1e-2), src[0], jax.random.key(100))
    pre, _ = fit(pre, src, batch_size=100, steps=args.pretrain_steps)
    src_test = select_classes(x_test_all, data.y_test, range(5))
    print(
        f"pretrained on digits 0-4: test accuracy {100 * evaluate(pre, src_test)['accuracy']:.1f}%"
    )
    ckpt = tempfile.mkdtemp(prefix="jtricks-transfer-")
    save(ckpt, "pretrained", pre, {"epoch": 0})
    layers = forward_layers(pre, src[0])

    accs: dict[str, list[float]] = {r: [] for r in REGIMES}
    for seed in range(args.seeds):
        target = select_classes(
            x_all, data.y_train, range(5, 10), per_class=args.per_class, seed=seed
        )
        for regime in REGIMES:
            tx = optax.adam(1e-3)
            if regime in ("head", "last:2"):
                tx = freeze(tx, trainable=preset_patterns(regime, layers))
            state = create_train_state(model, tx, target[0], jax.random.key(seed))
            if regime != "scratch":
                fresh_head = state.params[layers[-1]]
                state, _ = load_pretrained(state, f"{ckpt}/pretrained")
                params = {**state.params, layers[-1]: fresh_head}  # new classes, new head
                state = state.replace(params=params, opt_state=tx.init(params))
            state, _ = fit(state, target, batch_size=50, steps=args.steps)
            acc = 100 * evaluate(state, test)["accuracy"]
            accs[regime].append(acc)
            print(f"seed {seed} {regime:<8} test accuracy on digits 5-9: {acc:.1f}%", flush=True)

    print(f"\n{args.per_class} labelled examples per class of digits 5-9, {args.seeds} seeds")
    print(f"{'regime':<10}{'trainable':<36}{'test %':>8}{'std':>6}")
    for regime, a in accs.items():
        what = (
            "all layers, fresh init"
            if regime == "scratch"
            else ", ".join(preset_patterns(regime, layers)).replace("/*", "")
        )
        std = statistics.stdev(a) if len(a) > 1 else 0.0
        print(f"{regime:<10}{what:<36}{statistics.mean(a):>8.1f}{std:>6.1f}")
    return accs


if __name__ == "__main__":
    main()
