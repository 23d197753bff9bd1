"""The public step API on per-position targets: `make_train_step` / `make_eval_step` with
the built-in cross-entropy take token targets ``(N, T)`` with logits ``(N, T, V)``
(per-example loss = mean over positions, a mask honoured), checked against float64
formulas written out in NumPy; wrong shapes give one-line errors naming them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.losses import binary_cross_entropy, cross_entropy, mse
from jtricks.training import create_train_state, fit, make_eval_step, make_train_step

V, T, N = 5, 12, 32


class Tagger(nn.Module):
    """Logits ``(N, T, V)`` for tokens ``(N, T)``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(V)(nn.Embed(V, 8)(x))


RNG = np.random.default_rng(0)
X = RNG.integers(0, V, (N, T)).astype(np.int32)
Y = RNG.integers(0, V, (N, T)).astype(np.int32)
MASK = (RNG.random((N, T)) < 0.7).astype(np.float32)
MASK[3] = 0.0  # an example with no valid position counts 0


def _state():
    return create_train_state(Tagger(), optax.sgd(0.1), X[:1], jax.random.key(0))


def _reference(logits, y, mask=None):
    """float64 NumPy: per-position -log softmax, then the per-example (masked) mean."""
    z = np.asarray(logits, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    hit = (z.argmax(-1) == y).astype(np.float64)
    m = np.ones_like(ce) if mask is None else mask.astype(np.float64)
    count = np.maximum(m.sum(1), 1.0)
    return (ce * m).sum(1) / count, (hit * m).sum(1) / count


@pytest.mark.parametrize("masked", [False, True])
def test_train_and_eval_steps_on_token_targets_match_the_formula(masked):
    state = _state()
    batch = {"x": X, "y": Y, "mask": MASK} if masked else (X, Y)
    logits = state.apply_fn({"params": state.params}, X)
    per_example, correct = _reference(logits, Y, MASK if masked else None)
    new, metrics = jax.jit(make_train_step(cross_entropy))(state, batch)
    np.testing.assert_allclose(metrics["loss"], per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], correct.mean(), rtol=1e-5)

    def hand_loss(params):  # an independent objective for the gradient
        z = state.apply_fn({"params": params}, X)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, Y)
        m = jnp.asarray(MASK) if masked else jnp.ones_like(ce)
        return jnp.mean(jnp.sum(ce * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0))

    grads = jax.grad(hand_loss)(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new.params, expected
    )
    weight = np.ones(N, np.float32)
    weight[-4:] = 0.0  # padding rows do not count
    sums = jax.jit(make_eval_step(cross_entropy))(state, batch, jnp.asarray(weight))
    np.testing.assert_allclose(sums["loss_sum"], (per_example * weight).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["correct"], (correct * weight).sum(), rtol=1e-5)


def test_fit_trains_the_classification_task_on_token_targets():
    state, history = fit(_state(), (X, Y), batch_size=8, epochs=2, val_data=(X, Y))
    assert np.isfinite(history.records[-1]["val_loss"]) and int(state.step) == 8


@pytest.mark.parametrize(
    "loss_fn, y, match",
    [
        (
            cross_entropy,
            Y[:, :5],
            r"cross_entropy needs labels of shape \(32, 12\).*got labels of shape \(32, 5\)",
        ),
        (mse, Y, r"regression needs one target per model output: outputs of shape \(32, 12, 5\)"),
        (
            binary_cross_entropy,
            Y,
            r"binary_cross_entropy needs labels of the logits' shape \(32, 12, 5\)",
        ),
        (
            lambda z, y: jnp.square(z.mean(-1) - y),
            Y,
            r"loss gives shape \(32, 12\) for a batch of 32; it must give \(32,\)",
        ),
    ],
    ids=["cross_entropy", "mse", "bce", "own"],
)
def test_wrong_shapes_give_one_line_errors_naming_them(loss_fn, y, match):
    state = _state()
    with pytest.raises(ValueError, match=match) as e:
        jax.jit(make_train_step(loss_fn))(state, (X, y))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=match):
        jax.jit(make_eval_step(loss_fn))(state, (X, y), jnp.ones(N))


def test_wrong_model_messages_say_what_to_do():
    from jtricks.errors import ConfigError
    from jtricks.nn import build_model

    x = RNG.normal(size=(16, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    mlp = create_train_state(
        build_model("mlp(features=(8,))", 2), optax.sgd(0.1), x[:1], jax.random.key(0)
    )
    with pytest.raises(
        ConfigError,
        match=r"targets \(batch\[1\]\) are a dict with keys \['label', 'mask'\]; give the batch flat",
    ):
        fit(mlp, (x, {"label": y, "mask": np.ones(16)}), batch_size=8, epochs=1)
    masked = {"x": X, "label": Y, "mask": MASK}  # the flat form it names works
    state, _ = fit(_state(), masked, batch_size=8, epochs=1)
    assert int(state.step) == 4
    classifier = build_model("transformer(d_model=16, heads=2, layers=1)", V)
    tokens = create_train_state(classifier, optax.sgd(0.1), X[:1], jax.random.key(0))
    with pytest.raises(
        ConfigError, match="a language model is transformer_lm with the language-model task"
    ):
        fit(tokens, (X, Y), batch_size=8, epochs=1)
    with pytest.raises(
        ConfigError,
        match=r"integer token ids and these inputs are real-valued: .*tokens\(\.\.\.\) or text:PATH",
    ):
        create_train_state(
            build_model("transformer_lm(d_model=16, heads=2, layers=1)", V),
            optax.sgd(0.1),
            x[:1],
            jax.random.key(0),
        )
    with pytest.raises(ConfigError, match=r"CNN1D is a 1-D model: .*for images \(H, W, C\)"):
        create_train_state(
            build_model("cnn", 3), optax.sgd(0.1), np.zeros((1, 8, 8, 3)), jax.random.key(0)
        )


@pytest.mark.parametrize(
    "model, dataset", [("fcn1d", "segmentation1d"), ("transformer_lm", "tokens")]
)
def test_a_model_refused_on_the_default_dataset_names_one_it_trains_on(
    model, dataset, tmp_path, capsys
):
    """Every built-in model trains on the default dataset or exits 2 in one line naming a
    --dataset on which it then trains (the others take MNIST-1D: tests/test_models.py)."""
    from jtricks.cli import main

    args = ["train", "--model", model, "--steps", "1", "--batch-size", "16", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        f"--model {model} trains on --dataset {dataset}"
    )
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--dataset", dataset, "--out", str(tmp_path / "trains")]) == 0
