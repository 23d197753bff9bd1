"""Classification tasks: one label among C (softmax), or independent labels (sigmoid)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.losses import (
    accuracy,
    cross_entropy,
    focal_loss,
    generalized_cross_entropy,
    shaped_like,
)
from jtricks.tasks.base import (
    Task,
    array_of,
    check_finite,
    check_integer_labels,
    mean_softmax_logits,
    position_mean,
)

MAX_CLASS_STATS = 1024
"""The most classes for which classification sums per-class statistics (three ``(N, C)``
one-hots per evaluated batch; the confusion matrix is ``(N, C, C)``)."""


def per_class(values: tuple[float, ...], outputs: jax.Array, name: str) -> jax.Array:
    """``values`` (one per class) as an array, checked against the logits' class axis."""
    if len(values) != outputs.shape[-1]:
        raise ValueError(
            f"{name} has {len(values)} values but the model has {outputs.shape[-1]} classes"
        )
    return jnp.asarray(values, jnp.float32)


def class_stats(outputs: jax.Array, labels: jax.Array, *, confusion: bool = False) -> dict:
    """Per-example one-hots ``(N, C)`` whose sums over a split are each class's support
    ``n_c`` (``class_count``), predictions ``p_c`` (``class_predicted``) and correct
    predictions ``t_c`` (``class_hit``); with ``confusion``, ``onehot(y) onehot(pred)^T``
    ``(N, C, C)``, whose sum is the confusion matrix. One-hot or soft labels count as
    their argmax."""
    num_classes = outputs.shape[-1]
    y = jnp.argmax(labels, axis=-1) if labels.ndim == outputs.ndim else labels
    true = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    pred = jax.nn.one_hot(jnp.argmax(outputs, axis=-1), num_classes, dtype=jnp.float32)
    stats = {"class_count": true, "class_predicted": pred, "class_hit": true * pred}
    if confusion:
        stats["confusion"] = true[:, :, None] * pred[:, None, :]
    return stats


