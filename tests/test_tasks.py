"""Tasks: every task trains through `fit`, its metrics equal a float64 NumPy computation on
the same outputs, batch layouts (tuple / dict) give identical runs, evaluation does not
depend on the batch size, and bad data names the task and the field."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.losses import binary_cross_entropy, mse
from jtricks.tasks import (
    WHOLE_BATCH,
    LanguageModel,
    LossTask,
    MultiLabel,
    Regression,
    Segmentation,
    as_task,
    build_task,
)
from jtricks.training import EarlyStopping, create_train_state, evaluate, fit, predict
from jtricks.training.model import detect_train_arg

TX = optax.adam(3e-2)


class Linear(nn.Module):
    """A model with no ``train`` keyword: a dense layer over the last axis."""

    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features)(x)


class TokenModel(nn.Module):
    """Embedding then a per-position dense layer (a bigram language model), no train flag."""

    vocab: int

    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(self.vocab)(nn.Embed(self.vocab, 8)(tokens))


class DictModel(nn.Module):
    """Reads the whole batch dict: two inputs, concatenated."""

    @nn.compact
    def __call__(self, batch, *, deterministic: bool = True):
        x = jnp.concatenate([batch["a"], batch["b"]], axis=-1)
        x = nn.Dropout(0.5)(nn.Dense(8)(x), deterministic=deterministic)
        return nn.Dense(2)(x)


def _outputs(state, x) -> np.ndarray:
    """The model's evaluation outputs, computed outside jtricks' steps."""
    return np.asarray(
        state.apply_fn({"params": state.params}, jnp.asarray(x), train=False), np.float64
    )


def _same(a: dict, b: dict, rtol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype(np.float32)
    w = rng.normal(size=(5, 3))
    y = (x @ w + 0.1 * rng.normal(size=(96, 3)) + 2.0).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def regression_run(regression_data):
    x, y = regression_data
    state = create_train_state(Linear(3), TX, x, jax.random.key(0))
    return fit(state, (x, y), loss_fn=mse, batch_size=16, epochs=8, val_data=(x[:40], y[:40]))


def test_regression_trains_and_metrics_match_numpy(regression_run, regression_data):
    x, y = regression_data
    state, hist = regression_run
    assert hist["train_loss"][-1] < 0.2 * hist["train_loss"][0]
    assert {"val_mse", "val_mae", "val_r2", "train_mae"} <= set(hist.records[-1])
    got = evaluate(state, (x, y), task="regression", batch_size=96)
    p, t = _outputs(state, x), y.astype(np.float64)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    expected = {
        "loss": np.mean((p - t) ** 2),
        "mse": np.mean((p - t) ** 2),
        "mae": np.mean(np.abs(p - t)),
        "r2": np.mean(1 - ((t - p) ** 2).sum(0) / sst),
    }
    _same(got, expected, rtol=1e-4)
    _same(evaluate(state, (x, y), loss_fn=mse, batch_size=7), got)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")  # a second, independent code path
    assert p.shape[1] == 3  # several targets: r2 is the uniform average of per-target R²
    for name, ref in (
        ("r2", sklearn_metrics.r2_score(t, p, multioutput="uniform_average")),
        ("mse", sklearn_metrics.mean_squared_error(t, p)),
        ("mae", sklearn_metrics.mean_absolute_error(t, p)),
    ):
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, err_msg=name)


class _FirstInput(nn.Module):
    """Outputs its first input feature (plus a bias that starts at 0): given predictions."""

    @nn.compact
    def __call__(self, x):
        return x[:, :1] + self.param("b", nn.initializers.zeros, (1,))


def test_r2_keeps_its_precision_for_targets_far_from_zero():
    """Targets 3000 +- 1: float32 sums of ``t^2`` lose their spread entirely (``r2`` was
    -inf); taken around the targets' mean (`Regression.center`), `evaluate` and `fit`'s
    validation give the float64 formula."""
    rng = np.random.default_rng(0)
    t = 3000 + rng.normal(size=(400, 1))
    x, y = (t + 0.3 * rng.normal(size=(400, 1))).astype(np.float32), t.astype(np.float32)

    def r2(n):
        t64, p64 = y[:n].astype(np.float64), x[:n].astype(np.float64)
        return 1 - ((t64 - p64) ** 2).sum() / ((t64 - t64.mean()) ** 2).sum()

    state = create_train_state(_FirstInput(), optax.sgd(0.0), x, jax.random.key(0))
    got = evaluate(state, (x, y), task="regression", batch_size=100)
    np.testing.assert_allclose(got["r2"], r2(400), rtol=1e-4)
    val = (x[:200], y[:200])
    _, hist = fit(state, (x, y), task="regression", batch_size=100, epochs=1, val_data=val)
    np.testing.assert_allclose(hist["val_r2"][-1], r2(200), rtol=1e-4)


class _Reiterable:
    """A re-iterable stream of the given batches (not a list: `iter` each pass)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_r2_of_streamed_data_keeps_its_precision_too():
    """The same far targets through streams: `evaluate` of a list of batches and of a
    re-iterable stream centers on the first batch's targets, `fit` on a stream of batches
    on its validation data's (arrays or a stream), and a one-shot iterator is evaluated
    whole (never peeked). Uncentered, the list's ``r2`` was 0.948 (this formula: 0.880),
    and a validation stream's near +4.5e6."""
    rng = np.random.default_rng(1)
    t = 3000 + rng.normal(size=(400, 1))
    x, y = (t + 0.3 * rng.normal(size=(400, 1))).astype(np.float32), t.astype(np.float32)
    t64, p64 = y.astype(np.float64), x.astype(np.float64)
    want = 1 - ((t64 - p64) ** 2).sum() / ((t64 - t64.mean()) ** 2).sum()
    mse = ((t64 - p64) ** 2).mean()
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 400, 100)]

    def state():
        return create_train_state(_FirstInput(), optax.sgd(0.0), x, jax.random.key(0))

    for data in (batches, _Reiterable(batches)):
        got = evaluate(state(), data, task="regression")
        np.testing.assert_allclose(got["r2"], want, rtol=1e-4)
    got = evaluate(state(), iter(batches), task="regression")  # every batch counted
    np.testing.assert_allclose(got["mse"], mse, rtol=1e-4)
    for val in ((x, y), batches):
        _, hist = fit(state(), batches, task="regression", epochs=1, val_data=val)
        np.testing.assert_allclose(hist["val_r2"][-1], want, rtol=1e-4)


