"""Benchmark problems: small, offline, each a pure loss over a parameter pytree.

Optimization problems expose ``init(key) -> params``, a stochastic training loss
``loss(params, key, step)`` and a validation metric ``evaluate(params)`` with a
target (time-to-target is measured on it). Throughput problems train a model on
CIFAR-shaped synthetic data and report images/s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.losses import accuracy, cross_entropy


@dataclass(frozen=True)
class Instance:
    """A built problem: data is captured in the closures (device arrays)."""

    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, jax.Array, jax.Array], jax.Array]
    evaluate: Callable[[Any], jax.Array]


@dataclass(frozen=True)
class Problem:
    """A benchmark problem.

    ``metric`` is what ``evaluate`` returns (``"loss"``: lower is better;
    ``"accuracy"``: higher is better); ``target`` is the value time-to-target waits
    for; ``steps`` the budget, evaluated every ``eval_every`` steps.
    """

    name: str
    description: str
    metric: str
    target: float
    steps: int
    eval_every: int
    build: Callable[[], Instance]
    kind: str = "optimize"

    def reached(self, value: float) -> bool:
        if not np.isfinite(value):
            return False
        return value <= self.target if self.metric == "loss" else value >= self.target


def noisy_quadratic(dim: int = 50, condition: float = 1e3, noise: float = 0.1) -> Instance:
    """``f(w) = 1/2 w^T A w``, eigenvalues log-spaced in ``[1/condition, 1]`` in a random
    basis; the training loss adds ``noise * <xi, w>`` with fresh ``xi ~ N(0, I)`` per step,
    so the gradient is ``A w + noise xi``. Validation: the noise-free ``f``."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = jnp.asarray((q * np.geomspace(1.0 / condition, 1.0, dim)) @ q.T, jnp.float32)
    w0 = jnp.asarray(rng.normal(size=dim), jnp.float32)

    def f(w):
        return 0.5 * w @ a @ w

    def loss(w, key, step):
        xi = jax.random.normal(jax.random.fold_in(key, step), w.shape)
        return f(w) + noise * xi @ w

    return Instance(lambda key: jnp.array(w0), loss, f)  # a copy: runs donate their params


def rosenbrock() -> Instance:
    """``f(x, y) = (1 - x)^2 + 100 (y - x^2)^2`` from ``(-1.2, 1)``; deterministic."""

    def f(w):
        return (1 - w[0]) ** 2 + 100.0 * (w[1] - w[0] ** 2) ** 2

    return Instance(lambda key: jnp.asarray([-1.2, 1.0]), lambda w, key, step: f(w), f)


def mnist1d_model(model_spec: str, batch_size: int = 100, num_samples: int = 5000) -> Instance:
    """A model from `jtricks.nn.build_model` on MNIST-1D (standardised on the training
    split; 10% held out for validation, stratified): mini-batches sampled with
    replacement per step; validation accuracy."""
    from jtricks.data import Scaler, load_dataset, train_val_split
    from jtricks.nn import build_model

    data = load_dataset(f"mnist1d(num_samples={num_samples})")
    x_tr, y_tr, x_val, y_val = train_val_split(
        data.x_train, data.y_train, 0.1, seed=0, stratify=True
    )
    scaler = Scaler.fit("standardize", x_tr)
    x_tr, x_val = jnp.asarray(scaler(x_tr)), jnp.asarray(scaler(x_val))
    y_tr, y_val = jnp.asarray(y_tr), jnp.asarray(y_val)
    model = build_model(model_spec, data.num_classes)

    def init(key):
        return model.init(key, x_tr[:1])["params"]

    def loss(params, key, step):
        idx = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, x_tr.shape[0])
        logits = model.apply({"params": params}, x_tr[idx])
        return jnp.mean(cross_entropy(logits, y_tr[idx]))

    def evaluate(params):
        return jnp.mean(accuracy(model.apply({"params": params}, x_val), y_val))

    return Instance(init, loss, evaluate)


def throughput_problem(model_spec: str, batch_size: int, image: tuple[int, int, int]) -> Instance:
    """``model_spec`` on random CIFAR-shaped images (labels random): only the speed matters."""
    from jtricks.nn import build_model

    model = build_model(model_spec, 10)
    x = jax.random.normal(jax.random.key(0), (batch_size, *image))
    y = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)

    def init(key):
        return model.init(key, x[:1])

    def loss(variables, key, step):
        logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.mean(cross_entropy(logits, y))

    return Instance(init, loss, lambda v: jnp.zeros(()))


def _p(name, description, metric, target, steps, eval_every, build, kind="optimize"):
    return Problem(name, description, metric, target, steps, eval_every, build, kind)


def suite_problems(suite: str) -> list[Problem]:
    """The problems of a suite: ``quick`` (small enough for a CPU) or ``full`` (for an accelerator)."""
    quick = suite == "quick"
    s = 1 if quick else 3  # budget scale
    problems = [
        _p(
            "quadratic",
            "noisy ill-conditioned quadratic, d=50, condition 1e3",
            "loss",
            0.1,
            500 * s,
            25,
            noisy_quadratic,
        ),
        _p("rosenbrock", "2-D Rosenbrock from (-1.2, 1)", "loss", 1e-2, 1000 * s, 50, rosenbrock),
        _p(
            "mnist1d_logreg",
            "MNIST-1D, logistic regression",
            "accuracy",
            0.30,
            400 * s,
            40,
            lambda: mnist1d_model("mlp(features=())"),
        ),
        _p(
            "mnist1d_mlp",
            "MNIST-1D, MLP 100-100",
            "accuracy",
            0.50,
            600 * s,
            60,
            lambda: mnist1d_model("mlp"),
        ),
        _p(
            "mnist1d_cnn",
            "MNIST-1D, the paper's CNN",
            "accuracy",
            0.80,
            1000 * s,
            100,
            lambda: mnist1d_model("cnn"),
        ),
        _p(
            "mnist1d_gru",
            "MNIST-1D, GRU with 32 hidden units",
            "accuracy",
            0.40,
            600 * s,
            60,
            lambda: mnist1d_model("gru(hidden=32)"),
        ),
    ]
    return problems + throughput_problems(quick)


def throughput_problems(quick: bool) -> list[Problem]:
    """The images/s problems: ResNet-20 in every suite, ResNet-18 in the full one."""
    problems = []
    # XLA:CPU trains 2-D convolutions slowly (seconds per ResNet-20 step), so the quick
    # suite times a small batch for 2 steps
    image, batch = ((32, 32, 3), 8 if quick else 512)
    problems.append(
        _p(
            "resnet20_throughput",
            f"ResNet-20, CIFAR-shaped synthetic data, batch {batch}",
            "images_per_s",
            0.0,
            2 if quick else 50,
            2 if quick else 50,
            lambda: throughput_problem("resnet20", batch, image),
            kind="throughput",
        )
    )
    if not quick:
        problems.append(
            _p(
                "resnet18_throughput",
                "ResNet-18, CIFAR-shaped synthetic data, batch 512",
                "images_per_s",
                0.0,
                50,
                50,
                lambda: throughput_problem("resnet18", 512, image),
                kind="throughput",
            )
        )
    return problems


SUITES = ("quick", "full")
OPTIMIZERS = {
    "quick": ("sgd", "momentum", "adam", "rmsprop"),
    "full": ("sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "adadelta"),
}
LR_GRIDS = {"quick": (1e-4, 1.0, 7), "full": (1e-5, 3.0, 13)}
SEEDS = {"quick": 2, "full": 5}
