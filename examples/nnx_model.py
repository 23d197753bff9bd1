"""Your own Flax NNX model, trained by `jtricks.fit` with jtricks' tricks.

    python examples/nnx_model.py

A small NNX CNN for MNIST-1D (two strided convolutions with BatchNorm, dropout 0.1, a
linear head) goes straight into `create_train_state`: its parameters, BatchNorm
statistics and dropout RNG stream become the `TrainState`, `fit` runs whole epochs on
device with a random shift of up to 2 samples as augmentation and an EMA of the
weights, and `evaluate` reports the test accuracy of the final and the averaged
weights. Adam 3e-3, batch 100, 40 epochs.
"""

from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx

from jtricks import Scaler, create_train_state, evaluate, fit, load_dataset, train_val_split
from jtricks.data.augment import shift


class NNXCNN(nnx.Module):
    """conv(1->32, k5, s2) -> BN -> ReLU -> conv(32->32, k3, s2) -> BN -> ReLU -> dropout -> linear."""

    def __init__(self, length: int = 40, classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(5,), strides=(2,), use_bias=False, rngs=rngs)
        self.norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.conv2 = nnx.Conv(32, 32, kernel_size=(3,), strides=(2,), use_bias=False, rngs=rngs)
        self.norm2 = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(32 * (length // 4), classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm1(self.conv1(x[..., None])))
        x = nnx.relu(self.norm2(self.conv2(x)))
        return self.head(self.drop(x.reshape(x.shape[0], -1)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="A Flax NNX model trained by jtricks.fit")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--dataset", default="mnist1d")
    args = p.parse_args(argv)
    data = load_dataset(args.dataset)
    x_tr, y_tr, x_val, y_val = train_val_split(
        data.x_train, data.y_train, 0.1, seed=0, stratify=True
    )
    scale = Scaler.fit("standardize", x_tr)
    model = NNXCNN(data.x_train.shape[1], data.num_classes, rngs=nnx.Rngs(params=0, dropout=1))
    state = create_train_state(model, optax.adam(3e-3), x_tr, jax.random.key(0), ema_decay=0.99)
    state, history = fit(
        state,
        (scale(x_tr), y_tr),
        val_data=(scale(x_val), y_val),
        batch_size=100,
        epochs=args.epochs,
        augment=shift(2),
    )
    test = (scale(data.x_test), data.y_test)
    result = {
        "val_accuracy": history["val_accuracy"][-1],
        "test_accuracy": evaluate(state, test)["accuracy"],
        "ema_test_accuracy": evaluate(state.with_ema_params(), test)["accuracy"],
        "params": sum(a.size for a in jax.tree.leaves(state.params)),
    }
    print(
        f"NNX CNN ({result['params']} parameters), {args.epochs} epochs: "
        f"val accuracy {100 * result['val_accuracy']:.1f}%, "
        f"test accuracy {100 * result['test_accuracy']:.1f}%, "
        f"EMA weights {100 * result['ema_test_accuracy']:.1f}%"
    )
    return result


if __name__ == "__main__":
    main()
