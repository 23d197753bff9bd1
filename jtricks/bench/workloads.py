"""AlgoPerf-style workloads: a dataset, a model and a task, with a step budget.

A workload trains a `jtricks.nn` model on a `jtricks.data` dataset under a
`jtricks.tasks` task: mini-batches of ``batch_size`` drawn with replacement per step
(from the step's own key), the task's weighted loss, and the validation and test metric
computed by the task on the whole held-out splits (10% of the training split, stratified
for classification, is the validation split). Every dataset is generated or shipped with
a package, so nothing is downloaded.

``metric`` names the validation metric the targets are set on; `lower_is_better` says
which way it improves. Label smoothing, a hyper-parameter of the search space, applies to
classification workloads only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.bench.protocol import lower_is_better
from jtricks.errors import unknown_name


@dataclass(frozen=True)
class Instance:
    """A built workload. ``loss(params, key, step, label_smoothing)`` is the training loss
    of the step's mini-batch; ``evaluate(params)`` returns ``(validation, test)`` values of
    the workload's metric."""

    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    evaluate: Callable[[Any], tuple[jax.Array, jax.Array]]


@dataclass(frozen=True)
class Workload:
    """A benchmark workload: what trains, for how many steps, judged on which metric."""

    name: str
    description: str
    dataset: str
    model: str
    task: str
    metric: str
    batch_size: int
    total_steps: int
    eval_period: int
    max_runtime: float

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)

    def better(self, a: float, b: float) -> bool:
        """Is metric value ``a`` better than ``b``?"""
        return a < b if self.lower_is_better else a > b

    def build(self) -> Instance:
        return build_instance(self)


def _split(data, task: str):
    from jtricks.data import train_val_split

    return train_val_split(
        data.x_train, data.y_train, 0.1, seed=0, stratify=task == "classification"
    )


def _task(name: str, label_smoothing: Any = 0.0):
    from jtricks.tasks import Classification, build_task

    if name == "classification":
        return Classification(label_smoothing=label_smoothing)
    return build_task(name)


def build_instance(w: Workload) -> Instance:
    """Load ``w``'s data (standardised inputs for real-valued data), build its model and
    return the pure functions a trial needs."""
    from jtricks.data import Scaler, load_dataset
    from jtricks.nn import build_model
    from jtricks.tasks.base import batch_sums, finalize

    data = load_dataset(w.dataset)
    x_tr, y_tr, x_val, y_val = _split(data, w.task)
    x_te, y_te = data.x_test, data.y_test
    if np.issubdtype(np.asarray(x_tr).dtype, np.floating):
        scaler = Scaler.fit("standardize", x_tr)
        x_tr, x_val, x_te = scaler(x_tr), scaler(x_val), scaler(x_te)
    x_tr, y_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)
    splits = [(jnp.asarray(x), jnp.asarray(y)) for x, y in ((x_val, y_val), (x_te, y_te))]
    model = build_model(w.model, data.num_classes)

    def init(key):
        return model.init(key, x_tr[:1])["params"]

    def loss(params, key, step, label_smoothing):
        idx = jax.random.randint(jax.random.fold_in(key, step), (w.batch_size,), 0, x_tr.shape[0])
        batch = (x_tr[idx], y_tr[idx])
        task = _task(w.task, label_smoothing)
        out = model.apply({"params": params}, batch[0])
        return finalize(task, batch_sums(task, out, batch, jnp.ones(w.batch_size)))["loss"]

    def evaluate(params):
        task = _task(w.task)
        values = []
        for x, y in splits:
            out = model.apply({"params": params}, x)
            sums = batch_sums(task, out, (x, y), jnp.ones(x.shape[0]))
            values.append(finalize(task, sums)[w.metric])
        return tuple(values)

    return Instance(init, loss, evaluate)


def _w(name, description, dataset, model, task, metric, batch, steps, period, runtime):
    return Workload(name, description, dataset, model, task, metric, batch, steps, period, runtime)


