"""The losses and the train / eval steps under `chex.variants` (with and without
`jax.jit`): each against a formula written out by hand in float64 NumPy, trees compared
with `chex.assert_trees_all_close`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.losses import binary_cross_entropy, cross_entropy, dice_loss, mse
from jtricks.nn import build_model
from jtricks.training import create_train_state, make_eval_step, make_train_step

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 4)).astype(np.float32)
LABELS = np.array([0, 3, 1, 2, 2, 0])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return (
        z
        - z.max(-1, keepdims=True)
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))[..., None]
    )


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_is_the_smoothed_target_formula(self):
        for smoothing in (0.0, 0.2):
            got = self.variant(lambda z, y, s=smoothing: cross_entropy(z, y, label_smoothing=s))(
                LOGITS, LABELS
            )
            q = (1 - smoothing) * np.eye(4)[LABELS] + smoothing / 4
            chex.assert_shape(got, (6,))
            chex.assert_trees_all_close(got, -(q * _log_softmax(LOGITS)).sum(-1), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_binary_cross_entropy_and_mse_by_hand(self):
        z = LOGITS.astype(np.float64)
        y = (RNG.random(LOGITS.shape) > 0.5).astype(np.float32)
        p = 1 / (1 + np.exp(-z))
        bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(-1)
        chex.assert_trees_all_close(self.variant(binary_cross_entropy)(LOGITS, y), bce, rtol=1e-5)
        chex.assert_trees_all_close(
            self.variant(mse)(LOGITS, y), ((z - y) ** 2).mean(-1), rtol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_dice_loss_by_hand(self):
        z = RNG.normal(size=(2, 5, 3)).astype(np.float32)
        y = RNG.integers(0, 3, size=(2, 5))
        p, onehot = np.exp(_log_softmax(z)), np.eye(3)[y]
        dice = (2 * (p * onehot).sum(1) + 1.0) / (p.sum(1) + onehot.sum(1) + 1.0)
        chex.assert_trees_all_close(self.variant(dice_loss)(z, y), 1 - dice.mean(-1), rtol=1e-5)


MODEL = build_model("mlp(features=(8,))", 4)
X = RNG.normal(size=(6, 5)).astype(np.float32)


class StepTest(chex.TestCase):
    def _state(self):
        return create_train_state(MODEL, optax.sgd(0.1), X, jax.random.key(0))

    @chex.variants(with_jit=True, without_jit=True)
    def test_one_sgd_step_is_params_minus_lr_times_the_mean_gradient(self):
        state = self._state()
        step = self.variant(make_train_step(task="classification"))
        new, metrics = step(state, (X, LABELS))

        def mean_loss(params):  # the hand objective: mean cross-entropy, float32 model
            logits = MODEL.apply({"params": params}, X)
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

        loss, grads = jax.value_and_grad(mean_loss)(state.params)
        want = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        chex.assert_trees_all_close(new.params, want, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(metrics["loss"], loss, rtol=1e-6)
        grad_norm = np.sqrt(
            sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))
        )
        chex.assert_trees_all_close(metrics["grad_norm"], grad_norm, rtol=1e-5)
        chex.assert_trees_all_equal(int(new.step), 1)
        chex.assert_trees_all_equal_shapes_and_dtypes(new.params, state.params)

    @chex.variants(with_jit=True, without_jit=True)
    def test_the_eval_step_weighs_out_padding(self):
        state = self._state()
        weights = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)  # two padded examples
        eval_step = make_eval_step(task="classification")
        metrics = eval_step.metrics(self.variant(eval_step)(state, (X, LABELS), weights))
        logits = np.asarray(MODEL.apply({"params": state.params}, X), np.float64)
        per = -_log_softmax(logits)[np.arange(6), LABELS]
        chex.assert_trees_all_close(metrics["loss"], per[:4].mean(), rtol=1e-5)
        right = (logits.argmax(-1) == LABELS)[:4].mean()
        chex.assert_trees_all_close(metrics["accuracy"], right, rtol=1e-6)