def test_standardized_targets_loss_and_metrics_match_numpy():
    """A regression learning standardized targets (two outputs of different sizes, far
    from 0): the loss is the mse of ``(t - m) / s`` against the outputs, and ``mse``,
    ``mae`` and ``r2`` are those of ``o s + m`` against ``t`` in float64 (scikit-learn's
    ``r2_score``); `values` maps outputs of any leading axes back."""
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(1)
    y = (np.array([3000.0, -40.0]) + rng.normal(size=(300, 2)) * [1.0, 5.0]).astype(np.float32)
    x = rng.normal(size=(300, 2)).astype(np.float32)  # the outputs: the first two features
    task = Regression().standardized(y[:200])
    t64 = y[:200].astype(np.float64)
    m, s = np.asarray(task.scale[0]), np.asarray(task.scale[1])
    np.testing.assert_allclose(m, t64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s, t64.std(0), rtol=1e-12)
    state = create_train_state(_Identity(), optax.sgd(0.0), x, jax.random.key(0))
    got = evaluate(state, (x, y), task=task, batch_size=100)
    o, t = x.astype(np.float64), y.astype(np.float64)
    p = o * s + m
    np.testing.assert_allclose(got["loss"], ((o - (t - m) / s) ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["mse"], ((p - t) ** 2).mean(), rtol=1e-4)
    np.testing.assert_allclose(got["mae"], np.abs(p - t).mean(), rtol=1e-4)
    np.testing.assert_allclose(got["r2"], r2_score(t, p), rtol=1e-4)
    np.testing.assert_allclose(task.values(x), p, rtol=1e-6)
    np.testing.assert_allclose(predict(state, x, task=task), p, rtol=1e-6)  # in t's units
    assert task.values(np.zeros((3, 5, 2))).shape == (3, 5, 2)  # an ensemble's outputs
    one = Regression().standardized(y[:, :1])
    np.testing.assert_allclose(one.values(np.zeros((4,))), np.full(4, y[:, 0].mean()), rtol=1e-6)
    assert Regression().standardized(np.ones((5, 1))).scale == ((1.0,), (1.0,))  # constant
    with pytest.raises(ConfigError, match="scale holds 1 means and stds; the model gives 2"):
        evaluate(state, (x, y), task=one)


def test_huber_trains_on_its_formula_and_evaluation_reports_the_mse():
    """``Regression(huber_delta=d)``: the per-example training loss is the Huber loss of
    the residual (by hand, on standardized targets with a scale); one SGD step from a
    zero bias moves it by ``-lr mean_i clip(r_i, -d, d) / D`` (the Huber gradient), not
    by the mse's; evaluation's ``loss`` stays the mse."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    y = (x + rng.normal(size=(40, 2)) * [0.5, 4.0]).astype(np.float32)
    y[:4] += 30.0  # outliers
    task = Regression(huber_delta=0.5).standardized(y)
    m, s = np.asarray(task.scale[0]), np.asarray(task.scale[1])
    r = x.astype(np.float64) - (y - m) / s
    huber = np.where(np.abs(r) <= 0.5, r**2 / 2, 0.5 * (np.abs(r) - 0.25))
    got = task.train_loss(jnp.asarray(x), (jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, huber.mean(1), rtol=1e-5)
    state = create_train_state(_Identity(), optax.sgd(0.1), x, jax.random.key(0))
    state, _ = fit(state, (x, y), task=task, batch_size=40, steps=1)
    want = -0.1 * np.clip(r, -0.5, 0.5).mean(0) / 2
    np.testing.assert_allclose(state.params["b"], want, rtol=1e-4, atol=1e-7)
    got = evaluate(state, (x, y), task=task)
    out = x + np.asarray(state.params["b"])
    np.testing.assert_allclose(got["loss"], ((out - (y - m) / s) ** 2).mean(), rtol=1e-5)


class _Identity(nn.Module):
    """Its inputs as outputs, plus a zero bias (a parameter to create a state with)."""

    @nn.compact
    def __call__(self, x):
        return x + self.param("b", nn.initializers.zeros, (x.shape[-1],))


def test_dict_and_tuple_batches_are_bit_identical(regression_run, regression_data):
    x, y = regression_data
    state = create_train_state(Linear(3), TX, x, jax.random.key(0))
    s_dict, h_dict = fit(
        state,
        {"x": x, "y": y},
        task=Regression(),
        batch_size=16,
        epochs=8,
        val_data={"x": x[:40], "y": y[:40]},
    )
    s_tuple, h_tuple = regression_run
    for a, b in zip(jax.tree.leaves(s_dict.params), jax.tree.leaves(s_tuple.params), strict=True):
        assert np.array_equal(a, b)
    assert h_dict["val_r2"].tolist() == h_tuple["val_r2"].tolist()


def test_multilabel_metrics_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 6)).astype(np.float32)
    y = (x[:, :4] + 0.3 * rng.normal(size=(80, 4)) > 0).astype(np.float32)
    state = create_train_state(Linear(4), TX, x, jax.random.key(1))
    state, hist = fit(state, (x, y), task="multilabel", batch_size=16, epochs=6)
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    got = evaluate(state, (x, y), task=MultiLabel(), batch_size=13)
    z = _outputs(state, x)
    bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    right = (z > 0) == (y >= 0.5)
    _same(
        got,
        {"loss": bce.mean(), "label_accuracy": right.mean(), "exact_match": right.all(1).mean()},
    )
    assert got["label_accuracy"] > 0.8


def test_binary_cross_entropy_refuses_broadcasting():
    # (N, 1) logits against (N,) labels: one label per example, log 2 each
    np.testing.assert_allclose(
        binary_cross_entropy(jnp.zeros((4, 1)), jnp.array([0, 1, 1, 0])), np.log(2), rtol=1e-6
    )
    with pytest.raises(ValueError, match="shape"):
        binary_cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4))


@pytest.fixture(scope="module")
def segmentation_data():
    """1-D signals of 16 positions, 2 channels; the class of a position is set by its signal."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 16, 2)).astype(np.float32)
    y = (x[..., 0] > 0.5).astype(np.int32) + (x[..., 1] > 0.8).astype(np.int32)
    mask = (rng.random((60, 16)) > 0.2).astype(np.float32)
    return {"x": x, "y": y, "mask": mask}


def _segmentation_reference(z: np.ndarray, batch: dict) -> dict:
    y, m = batch["y"], batch["mask"].astype(bool)
    logp = (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )
    ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    per_example = (ce * m).sum(1) / np.maximum(m.sum(1), 1)
    pred = z.argmax(-1)
    ious, dices = [], []
    for c in range(z.shape[-1]):
        p, t = (pred == c) & m, (y == c) & m
        if p.sum() + t.sum():
            inter = (p & t).sum()
            ious.append(inter / (p | t).sum())
            dices.append(2 * inter / (p.sum() + t.sum()))
    return {
        "loss": per_example.mean(),
        "pixel_accuracy": ((pred == y) & m).sum() / m.sum(),
        "mean_iou": np.mean(ious),
        "dice": np.mean(dices),
    }


def test_segmentation_trains_and_metrics_match_numpy(segmentation_data):
    batch = segmentation_data
    task = Segmentation(dice_weight=0.5)
    state = create_train_state(Linear(3), TX, batch["x"], jax.random.key(2))
    state, hist = fit(state, batch, task=task, batch_size=12, epochs=20, val_data=batch)
    assert hist["train_loss"][-1] < 0.7 * hist["train_loss"][0]
    assert hist["val_pixel_accuracy"][-1] > 0.75  # the majority class is 55%
    got = evaluate(state, batch, task=Segmentation(), batch_size=60)
    _same(got, _segmentation_reference(_outputs(state, batch["x"]), batch), rtol=1e-5)
    _same(evaluate(state, batch, task=Segmentation(), batch_size=7), got)
    # a Dice weight changes the loss only: the reported metrics are the same
    with_dice = evaluate(state, batch, task=task, batch_size=60)
    assert with_dice["loss"] > got["loss"]
    assert with_dice["mean_iou"] == got["mean_iou"]


@pytest.fixture(scope="module")
def token_data():
    """A token stream from a fixed bigram chain over 7 tokens; the last positions padded."""
    rng = np.random.default_rng(3)
    nxt = rng.integers(0, 7, size=7)
    seq = np.zeros((48, 13), np.int32)
    seq[:, 0] = rng.integers(0, 7, size=48)
    for t in range(1, 13):
        noisy = rng.random(48) < 0.1
        seq[:, t] = np.where(noisy, rng.integers(0, 7, size=48), nxt[seq[:, t - 1]])
    lengths = rng.integers(6, 13, size=48)
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.float32)
    return {"tokens": seq[:, :-1], "y": seq[:, 1:], "mask": mask}