def suite_workloads(suite: str, data_dir: str | None = None) -> list[Workload]:
    """The workloads of a suite: ``quick`` (each algorithm's trials on one workload take
    about ten seconds on a 2-core CPU) or ``full`` (more data and steps, the GRU too, for
    one GPU). With ``data_dir`` (the ``cifar-10-batches-py`` folder) the suite also trains
    ResNet-20 on CIFAR-10; layer norm stands in for batch norm, as a trial's program
    carries no batch statistics."""
    quick = suite == "quick"
    workloads = core_workloads(quick)
    if data_dir is not None:  # CIFAR-10's python batches, where the user keeps them
        workloads.append(cifar_workload(data_dir, quick))
    if not quick:
        workloads.append(gru_workload())
    return workloads


def core_workloads(quick: bool) -> list[Workload]:
    """The four workloads of every suite: MLP on digits, regression, MNIST-1D CNN and a
    small language model; the full suite has 4x the budget and 5x the data."""
    s = 1 if quick else 4  # budget scale
    n = 4000 if quick else 20000
    return [
        _w(
            "digits_mlp",
            "scikit-learn's 8x8 digits, MLP 64",
            "digits",
            "mlp(features=(64,))",
            "classification",
            "accuracy",
            64,
            400 * s,
            50,
            30.0 * s,
        ),
        _w(
            "regression_mlp",
            "noisy non-linear regression, MLP 64-64",
            f"regression(num_train={n // 2}, num_test=1000)",
            "mlp(features=(64, 64))",
            "regression",
            "mse",
            64,
            400 * s,
            50,
            30.0 * s,
        ),
        _w(
            "mnist1d_cnn",
            "MNIST-1D, the paper's CNN",
            f"mnist1d(num_samples={n})",
            "cnn",
            "classification",
            "accuracy",
            100,
            600 * s,
            100,
            60.0 * s,
        ),
        _w(
            "tokens_lm",
            "Markov-chain tokens, transformer LM (d 32, 1 layer)",
            f"tokens(num_train={n // 2}, num_test=256, seq_len=16)",
            "transformer_lm(d_model=32, heads=2, layers=1)",
            "lm",
            "loss",
            32,
            400 * s,
            50,
            60.0 * s,
        ),
    ]


def cifar_workload(data_dir: str, quick: bool) -> Workload:
    """ResNet-20 on CIFAR-10 read from ``data_dir`` (layer norm for batch norm)."""
    return _w(
        "cifar10_resnet20",
        "CIFAR-10, ResNet-20 with layer norm",
        f"cifar10:{data_dir}",
        "resnet20(norm='layer')",
        "classification",
        "accuracy",
        128,
        200 if quick else 5000,
        50 if quick else 250,
        600.0 if quick else 1200.0,
    )


def gru_workload() -> Workload:
    """A GRU on MNIST-1D, in the full suite only."""
    return _w(
        "mnist1d_gru",
        "MNIST-1D, GRU with 32 hidden units",
        "mnist1d(num_samples=20000)",
        "gru(hidden=32)",
        "classification",
        "accuracy",
        100,
        2400,
        100,
        240.0,
    )


SUITES = ("quick", "full")


def available(w: Workload) -> bool:
    """Whether ``w``'s data can load here (the digits need scikit-learn, an extra)."""
    import importlib.util

    return w.dataset != "digits" or importlib.util.find_spec("sklearn") is not None


def select(
    suite: str, names: list[str] | None = None, data_dir: str | None = None
) -> list[Workload]:
    """The suite's workloads (those whose data can load here), or the named subset of
    them (`ConfigError` naming an unknown suite or workload; a named workload whose extra
    is missing fails when its data loads, naming the extra)."""
    if suite not in SUITES:
        raise unknown_name("suite", suite, SUITES)
    workloads = suite_workloads(suite, data_dir)
    if names is None:  # the whole suite, less what needs an extra that is not installed
        return [w for w in workloads if available(w)]
    known = {w.name for w in workloads}
    for name in names:
        if name not in known:
            raise unknown_name("workload", name, known, param="workloads")
    return [w for w in workloads if w.name in names]
