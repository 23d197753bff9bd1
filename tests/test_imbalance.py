"""Imbalanced and noisy data (T29): long-tailed and noisy splits follow their formulas,
class weights equal scikit-learn's, the focal and logit-adjusted losses equal float64
formulas written out here, and the tools change the training objective only."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.utils.class_weight import compute_class_weight

from jtricks.cli import main
from jtricks.data import Dataset, load_dataset
from jtricks.data.imbalance import (
    VAL_FRACTION,
    class_weights,
    degrade,
    logit_adjustment,
    long_tail_counts,
)
from jtricks.errors import ConfigError
from jtricks.losses import cross_entropy, focal_loss, generalized_cross_entropy
from jtricks.tasks import Classification, MultiLabel
from jtricks.training import create_train_state, evaluate, fit, make_train_step

C = 4


def ids_dataset(n: int = 400) -> Dataset:
    """Each training example's feature is its own id, so rows can be traced."""
    x = np.arange(n, dtype=np.float32)[:, None]
    y = (np.arange(n) % C).astype(np.int32)
    return Dataset("ids", x, y, x[:8], y[:8], C)


def test_long_tail_counts_follow_the_exponential_profile():
    counts = long_tail_counts(500, 10, 100)
    expected = [int(500 * 100 ** (-c / 9)) for c in range(10)]
    assert counts.tolist() == expected and counts[0] / counts[-1] == 100


def test_long_tailed_split_keeps_a_balanced_validation_split_apart():
    data = ids_dataset()
    lt = degrade(data, imbalance=10, seed=3)
    per_class = round(VAL_FRACTION * 100)
    assert np.bincount(lt.val[1]).tolist() == [per_class] * C
    assert np.bincount(lt.y_train).tolist() == long_tail_counts(100 - per_class, C, 10).tolist()
    train_ids, val_ids = lt.x_train[:, 0].astype(int), lt.val[0][:, 0].astype(int)
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(lt.y_train, data.y_train[train_ids])  # labels kept
    np.testing.assert_array_equal(lt.x_test, data.x_test)
    again = degrade(data, imbalance=10, seed=3)
    np.testing.assert_array_equal(again.x_train, lt.x_train)
    assert degrade(data) is data


def test_label_noise_flips_exactly_that_fraction_to_other_classes():
    data = ids_dataset()
    noisy = degrade(data, label_noise=0.25, seed=1)
    ids = noisy.x_train[:, 0].astype(int)
    wrong = noisy.y_train != data.y_train[ids]
    assert wrong.sum() == round(0.25 * len(ids))
    np.testing.assert_array_equal(noisy.val[1], data.y_train[noisy.val[0][:, 0].astype(int)])


def test_dataset_specs_take_imbalance_and_noise():
    data = load_dataset("synthetic(num_classes=4, imbalance=10, label_noise=0.1)")
    counts = np.bincount(data.y_train)
    assert counts[0] > 5 * counts[-1] and len(set(np.bincount(data.val[1]))) == 1
    with pytest.raises(ConfigError, match="imbalance"):
        load_dataset("synthetic(imbalance=0.5)")
    with pytest.raises(ConfigError, match="label_noise"):
        load_dataset("synthetic(label_noise=1.0)")


def test_balanced_weights_equal_sklearn():
    y = np.array([0] * 50 + [1] * 20 + [2] * 5 + [3] * 2)
    expected = compute_class_weight("balanced", classes=np.arange(C), y=y)
    np.testing.assert_allclose(class_weights("balanced", y, C), expected, rtol=1e-6)
    np.testing.assert_array_equal(class_weights({1: 3.0}, None, C), [1, 3, 1, 1])
    for spec, match in [
        ("balanced", "class\\(es\\) \\[3\\]"),
        ({7: 1.0}, "keys must be classes 0..3"),
        ([1.0, -1.0, 1.0, 1.0], ">= 0"),
        ([1.0, 2.0], "one weight per class"),
        ("median", "must be 'balanced'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            class_weights(spec, y[y < 3] if spec == "balanced" else y, C)


def test_focal_loss_equals_the_float64_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, C)) * 3
    y = rng.integers(0, C, 6)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for gamma in (0.5, 2.0):
        expected = -((1 - p[np.arange(6), y]) ** gamma) * np.log(p[np.arange(6), y])
        got = focal_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), gamma=gamma)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    zf, yf = jnp.asarray(z, jnp.float32), jnp.asarray(y)
    np.testing.assert_allclose(focal_loss(zf, yf, gamma=0.0), cross_entropy(zf, yf), rtol=1e-6)
    assert np.isfinite(focal_loss(jnp.array([[1e4, -1e4]]), jnp.array([1]))).all()