def test_language_model_trains_and_metrics_match_numpy(token_data):
    batch = token_data
    state = create_train_state(TokenModel(7), TX, batch["tokens"], jax.random.key(3))
    state, hist = fit(state, batch, task="lm", batch_size=8, epochs=10, val_data=batch)
    assert hist["train_loss"][-1] < 0.5 * hist["train_loss"][0]
    got = evaluate(state, batch, task=LanguageModel(), batch_size=48)
    z = _outputs(state, batch["tokens"])
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, batch["y"][..., None], -1)[..., 0]
    m = batch["mask"].astype(bool)
    token_loss = ce[m].mean()  # the mean over real tokens, not over examples
    expected = {
        "loss": token_loss,
        "perplexity": np.exp(token_loss),
        "token_accuracy": (z.argmax(-1) == batch["y"])[m].mean(),
    }
    _same(got, expected, rtol=1e-5)
    _same(evaluate(state, batch, task="lm", batch_size=5), got)
    # pad_id: the same tokens left out by value instead of by a mask
    padded = {"tokens": batch["tokens"], "y": np.where(m, batch["y"], 6)}
    by_id = evaluate(state, padded, task=LanguageModel(pad_id=6))
    ok = m & (batch["y"] != 6)
    np.testing.assert_allclose(by_id["loss"], ce[ok].mean(), rtol=1e-5)