def balanced_metrics(sums: dict) -> dict:
    """Balanced accuracy and macro-F1 from summed `class_stats`.

    ``balanced_accuracy = mean_c t_c / n_c`` over the classes present (``n_c > 0``);
    ``macro_f1 = mean_c 2 t_c / (n_c + p_c)`` (``F1 = 2PR / (P + R)`` with precision
    ``t_c / p_c`` and recall ``t_c / n_c``) over the classes that are present or
    predicted: scikit-learn's ``balanced_accuracy_score`` and
    ``f1_score(average="macro")``.

    References:
      Brodersen et al., "The balanced accuracy and its posterior distribution" (2010),
      https://doi.org/10.1109/ICPR.2010.764
    """
    n, p, t = sums["class_count"], sums["class_predicted"], sums["class_hit"]
    present, seen = n > 0, (n + p) > 0
    recall = jnp.where(present, t / jnp.maximum(n, 1.0), 0.0)
    f1 = jnp.where(seen, 2 * t / jnp.maximum(n + p, 1.0), 0.0)
    return {
        "balanced_accuracy": recall.sum(-1) / jnp.maximum(present.sum(-1), 1),
        "macro_f1": f1.sum(-1) / jnp.maximum(seen.sum(-1), 1),
    }


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Single-label classification with softmax cross-entropy.

    Training-only changes to the objective (evaluation reports the plain loss):
    ``class_weight`` ``(w_c)`` multiplies example ``i``'s loss by ``w_{y_i}`` (by
    ``sum_c q_c w_c`` for soft labels; the batch mean stays a plain mean, as Keras' and
    scikit-learn's ``class_weight``; `jtricks.data.imbalance.class_weights` makes them);
    ``focal_gamma`` trains on `jtricks.losses.focal_loss`, ``gce_q`` on
    `jtricks.losses.generalized_cross_entropy` (for noisy labels); ``logit_adjust`` ``(b_c)``
    adds ``b_c = tau log pi_c`` to the logits (`jtricks.data.imbalance.logit_adjustment`,
    Menon et al. 2021).

    Outputs are logits ``(N, C)``; targets are class indices ``(N,)`` or target
    distributions ``(N, C)`` (one-hot, mixed or soft). The loss is
    ``-sum_c q_c log softmax(z)_c`` with ``q = (1 - s) q + s / C`` under label
    smoothing ``s``; the metric is ``accuracy``, the fraction with
    ``argmax z = argmax q``. With one label per example and at most `MAX_CLASS_STATS`
    classes, evaluation also reports ``balanced_accuracy`` and ``macro_f1`` (see
    `balanced_metrics`), and with ``confusion=True`` the split's confusion matrix
    ``confusion[i, j]`` (examples of class i predicted as j; `jtricks.training.class_report`
    turns it into per-class figures). Per-position targets ``(N, *S)`` with logits ``(N, *S, C)``
    (token sequences, pixels) give each example the mean over its positions (those
    where the batch's 0/1 ``mask`` of shape ``(N, *S)`` is 1, when it has one) of the
    loss and of the accuracy; the segmentation and language-model tasks weigh positions
    their own ways.

    References:
      Szegedy et al., "Rethinking the Inception Architecture" (2016) (label smoothing),
      https://arxiv.org/abs/1512.00567
    """

    label_smoothing: float = 0.0
    confusion: bool = False
    class_weight: tuple[float, ...] | None = None
    focal_gamma: float = 0.0
    gce_q: float = 0.0
    logit_adjust: tuple[float, ...] | None = None

    name: ClassVar[str] = "classification"
    train_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)

    def loss(self, outputs, batch):
        y = self.targets(batch)
        ce = cross_entropy(outputs, y, label_smoothing=self.label_smoothing)
        return position_mean(ce, self.mask(batch))

    def train_loss(self, outputs, batch):
        y = self.targets(batch)
        if self.logit_adjust is not None:
            outputs = outputs + per_class(self.logit_adjust, outputs, "logit_adjust")
        if self.focal_gamma:
            loss = focal_loss(
                outputs, y, gamma=self.focal_gamma, label_smoothing=self.label_smoothing
            )
        elif self.gce_q:
            loss = generalized_cross_entropy(
                outputs, y, q=self.gce_q, label_smoothing=self.label_smoothing
            )
        else:
            loss = cross_entropy(outputs, y, label_smoothing=self.label_smoothing)
        if self.class_weight is not None:
            w = per_class(self.class_weight, outputs, "class_weight")
            loss = loss * (w[y] if y.ndim == outputs.ndim - 1 else y.astype(w.dtype) @ w)
        return position_mean(loss, self.mask(batch))

    def train_stats(self, outputs, batch):
        correct = accuracy(outputs, self.targets(batch))
        return {"correct": position_mean(correct, self.mask(batch))}

    def stats(self, outputs, batch):
        stats = self.train_stats(outputs, batch)
        if outputs.ndim == 2 and outputs.shape[-1] <= MAX_CLASS_STATS:
            stats.update(class_stats(outputs, self.targets(batch), confusion=self.confusion))
        return stats

    def finalize(self, sums):
        metrics = {"accuracy": sums["correct"] / sums["count"]}
        if "class_count" in sums:
            metrics.update(balanced_metrics(sums))
        if "confusion" in sums:
            metrics["confusion"] = sums["confusion"]
        return metrics

    def combine(self, outputs):
        return mean_softmax_logits(outputs)

    def check(self, batch, outputs, where):
        y = array_of(self.targets(batch))
        field = self.field_name(batch, "targets")
        if len(outputs.shape) > 2 and y.shape[1:] in (outputs.shape[1:-1], outputs.shape[1:]):
            self._check_positions(batch, y, outputs, where, field)
            return
        if len(outputs.shape) != 2:
            raise self.error(
                where,
                "model outputs",
                f"classification needs logits of shape (N, C), or (N, *S, C) for targets "
                f"(N, *S); the model gives shape {outputs.shape[1:]} per example for targets "
                f"of shape {y.shape[1:]} (a language model: the language-model task and "
                "transformer_lm; per-pixel classes: the segmentation task)",
            )
        num_classes = outputs.shape[-1]
        if y.ndim == 1:
            check_integer_labels(self, where, field, y, num_classes, "the model has")
            return
        if y.shape[1:] != (num_classes,):
            positions = np.issubdtype(y.dtype, np.integer) and y.ndim > 1
            raise self.error(
                where,
                field,
                f"labels must have shape (N,) (class indices) or (N, {num_classes}) "
                f"(distributions over the model's {num_classes} outputs); got shape {y.shape}"
                + (
                    " (class indices per position need logits per position, (N, *S, C): "
                    "a language model is transformer_lm with the language-model task, "
                    "per-position classes the segmentation task)"
                    if positions
                    else ""
                ),
            )
        check_finite(self, where, field, _as_float(y))
        if bool((y < 0).any()) or not bool((abs(y.sum(axis=1) - 1.0) <= 1e-3 + 1e-5).all()):
            raise self.error(
                where, field, "soft labels must be non-negative and sum to 1 over the classes"
            )

    def _check_positions(self, batch, y, outputs, where, field) -> None:
        """Per-position targets: class indices in range (or distributions), a 0/1 mask."""
        if y.ndim == len(outputs.shape) - 1:
            check_integer_labels(self, where, field, y, outputs.shape[-1], "the model has")
        else:
            check_finite(self, where, field, _as_float(y))
        self.check_mask(batch, y.shape[: len(outputs.shape) - 1], where)


@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
    """Binary and multi-label classification with sigmoid binary cross-entropy.

    Outputs are logits ``(N, L)`` for L independent labels (``(N, 1)`` or ``(N,)`` for
    one binary label); targets are 0/1 (or probabilities in [0, 1]) of the same shape,
    or ``(N,)`` for one label. The per-example loss is the mean over labels of
    ``-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]`` (optax's stable form).
    Metrics: ``label_accuracy`` (fraction of labels with ``[z > 0] = [y >= 1/2]``) and
    ``exact_match`` (fraction of examples with every label right). ``focal_gamma > 0``
    trains on optax's ``sigmoid_focal_loss`` (Lin et al. 2017) instead; evaluation
    reports the plain loss.
    """

    focal_gamma: float = 0.0

    name: ClassVar[str] = "multi-label"
    train_metrics: ClassVar[tuple[str, ...]] = ("label_accuracy",)

    def _targets(self, outputs, batch):
        needs = "binary_cross_entropy needs labels of the logits'"
        return shaped_like(self.targets(batch), outputs, needs).astype(outputs.dtype)

    def loss(self, outputs, batch):
        loss = optax.sigmoid_binary_cross_entropy(outputs, self._targets(outputs, batch))
        return loss.reshape(loss.shape[0], -1).mean(axis=-1)

    def train_loss(self, outputs, batch):
        if not self.focal_gamma:
            return self.loss(outputs, batch)
        y = self._targets(outputs, batch)
        loss = optax.sigmoid_focal_loss(outputs, y, alpha=None, gamma=self.focal_gamma)
        return loss.reshape(loss.shape[0], -1).mean(axis=-1)

    def stats(self, outputs, batch):
        right = (outputs > 0) == (self._targets(outputs, batch) >= 0.5)
        right = right.reshape(right.shape[0], -1).astype(jnp.float32)
        return {"labels_right": right.mean(axis=-1), "all_right": right.min(axis=-1)}

    def combine(self, outputs):
        """Logits of the members' mean sigmoid probability, ``log p - log(1 - p)``."""
        log_m = jnp.log(outputs.shape[0])
        log_p = jax.nn.logsumexp(jax.nn.log_sigmoid(outputs), axis=0) - log_m
        log_q = jax.nn.logsumexp(jax.nn.log_sigmoid(-outputs), axis=0) - log_m
        return log_p - log_q

    def finalize(self, sums):
        return {
            "label_accuracy": sums["labels_right"] / sums["count"],
            "exact_match": sums["all_right"] / sums["count"],
        }

    def check(self, batch, outputs: jax.ShapeDtypeStruct, where):
        y = array_of(self.targets(batch))
        field = self.field_name(batch, "targets")
        per_example = tuple(outputs.shape[1:])
        ok = y.shape[1:] == per_example or (per_example == (1,) and y.ndim == 1)
        if not ok:
            raise self.error(
                where,
                field,
                f"targets must have the model's output shape {per_example} per example"
                f"{' (or none, for one label)' if per_example == (1,) else ''}; "
                f"got {y.shape[1:]} (the model's {int(np.prod(per_example))} outputs are the "
                "labels' logits)",
            )
        check_finite(self, where, field, _as_float(y))
        if bool(((y < 0) | (y > 1)).any()):
            lo, hi = float(y.min()), float(y.max())
            raise self.error(where, field, f"targets must lie in [0, 1]; got [{lo}, {hi}]")


def _as_float(y):
    """Labels as floats for the finiteness check: NumPy in float64, a JAX array as it is
    (integers are finite, floats are checked on their device)."""
    return y if isinstance(y, jax.Array) else y.astype(np.float64)