def test_generalized_cross_entropy_equals_its_formula_and_its_limits():
    """``(1 - p_y^q) / q`` in float64 by hand; soft targets weigh each class's term; q -> 0
    is cross-entropy, q = 1 the mean absolute error ``1 - p_y``; finite for huge logits;
    the classification task trains on it (evaluation keeps the plain cross-entropy)."""
    rng = np.random.default_rng(2)
    z, y = rng.normal(size=(6, C)) * 3, rng.integers(0, C, 6)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p[np.arange(6), y]
    zf, yf = jnp.asarray(z, jnp.float32), jnp.asarray(y)
    for q in (0.3, 0.7, 1.0):
        got = generalized_cross_entropy(zf, yf, q=q)
        np.testing.assert_allclose(got, (1 - py**q) / q, rtol=1e-5)
    soft = rng.dirichlet(np.ones(C), 6)
    expected = (soft * (1 - p**0.7) / 0.7).sum(1)
    got = generalized_cross_entropy(zf, jnp.asarray(soft, jnp.float32), q=0.7)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    tiny_q = generalized_cross_entropy(zf, yf, q=1e-4)
    np.testing.assert_allclose(tiny_q, cross_entropy(zf, yf), rtol=1e-3)
    assert np.isfinite(generalized_cross_entropy(jnp.array([[1e4, -1e4]]), jnp.array([1]))).all()
    task, batch = Classification(gce_q=0.7), (None, yf)
    np.testing.assert_allclose(task.train_loss(zf, batch), (1 - py**0.7) / 0.7, rtol=1e-5)
    np.testing.assert_allclose(task.loss(zf, batch), cross_entropy(zf, yf), rtol=1e-6)


def test_multilabel_focal_objective_equals_the_sigmoid_formula():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 3))
    y = rng.integers(0, 2, (5, 3)).astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    terms = -(y * (1 - p) ** 2 * np.log(p) + (1 - y) * p**2 * np.log(1 - p))
    got = MultiLabel(focal_gamma=2.0).train_loss(jnp.asarray(z, jnp.float32), (None, y))
    np.testing.assert_allclose(got, terms.mean(1), rtol=1e-5)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(x)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = np.minimum(rng.geometric(0.5, 64) - 1, C - 1).astype(np.int32)
    return x, y


def _hand_objective(params, x, y, weights, offsets):
    z = Linear().apply({"params": params}, x) + offsets
    ce = -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1)[:, 0]
    return jnp.mean(weights[y] * ce)


def test_weighted_and_adjusted_step_equals_sgd_on_the_hand_objective(problem):
    x, y = problem
    weights = class_weights("balanced", y, C)
    offsets = logit_adjustment(y, C, 1.5)
    np.testing.assert_allclose(offsets, 1.5 * np.log(np.bincount(y) / len(y)), rtol=1e-6)
    task = Classification(class_weight=tuple(weights), logit_adjust=tuple(offsets))
    state = create_train_state(Linear(), optax.sgd(0.1), x[:2], jax.random.key(0))
    params = state.params
    new, metrics = jax.jit(make_train_step(task=task))(state, (x, y))
    loss, grads = jax.value_and_grad(_hand_objective)(params, x, y, weights, offsets)
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new.params, expected)
    plain = evaluate(new, (x, y))
    assert evaluate(new, (x, y), task=task) == plain  # evaluation reports the plain loss


def test_fit_class_weight_balanced_equals_the_explicit_task(problem):
    x, y = problem
    weights = compute_class_weight("balanced", classes=np.arange(C), y=y)
    runs = []
    for kw in (
        {"class_weight": "balanced"},
        {"task": Classification(class_weight=tuple(map(float, weights.astype(np.float32))))},
    ):
        state = create_train_state(Linear(), optax.adam(0.05), x[:2], jax.random.key(1))
        runs.append(fit(state, (x, y), batch_size=16, epochs=2, **kw)[0].params)
    jax.tree.map(np.testing.assert_array_equal, *runs)
    state = create_train_state(Linear(), optax.adam(0.05), x[:2], jax.random.key(1))
    targets = y.astype(np.float32)[:, None] * np.ones(C, np.float32)
    kw = dict(task="regression", batch_size=16, epochs=1, class_weight="balanced")
    with pytest.raises(ConfigError, match="classification task"):
        fit(state, (x, targets), **kw)
    with pytest.raises(ConfigError, match="both undo the class imbalance"):
        fit(state, (x, y), batch_size=16, class_weight="balanced", sampler="balanced")
    adjusted = Classification(logit_adjust=tuple(map(float, logit_adjustment(y, C, 1.0))))
    for balancing in ({"class_weight": "balanced"}, {"sampler": "balanced"}):  # in Python too
        with pytest.raises(ConfigError, match="the task's logit_adjust offsets and"):
            fit(state, (x, y), batch_size=16, epochs=1, task=adjusted, **balancing)