def test_custom_loss_with_extra_metrics(regression_data):
    x, y = regression_data
    y1 = y[:, 0]

    def loss(out, target):
        err = out[:, 0] - target
        return err**2, {"abs_err": jnp.abs(err)}

    state = create_train_state(Linear(1), TX, x, jax.random.key(4))
    state, hist = fit(state, (x, y1), loss_fn=loss, batch_size=16, epochs=3, val_data=(x, y1))
    assert "train_abs_err" in hist.records[0] and "val_abs_err" in hist.records[0]
    got = evaluate(state, (x, y1), loss_fn=loss, batch_size=10)
    err = _outputs(state, x)[:, 0] - y1
    _same(got, {"loss": np.mean(err**2), "abs_err": np.mean(np.abs(err))})


def test_model_reading_the_whole_batch_with_deterministic_flag():
    rng = np.random.default_rng(5)
    batch = {
        "a": rng.normal(size=(40, 3)).astype(np.float32),
        "b": rng.normal(size=(40, 2)).astype(np.float32),
        "y": rng.integers(0, 2, size=40).astype(np.int32),
    }
    model = DictModel()
    assert detect_train_arg(model) == "deterministic"
    task = as_task("classification").__class__(input_key=WHOLE_BATCH)
    state = create_train_state(model, TX, batch, jax.random.key(6))
    inputs = jax.tree.map(jnp.asarray, batch)
    variables = {"params": state.params}
    eval_out = state.apply_fn(variables, inputs, train=False)
    train_out = state.apply_fn(variables, inputs, train=True, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(eval_out, train_out)  # dropout on only in training mode
    state, hist = fit(state, batch, task=task, batch_size=10, epochs=2)
    assert int(state.step) == 8 and np.isfinite(hist["train_loss"]).all()


def test_callbacks_monitor_any_metric(regression_data):
    x, y = regression_data
    state = create_train_state(Linear(3), TX, x, jax.random.key(0))
    stop = EarlyStopping(patience=1, monitor="val_r2", mode="max")
    _, hist = fit(
        state,
        (x, y),
        loss_fn=mse,
        batch_size=16,
        epochs=3,
        val_data=(x[:40], y[:40]),
        callbacks=[stop],
    )
    assert stop.best == max(hist["val_r2"])


@pytest.mark.parametrize(
    ("case", "match"),
    [
        (
            "float labels",
            r"classification task, training data, targets \(batch\[1\]\): class labels must be integers",
        ),
        (
            "nan targets",
            r"regression task, training data, targets \('y'\): 2 non-finite values \(NaN or inf\), first at index \(3, 0\)",
        ),
        (
            "mask shape",
            r"segmentation task, training data, 'mask': a mask must have the targets' shape",
        ),
        (
            "outputs",
            r"segmentation task, training data, targets \('y'\).*need model outputs of shape"
            r".*\(one per example; --model fcn1d \(jtricks.nn.FCN1D\) gives one per position\)",
        ),
        ("one logit", r"labels must lie in \[0, 0\] because the model has 1 outputs"),
        ("ragged", r"every entry needs the same number of examples"),
        ("wrong width", r"examples of shape \(3,\) do not fit the model: its parameter"),
    ],
)
def test_bad_data_names_task_and_field(case, match, segmentation_data):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    y = rng.normal(size=(20, 2)).astype(np.float32)
    state = create_train_state(Linear(2), TX, x, jax.random.key(0))
    seg = dict(segmentation_data)
    seg_state = create_train_state(Linear(3), TX, seg["x"], jax.random.key(0))
    kwargs = {"batch_size": 4, "epochs": 1}
    call = {
        "float labels": lambda: fit(state, (x, y[:, 0]), **kwargs),
        "nan targets": lambda: fit(
            state,
            {"x": x, "y": np.where(np.arange(20)[:, None] == 3, np.nan, y)},
            task="regression",
            **kwargs,
        ),
        "mask shape": lambda: fit(
            seg_state, {**seg, "mask": seg["mask"][:, :8]}, task=Segmentation(), **kwargs
        ),
        "outputs": lambda: fit(
            state, {"x": x, "y": np.zeros((20, 3), np.int32)}, task="segmentation", **kwargs
        ),
        "one logit": lambda: fit(
            create_train_state(Linear(1), TX, x, jax.random.key(0)),
            (x, (y[:, 0] > 0).astype(np.int32)),
            **kwargs,
        ),
        "ragged": lambda: fit(state, (x, y[:10]), loss_fn=mse, **kwargs),
        "wrong width": lambda: fit(state, (x[:, :3], y), loss_fn=mse, **kwargs),
    }[case]
    with pytest.raises(ConfigError, match=match):
        call()
    assert int(state.step) == 0


def test_task_specs_and_losses_map_to_tasks():
    assert build_task("segmentation(dice_weight=1.0)") == Segmentation(dice_weight=1.0)
    assert as_task(loss_fn=mse) == Regression()
    assert isinstance(as_task(loss_fn=lambda z, y: z[:, 0] - y), LossTask)
    with pytest.raises(ConfigError, match="unknown task 'segment'"):
        build_task("segment")
    with pytest.raises(ConfigError, match="dice_weight"):
        Segmentation(dice_weight=-1.0)
    with pytest.raises(ConfigError, match="give task or loss_fn, not both"):
        as_task("regression", mse)


@pytest.mark.parametrize(
    ("dataset", "model", "metric"),
    [
        ("regression(num_train=200, num_test=50)", "mlp(features=(16,))", "r2"),
        (  # the loss floor is in the targets' units: the gap is the mse's
            "regression(num_train=200, num_test=50) --target-scale standardize",
            "mlp(features=(16,))",
            "r2",
        ),
        (
            "segmentation1d(num_train=60, num_test=20)",
            "fcn1d(channels=(8, 8), dilations=(1, 2))",
            "mean_iou",
        ),
        (
            "tokens(num_train=60, num_test=20, seq_len=8, vocab=5)",
            "transformer_lm(d_model=8, heads=2, layers=1)",
            "perplexity",
        ),
    ],
)
def test_cli_trains_each_task(tmp_path, dataset, model, metric):
    from jtricks.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            *_spec_and_flags(dataset),
            "--model",
            model,
            "--epochs",
            "2",
            "--batch-size",
            "10",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary[f"test_{metric}"]) and np.isfinite(summary[f"val_{metric}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and f"val_{metric}" in records[-1]
    if "loss_floor" in summary:
        loss = summary["test_mse" if "--target-scale" in dataset else "test_loss"]
        assert summary["test_loss_gap"] == pytest.approx(loss - summary["loss_floor"])


def _spec_and_flags(text: str) -> list[str]:
    """``"spec --flag value"`` as argv: the spec whole (it has spaces), then the flags."""
    spec, sep, flags = text.partition(" --")
    return [spec, *(f"--{flags}".split() if sep else [])]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            [
                "--dataset",
                "segmentation1d(num_train=50, num_test=10)",
                "--model",
                "fcn1d",
                "--tta",
                "3",
                "--augment",
                "shift(1)",
            ],
            "tta=3 averages whole-example predictions",
        ),
        (
            [
                "--dataset",
                "regression(num_train=50, num_test=10)",
                "--model",
                "mlp",
                "--label-smoothing",
                "0.1",
            ],
            "label_smoothing=0.1 works with the classification task only",
        ),
        (
            ["--dataset", "regression(num_train=50, num_test=10)", "--task", "segment"],
            "unknown task 'segment'",
        ),
        (
            [
                "--dataset",
                "synthetic(num_train=50, num_test=10, shape=(8,), num_classes=3)",
                "--task",
                "multilabel",
                "--model",
                "mlp(features=(4,))",
                "--batch-size",
                "10",
            ],
            "the multilabel task reads 0/1 targets; these hold other values",
        ),
    ],
)
def test_cli_task_errors(tmp_path, capsys, args, match):
    from jtricks.cli import main

    out = tmp_path / "run"
    assert main(["train", *args, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_regression_ensemble_equals_separate_runs_and_averages_outputs(regression_data):
    from jtricks.training.ensemble import create_ensemble, evaluate_ensemble, fit_ensemble

    x, y = regression_data
    keys = jax.random.split(jax.random.key(9), 2)
    dk = jax.random.key(3)
    states = create_ensemble(Linear(3), TX, x, keys)
    states, hist = fit_ensemble(states, (x, y), loss_fn=mse, batch_size=16, epochs=2, data_key=dk)
    assert isinstance(hist.records[-1]["train_loss"], float)  # the members' mean
    outputs = []
    for i in range(2):
        s = create_train_state(Linear(3), TX, x, keys[i])
        s, _ = fit(s, (x, y), loss_fn=mse, batch_size=16, epochs=2, data_key=dk)
        for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(states.params), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-6)
        outputs.append(_outputs(s, x))
    got = evaluate_ensemble(states, (x, y), task=Regression(), batch_size=40)
    mean = np.mean(outputs, axis=0)  # a regression ensemble predicts the members' mean
    np.testing.assert_allclose(got["mse"], np.mean((mean - y) ** 2), rtol=1e-4)
    np.testing.assert_allclose(
        got["member_mse"], [np.mean((o - y) ** 2) for o in outputs], rtol=1e-4
    )


def test_geometric_augmentation_moves_dense_targets_with_the_input():
    from jtricks.data.augment import augment_jointly, build_augment

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=16), jnp.int32)
    pipeline = build_augment("shift(4) | noise(0.1)")
    for seed in range(4):
        key = jax.random.key(seed)
        xa, (ya,) = augment_jointly(pipeline, key, x, [y])
        np.testing.assert_array_equal(xa, pipeline(key, x))  # the input as `augment` does it
        s = next(s for s in range(-4, 5) if np.allclose(xa, np.roll(x, s, 0), atol=0.5))
        np.testing.assert_array_equal(ya, np.roll(y, s))  # labels shifted, never noised
    img = jnp.asarray(rng.normal(size=(8, 8, 3)), jnp.float32)
    cls = jnp.asarray(rng.integers(1, 4, size=(8, 8)), jnp.int32)
    crop = build_augment("random_crop(2) | hflip")
    xa, (ca, ma) = augment_jointly(crop, jax.random.key(1), img, [cls, jnp.ones((8, 8))])
    inside = np.asarray(ma) == 1
    assert 0 < inside.sum() < 64  # some positions came from the padding: masked out
    # where the image is a moved copy, so is the class map: compare by matching pixels
    src = {
        tuple(np.round(np.asarray(img[i, j]), 5)): int(cls[i, j])
        for i in range(8)
        for j in range(8)
    }
    for i, j in zip(*np.nonzero(inside), strict=True):
        assert src[tuple(np.round(np.asarray(xa[i, j]), 5))] == int(ca[i, j])
    assert (np.asarray(ca)[~inside] == 0).all()


