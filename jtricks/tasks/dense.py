"""Dense prediction: a class at every position (segmentation) or every next token (language models)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from jtricks.errors import check_range
from jtricks.tasks.base import (
    Task,
    array_of,
    at_least_f32,
    check_integer_labels,
    mean_softmax_logits,
)


def _positions(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


class _Dense(Task):
    """Shared by the dense tasks: integer targets ``(N, *S)``, logits ``(N, *S, C)``,
    an optional 0/1 mask ``(N, *S)`` of positions that count."""

    model_hint: ClassVar[str] = ""
    """A built-in model that gives this task's per-position outputs."""

    def valid(self, batch) -> jax.Array:
        y = self.targets(batch)
        mask = self.mask(batch)
        return jnp.ones(y.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)

    def position_ce(self, outputs, batch) -> jax.Array:
        """Per-example mean cross-entropy over valid positions (0 where none is valid)."""
        y, m = self.targets(batch), self.valid(batch)
        ce = optax.softmax_cross_entropy_with_integer_labels(at_least_f32(outputs), y)
        axes = _positions(y)
        return jnp.sum(ce * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)

    def combine(self, outputs):
        return mean_softmax_logits(outputs)

    def check(self, batch, outputs, where):
        y = array_of(self.targets(batch))
        field = self.field_name(batch, "targets")
        if tuple(outputs.shape[1:-1]) != y.shape[1:]:
            whole = len(outputs.shape) == 2  # one output vector per example, no positions
            hint = f" (one per example; {self.model_hint} gives one per position)" * whole
            raise self.error(
                where,
                field,
                f"targets of shape {y.shape[1:]} per example need model outputs of shape "
                f"{(*y.shape[1:], 'C')}; the model gives {tuple(outputs.shape[1:])}{hint}",
            )
        check_integer_labels(self, where, field, y, outputs.shape[-1], "the model's last axis has")
        self.check_mask(batch, y.shape, where)


@dataclasses.dataclass(frozen=True)
class Segmentation(_Dense):
    """Dense prediction (segmentation): a class for every position.

    Outputs are logits ``(N, *S, C)``, targets class indices ``(N, *S)``, an optional mask
    ``(N, *S)`` marks the positions that count. The per-example loss is the mean
    per-position cross-entropy plus ``dice_weight`` times the soft Dice loss
    (`jtricks.losses.dice_loss`, masked). Metrics over the valid positions of the whole
    split, with ``I_c``, ``P_c``, ``T_c`` the counts of positions predicted and labelled
    ``c``, predicted ``c``, labelled ``c``:

    * ``pixel_accuracy``: correct positions / valid positions;
    * ``mean_iou``: the mean over classes with ``P_c + T_c > 0`` of ``I_c / (P_c + T_c - I_c)``;
    * ``dice``: the mean over the same classes of ``2 I_c / (P_c + T_c)``.

    References:
      Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation"
      (2015), https://arxiv.org/abs/1411.4038; Milletari et al., "V-Net" (2016) (Dice loss),
      https://arxiv.org/abs/1606.04797
    """

    dice_weight: float = 0.0

    name: ClassVar[str] = "segmentation"
    model_hint: ClassVar[str] = "--model fcn1d (jtricks.nn.FCN1D)"
    train_metrics: ClassVar[tuple[str, ...]] = ("pixel_accuracy",)
    dense_targets: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_range("dice_weight", self.dice_weight, low=0.0)

    def loss(self, outputs, batch):
        loss = self.position_ce(outputs, batch)
        if self.dice_weight:
            loss = loss + self.dice_weight * self._soft_dice(outputs, batch)
        return loss

    def _soft_dice(self, outputs, batch, eps: float = 1.0) -> jax.Array:
        m = self.valid(batch)[..., None]
        p = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1) * m
        q = jax.nn.one_hot(self.targets(batch), outputs.shape[-1]) * m
        axes = _positions(outputs)[:-1]
        inter, total = jnp.sum(p * q, axis=axes), jnp.sum(p + q, axis=axes)
        return 1.0 - jnp.mean((2 * inter + eps) / (total + eps), axis=-1)

    def stats(self, outputs, batch):
        y, m = self.targets(batch), self.valid(batch)
        num_classes = outputs.shape[-1]
        pred = jax.nn.one_hot(jnp.argmax(outputs, axis=-1), num_classes) * m[..., None]
        true = jax.nn.one_hot(y, num_classes) * m[..., None]
        axes = _positions(y)
        return {
            "correct": jnp.sum((jnp.argmax(outputs, axis=-1) == y) * m, axis=axes),
            "positions": jnp.sum(m, axis=axes),
            "inter": jnp.sum(pred * true, axis=axes),
            "pred": jnp.sum(pred, axis=axes),
            "true": jnp.sum(true, axis=axes),
        }

    def finalize(self, sums):
        inter, total = sums["inter"], sums["pred"] + sums["true"]
        present = total > 0
        n = jnp.maximum(jnp.sum(present), 1)
        iou = jnp.where(present, inter / jnp.where(present, total - inter, 1.0), 0.0)
        dice = jnp.where(present, 2 * inter / jnp.where(present, total, 1.0), 0.0)
        return {
            "pixel_accuracy": sums["correct"] / sums["positions"],
            "mean_iou": jnp.sum(iou) / n,
            "dice": jnp.sum(dice) / n,
        }


@dataclasses.dataclass(frozen=True)
class LanguageModel(_Dense):
    """Next-token language modelling.

    Outputs are logits ``(N, T, V)`` over a vocabulary of V tokens; targets ``(N, T)`` are
    the next tokens (target ``t`` is the token after input position ``t``). Padding is
    left out by a mask ``(N, T)`` in the batch or, with ``pad_id``, wherever the target
    equals it. Each example's loss is its mean token cross-entropy, weighted by its number
    of real tokens, so the objective and the reported ``loss`` are the mean over all real
    tokens. Metrics: ``perplexity`` ``exp(loss)`` and ``token_accuracy``.

    References:
      Bengio et al., "A Neural Probabilistic Language Model" (2003); Radford et al.,
      "Language Models are Unsupervised Multitask Learners" (2019).
    """

    pad_id: int | None = None

    name: ClassVar[str] = "language model"
    model_hint: ClassVar[str] = "--model transformer_lm (jtricks.nn.TransformerLM)"
    train_metrics: ClassVar[tuple[str, ...]] = ("token_accuracy",)

    def valid(self, batch):
        m = super().valid(batch)
        if self.pad_id is not None:
            m = m * (self.targets(batch) != self.pad_id)
        return m

    def loss(self, outputs, batch):
        return self.position_ce(outputs, batch)

    def loss_weight(self, batch):
        return jnp.sum(self.valid(batch), axis=_positions(self.targets(batch)))

    def stats(self, outputs, batch):
        y, m = self.targets(batch), self.valid(batch)
        axes = _positions(y)
        return {
            "tokens": jnp.sum(m, axis=axes),
            "correct_tokens": jnp.sum((jnp.argmax(outputs, axis=-1) == y) * m, axis=axes),
        }

    def finalize(self, sums):
        return {
            "perplexity": jnp.exp(sums["loss_sum"] / sums["loss_weight"]),
            "token_accuracy": sums["correct_tokens"] / sums["tokens"],
        }