def test_a_weight_vector_of_the_wrong_length_is_one_line(problem):
    x, y = problem
    task = Classification(class_weight=(1.0, 2.0))
    state = create_train_state(Linear(), optax.sgd(0.1), x[:2], jax.random.key(0))
    with pytest.raises(ValueError, match="class_weight has 2 values but the model has 4"):
        make_train_step(task=task)(state, (x, y))


SPEC = "synthetic(num_train=300, num_test=80, shape=(6,), num_classes=4, imbalance=8)"


@pytest.mark.parametrize(
    "flags",
    [
        ["--class-weight", "balanced"],
        ["--loss", "focal(gamma=2)"],
        ["--loss", "gce(q=0.7)"],
        ["--logit-adjust", "1"],
        ["--logit-adjust", "1", "--class-weight", "{0: 2.0}"],  # weights of one's own: accepted
        ["--sampler", "balanced"],
    ],
)
def test_cli_trains_with_each_tool(tmp_path, flags):
    out = tmp_path / "run"
    argv = ["train", "--dataset", SPEC, "--model", "mlp(features=(8,))", "--epochs", "2"]
    assert main([*argv, "--batch-size", "20", *flags, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_balanced_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())["config"]
    recorded = config[flags[0][2:].replace("-", "_")]
    assert recorded == (float(flags[1]) if flags[0] == "--logit-adjust" else flags[1])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--class-weight", "median"], "class_weight must be balanced"),
        (["--loss", "focal(gamma=-1)"], "loss 'focal(gamma=-1)': gamma must satisfy"),
        (["--loss", "gce(q=0)"], "--loss: loss 'gce(q=0)': q must satisfy 0.0 < q <= 1.0"),
        (["--loss", "gce", "--task", "regression"], "works with the classification task only"),
        (["--loss", "hinge"], "loss must be cross_entropy, focal(gamma=2.0), gce(q=0.7) or h"),
        (["--loss", "huber"], "loss='huber' works with the regression task only; this run's"),
        (["--loss", "huber(delta=0)"], "--loss: loss 'huber(delta=0)': delta must satisfy"),
        (["--loss", "focal(1, gamma=2)"], "focal takes one argument, gamma, e.g. focal(2.0) or"),
        (["--loss", "gce(p=0.5)"], "gce takes one argument, q, e.g. gce(0.7) or gce(q=0.7);"),
        (["--logit-adjust", "1", "--task", "regression"], "classification task only"),
        (["--sampler", "balanced", "--stream"], "draws from in-memory data"),
        (["--sampler", "balanced", "--class-weight", "balanced"], "weighs (n / (C n_c))^2"),
        (
            ["--logit-adjust", "1", "--class-weight", "balanced"],
            "--logit-adjust: logit_adjust=1.0 and class_weight='balanced' both undo the class",
        ),
        (["--logit-adjust", "0.5", "--sampler", "balanced"], "0.5 and sampler='balanced' both"),
    ],
)
def test_cli_refuses_bad_tools_in_one_line(tmp_path, capsys, flags, message):
    argv = ["train", "--dataset", SPEC, "--model", "mlp(features=(8,))", "--epochs", "1"]
    assert main([*argv, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("by_position", "by_name", "field"),
    [
        ("focal(3)", "focal(gamma=3)", "focal_gamma"),
        ("gce(0.5)", "gce(q=0.5)", "gce_q"),
        ("huber(0.25)", "huber(delta=0.25)", "huber_delta"),
        ("focal", "focal()", "focal_gamma"),
    ],
)
def test_a_loss_takes_its_argument_by_position_or_name(by_position, by_name, field):
    from jtricks.run.settings import parse_loss

    value = float(by_name.split("=")[1].rstrip(")")) if "=" in by_name else 2.0
    assert parse_loss(by_position) == parse_loss(by_name) == {field: value}


def test_a_run_validates_on_the_datasets_own_split():
    from jtricks.run import TrainConfig
    from jtricks.run.data import load_run_data

    data = load_dataset(SPEC)
    run = load_run_data(dataclasses.replace(TrainConfig(), dataset=SPEC))
    np.testing.assert_array_equal(run.val[1], data.val[1])
    assert run.n_train == len(data.y_train)


def test_balanced_sampler_draws_classes_within_binomial_bounds():
    from jtricks.data.batching import class_balanced, sampled_indices

    labels = np.repeat(np.arange(C), [500, 120, 30, 6]).astype(np.int32)
    probs = class_balanced(labels)
    assert probs.sum() == pytest.approx(1.0, rel=1e-5)
    idx = sampled_indices(jax.random.key(4), jnp.asarray(probs), 50, 40)
    counts = np.bincount(labels[np.asarray(idx).ravel()], minlength=C)
    m = 50 * 40
    bound = 4 * np.sqrt(m * (1 / C) * (1 - 1 / C))
    assert np.all(np.abs(counts - m / C) <= bound), counts
    with pytest.raises(ConfigError, match="integer labels"):
        class_balanced(labels.astype(np.float32))


def test_fit_with_the_sampler_equals_a_hand_loop_and_resumes_exactly(problem):
    from jtricks.data.batching import class_balanced, sampled_indices

    x, y = problem
    make = lambda: create_train_state(Linear(), optax.sgd(0.1), x[:2], jax.random.key(5))  # noqa: E731
    state, _ = fit(make(), (x, y), batch_size=16, epochs=2, sampler="balanced")
    hand = make()
    step = jax.jit(make_train_step())
    data_key = jax.random.fold_in(hand.key, 1)
    for epoch in range(2):
        key = jax.random.fold_in(data_key, epoch)
        for rows in np.asarray(sampled_indices(key, jnp.asarray(class_balanced(y)), 16, 4)):
            hand, _ = step(hand, (x[rows], y[rows]))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, hand.params
    )
    half, _ = fit(make(), (x, y), batch_size=16, epochs=1, sampler="balanced")
    resumed, _ = fit(half, (x, y), batch_size=16, epochs=1, sampler="balanced")
    jax.tree.map(np.testing.assert_array_equal, resumed.params, state.params)
    with pytest.raises(ConfigError, match="sampler must be None or one of balanced"):
        fit(make(), (x, y), batch_size=16, epochs=1, sampler="uniform")