def test_segmentation_trains_with_joint_augmentation(segmentation_data):
    from jtricks.data.augment import shift

    state = create_train_state(Linear(3), TX, segmentation_data["x"], jax.random.key(2))
    state, hist = fit(
        state,
        segmentation_data,
        task=Segmentation(),
        augment=shift(3),
        batch_size=12,
        epochs=20,
        val_data=segmentation_data,
    )
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    # a per-position model learns only if the labels moved with the signal (majority: 55%)
    assert hist["val_pixel_accuracy"][-1] > 0.7


def test_regression_tta_averages_outputs_over_views(regression_run, regression_data):
    from jtricks.data.augment import noise
    from jtricks.training import evaluate_tta

    x, y = regression_data
    state, _ = regression_run
    aug, key, views = noise(0.3), jax.random.key(4), 4
    got = evaluate_tta(state, (x, y), aug, views=views, key=key, task="regression", batch_size=50)
    outs = [_outputs(state, x)]
    for v in range(1, views):  # view v of example i: key fold_in(fold_in(key, v), i)
        keys = [jax.random.fold_in(jax.random.fold_in(key, v), i) for i in range(len(x))]
        xv = np.stack([np.asarray(aug(k, jnp.asarray(xi))) for k, xi in zip(keys, x, strict=True)])
        outs.append(_outputs(state, xv))
    mean = np.mean(outs, axis=0)
    np.testing.assert_allclose(got["mse"], np.mean((mean - y) ** 2), rtol=1e-4)
    np.testing.assert_allclose(got["mae"], np.mean(np.abs(mean - y)), rtol=1e-4)
    with pytest.raises(ConfigError, match="segmentation task predicts per position"):
        evaluate_tta(state, {"x": x, "y": y}, aug, views=2, key=key, task=Segmentation())


