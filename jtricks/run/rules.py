"""The rules that tie `jtricks.run.config.TrainConfig`'s fields together (mixup or cutmix,
one class-balancing tool, TTA's views, what SWA and the EMA evaluate, fine-tuning's
weights, one run length), run in order after each field's own check by
`TrainConfig.validate`. Each raises a `ConfigError` naming the field, its value and what
is allowed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jtricks.data.imbalance import one_balancing
from jtricks.errors import ConfigError


def _one_mix(c: Any) -> None:
    if c.mixup is not None and c.cutmix is not None:
        raise ConfigError("give mixup or cutmix, not both", param="mixup")


def _one_balancing(c: Any) -> None:
    one_balancing(c.class_weight, c.sampler, c.logit_adjust)


def _tta_views(c: Any) -> None:
    if c.tta > 1 and c.augment is None and c.tta_augment is None:
        raise ConfigError(
            f"tta={c.tta} averages augmented views: give augment (used for the views) "
            "or tta_augment",
            param="tta",
        )
    if c.tta_augment is not None and c.tta == 1:
        raise ConfigError(
            f"tta_augment={c.tta_augment!r} needs tta > 1 (the number of views)",
            param="tta_augment",
        )


def _ema_source(c: Any) -> None:
    if c.ema_debias and c.ema is None:
        raise ConfigError("ema_debias corrects an EMA: give ema (a decay)", param="ema_debias")
    if c.eval_params == "ema" and c.ema is None:
        raise ConfigError(
            "eval_params='ema' evaluates on the EMA of the parameters: give ema (a decay)",
            param="eval_params",
        )


def _swa_evaluated(c: Any) -> None:
    """SWA makes its average the parameters at the end: nothing may evaluate others."""
    if c.swa is None:
        return
    if c.early_stopping is not None:
        raise ConfigError(
            f"swa={c.swa} makes the average of the epochs' parameters the final state, and "
            f"early_stopping={c.early_stopping} keeps its best epoch's state: give one of them",
            param="swa",
        )
    if c.eval_params == "ema":
        raise ConfigError(
            f"swa={c.swa} replaces the training parameters by their average, but "
            "eval_params='ema' evaluates the EMA, so the average would never be evaluated: "
            "drop one of them",
            param="swa",
        )


def _finetune(c: Any) -> None:
    if c.finetune is not None and c.pretrained is None:
        raise ConfigError(
            f"finetune={c.finetune!r} needs pretrained weights (--pretrained RUN_DIR)",
            param="finetune",
        )


def _length(c: Any) -> None:
    if c.epochs is not None and c.steps is not None:
        raise ConfigError(
            f"give epochs or steps, not both; got epochs={c.epochs}, steps={c.steps}",
            param="epochs",
        )


RULES: tuple[Callable[[Any], None], ...] = (
    _one_mix,
    _one_balancing,
    _tta_views,
    _ema_source,
    _swa_evaluated,
    _finetune,
    _length,
)
"""The checks that tie fields together, run in order after the per-field checks."""