@pytest.mark.parametrize("flag", [["--val-fraction", "0.3"], ["--no-stratify"]])
def test_split_settings_for_data_with_their_own_validation_split_are_refused(
    tmp_path, capsys, flag
):
    """A long-tailed dataset and a shard folder with ``val/`` bring their validation
    split; ``--val-fraction`` and ``--no-stratify`` changed nothing without a word."""
    from jtricks.data import write_shards

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        x, y = rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n)
        write_shards(tmp_path / "shards" / split, {"x": x, "y": y}, shard_size=20)
    name = "val_fraction" if "--val-fraction" in flag else "stratify"
    for dataset, what in ((SPEC, f"dataset {SPEC!r}"), (f"shards:{tmp_path / 'shards'}", "val/")):
        out = tmp_path / "run"
        argv = ["train", "--dataset", dataset, "--model", "mlp", *flag, "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"argument {flag[0]}: {name}=" in err and what in err
        assert "brings its own validation split" in err and not out.exists()


def test_several_processes_weigh_classes_by_the_whole_split(monkeypatch):
    """With several processes each keeps its rows of the training split
    (`share_processes`); the balanced weights and the logit offsets still count the whole
    split's labels (scikit-learn's weights and log frequencies here), so every process
    builds the same task (they counted each process's own rows, a program apiece)."""
    from jtricks.run.build import imbalance_options, task_for
    from jtricks.run.config import TrainConfig
    from jtricks.run.data import load_run_data
    from jtricks.run.runner import share_processes

    spec = "synthetic(num_train=300, num_test=30, shape=(4,), num_classes=3, imbalance=5)"
    data = load_run_data(TrainConfig(dataset=spec))
    labels = data.train[1].copy()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    share_processes(TrainConfig(dataset=spec), data, None, None)
    assert len(data.train[1]) < len(labels)  # this process's rows only
    weighted = TrainConfig(dataset=spec, class_weight="balanced")
    task = imbalance_options(weighted, task_for(weighted, data.task_spec), data)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(task.class_weight, expected, rtol=1e-6)
    adjusted = TrainConfig(dataset=spec, logit_adjust=1.0)
    task = imbalance_options(adjusted, task_for(adjusted, data.task_spec), data)
    np.testing.assert_allclose(task.logit_adjust, np.log(np.bincount(labels) / len(labels)))
