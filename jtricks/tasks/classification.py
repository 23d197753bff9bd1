"""Classification tasks: one label among C (softmax), or independent labels (sigmoid)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.losses import accuracy, cross_entropy
from jtricks.tasks.base import (
    Task,
    array_of,
    check_finite,
    check_integer_labels,
    mean_softmax_logits,
)


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Single-label classification with softmax cross-entropy.

    Outputs are logits ``(N, C)``; targets are class indices ``(N,)`` or target
    distributions ``(N, C)`` (one-hot, mixed or soft). The loss is
    ``-sum_c q_c log softmax(z)_c`` with ``q = (1 - s) q + s / C`` under label
    smoothing ``s``; the metric is ``accuracy``, the fraction with
    ``argmax z = argmax q``.

    References:
      Szegedy et al., "Rethinking the Inception Architecture" (2016) (label smoothing),
      https://arxiv.org/abs/1512.00567
    """

    label_smoothing: float = 0.0

    name: ClassVar[str] = "classification"
    train_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)

    def loss(self, outputs, batch):
        return cross_entropy(outputs, self.targets(batch), label_smoothing=self.label_smoothing)

    def stats(self, outputs, batch):
        return {"correct": accuracy(outputs, self.targets(batch))}

    def finalize(self, sums):
        return {"accuracy": sums["correct"] / sums["count"]}

    def combine(self, outputs):
        return mean_softmax_logits(outputs)

    def check(self, batch, outputs, where):
        y = array_of(self.targets(batch))
        field = self.field_name(batch, "targets")
        if len(outputs.shape) != 2:
            raise self.error(
                where,
                "model outputs",
                f"classification needs logits of shape (N, C); the model gives shape "
                f"{outputs.shape[1:]} per example (per-position labels: use the segmentation "
                "or language-model task)",
            )
        num_classes = outputs.shape[-1]
        if y.ndim == 1:
            check_integer_labels(self, where, field, y, num_classes, "the model has")
            return
        if y.shape[1:] != (num_classes,):
            raise self.error(
                where,
                field,
                f"labels must have shape (N,) (class indices) or (N, {num_classes}) "
                f"(distributions over the model's {num_classes} outputs); got shape {y.shape}",
            )
        check_finite(self, where, field, _as_float(y))
        if bool((y < 0).any()) or not bool((abs(y.sum(axis=1) - 1.0) <= 1e-3 + 1e-5).all()):
            raise self.error(
                where, field, "soft labels must be non-negative and sum to 1 over the classes"
            )


@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
    """Binary and multi-label classification with sigmoid binary cross-entropy.

    Outputs are logits ``(N, L)`` for L independent labels (``(N, 1)`` or ``(N,)`` for
    one binary label); targets are 0/1 (or probabilities in [0, 1]) of the same shape,
    or ``(N,)`` for one label. The per-example loss is the mean over labels of
    ``-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]`` (optax's stable form).
    Metrics: ``label_accuracy`` (fraction of labels with ``[z > 0] = [y >= 1/2]``) and
    ``exact_match`` (fraction of examples with every label right).
    """

    name: ClassVar[str] = "multi-label"
    train_metrics: ClassVar[tuple[str, ...]] = ("label_accuracy",)

    def _targets(self, outputs, batch):
        y = self.targets(batch)
        if y.ndim == outputs.ndim - 1 and outputs.shape[-1] == 1:
            y = y[..., None]
        return y.astype(outputs.dtype)

    def loss(self, outputs, batch):
        loss = optax.sigmoid_binary_cross_entropy(outputs, self._targets(outputs, batch))
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