def test_accumulation_is_exact_for_weighted_token_losses(token_data):
    """Micro-batches of unequal real-token counts add up to the whole batch's update."""
    from jtricks.training import make_train_step

    batch = jax.tree.map(lambda a: jnp.asarray(a[:8]), token_data)
    state = create_train_state(TokenModel(7), optax.sgd(1.0), batch["tokens"], jax.random.key(3))
    whole, m1 = jax.jit(make_train_step(task="lm"))(state, batch)
    split, m2 = jax.jit(make_train_step(task="lm", accumulate=4))(state, batch)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_regression_on_a_dict_batch(regression_data):
    x, y = regression_data
    state = create_train_state(Linear(3), TX, x, jax.random.key(0))
    state, hist = fit(
        state, {"x": x, "y": y}, task="regression", precision="bf16", batch_size=16, epochs=4
    )
    assert hist["train_loss"][-1] < 0.5 * hist["train_loss"][0]
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # master weights stay float32


def test_cli_language_model_resumes_bit_identically(tmp_path):
    """Interrupted after epoch 2 (its later checkpoint and summary gone), ``--resume``
    continues from epoch 2 and ends with the final parameters of the uninterrupted run,
    bit for bit."""
    import shutil

    import orbax.checkpoint as ocp

    from jtricks.cli import main
    from jtricks.training.checkpoint import list_checkpoints

    args = [
        "train",
        "--dataset",
        "tokens(num_train=60, num_test=20, seq_len=8, vocab=5)",
        "--model",
        "transformer_lm(d_model=8, heads=2, layers=1, dropout=0.1)",
        "--epochs",
        "4",
        "--batch-size",
        "10",
        "--checkpoint-every",
        "2",
        "--no-progress",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*args, "--out", str(full)]) == 0
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "epoch-000004")
    (cut / "summary.json").unlink()
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    lines = [(run / "metrics.jsonl").read_text().splitlines() for run in (full, cut)]
    assert lines[0][:2] == lines[1][:2]  # epochs 1-2 kept from the checkpoint, timings too
    redone = [
        json.loads(a)["elapsed_s"] != json.loads(b)["elapsed_s"]
        for a, b in zip(*lines, strict=True)
    ]
    assert redone == [False, False, True, True]  # only epochs 3-4 ran again

    def final(run):
        ckptr = ocp.StandardCheckpointer()
        arrays = ckptr.restore(list_checkpoints(run / "checkpoints")[-1].absolute() / "state")
        ckptr.close()
        return arrays

    for a, b in zip(jax.tree.leaves(final(full)), jax.tree.leaves(final(cut)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (
        json.loads((cut / "summary.json").read_text())["test_perplexity"]
        == json.loads((full / "summary.json").read_text())["test_perplexity"]
    )


def _mean_ce(outputs, y):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean()


def _ce_with_mean_extra(outputs, y):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, y), {"m": jnp.mean(outputs)}


def _wrong_targets(outputs, y):
    return jnp.sum((outputs - y) ** 2, axis=-1)  # (N, 3) minus (N,): shapes do not broadcast


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            _mean_ce,
            r"loss_fn: the loss must be one value per example, shape \(N,\) = \(2,\) for 2 examples; got shape \(\)",
        ),
        (_ce_with_mean_extra, r"loss_fn: the extra 'm' must be one value per example"),
        (
            _wrong_targets,
            r"loss_fn: fails on model outputs of shape \(2, 3\) and their targets: ValueError: Incompatible shapes",
        ),
    ],
)
def test_a_loss_that_is_not_per_example_is_refused_before_training(loss, message):
    """A batch-mean loss would make padded evaluation batches count their padding (the
    split's loss came out 0.781 instead of 0.847): refused, for fit and evaluate alike."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)).astype(np.float32), rng.integers(0, 3, 30)
    model = nn.Dense(3)
    state = create_train_state(model, optax.sgd(0.1), x, jax.random.key(0), train_arg=None)
    with pytest.raises(ConfigError, match=message):
        fit(state, (x, y), loss_fn=loss, batch_size=10, epochs=1)
    with pytest.raises(ConfigError, match=message):
        evaluate(state, (x, y), loss_fn=loss, batch_size=7)
