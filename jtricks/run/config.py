"""`TrainConfig`: every setting of a run, each declared once with its flag, help and check.

A field's metadata (`setting`) is the single source of truth the CLI reads: ``jtricks
train``'s flags, their types, defaults and help are derived from it
(`jtricks.cli.train.add_config_flags`), and `TrainConfig.validate` runs each field's
own check, then the rules that tie fields together (`RULES`), once each.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from jtricks.data.batching import SAMPLERS
from jtricks.data.stream import LOADERS
from jtricks.errors import ConfigError, did_you_mean
from jtricks.run.rules import RULES
from jtricks.run.settings import (
    INT_LIMIT,
    at_least,
    boolean,
    class_weight_spec,
    eval_source,
    flag_of,
    loss_spec,
    number,
    one_of,
    optional,
    parse_steps,
    profile_steps,
    setting,
    spec_string,
    string,
)
from jtricks.training.steps import PRECISIONS

__all__ = [
    "INT_LIMIT",
    "RULES",
    "TrainConfig",
    "check_keys",
    "check_recordable",
    "flag_of",
    "parse_steps",
]

# ----------------------------------------------------------------------------- the config

_SCHEDULES = (
    "constant, per_epoch(factor=0.98), exponential(rate=0.05), step(epochs=(30, 60), "
    "factor=0.1), warmup(epochs=1), warmup_cosine(warmup_epochs=1), cosine, one_cycle, "
    "plateau(factor=0.5, patience=5)"
)
TARGET_SCALES = ("none", "standardize")
"""``target_scale`` values (`jtricks.tasks.Regression.standardized`)."""
_AUGMENTS = (
    'e.g. "shift(3) | noise(0.05)" or "random_crop(4) | hflip"; names: hflip, translate, '
    "random_crop, rotate, cutout, brightness, contrast, noise, scale, shift, time_stretch, trend"
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` in the run folder.

    The defaults are the MNIST-1D paper's CNN setting: Adam, learning rate 1e-2, batch
    100, 6000 steps (``DEFAULT_STEPS``, used when neither ``epochs`` nor ``steps`` is
    given). ``optimizer`` is a pipeline spec (string, dict or list, see
    `jtricks.optim.build_optimizer`); ``schedule`` a schedule spec with durations in
    epochs (see `jtricks.optim.build_schedule`). ``val_fraction`` of the training split
    (stratified by class unless ``stratify=False``) is held out for validation;
    ``preprocess`` is fitted on the remaining training examples only. Each field's help
    (``jtricks train --help``) says what it does.
    """

    dataset: str = setting(
        "mnist1d",
        "dataset spec: mnist1d, digits (scikit-learn's 8x8), synthetic(shape=(8, 8, 3), ...), "
        "regression, segmentation1d, "
        "tokens, text:PATH, npz:PATH, shards:DIR (.npy shards on disk, streamed), ..., or "
        "your own code, mydata:load(n=5)",
        spec_string(
            "name a dataset, a file ('npz:PATH' holding x, y, x_test, y_test) or a "
            "function of yours ('mydata:load'); arrays in memory are named by "
            "jtricks.data.in_memory(arrays) (jtricks.train(dataset=arrays) calls it)"
        ),
    )
    task: str | None = setting(
        None,
        "task spec (default: the dataset's own): classification, multilabel, regression, "
        "segmentation(dice_weight=1.0), lm(pad_id=0)",
        optional(string),
    )
    model: str = setting(
        "cnn",
        "model spec: cnn, mlp, mlp(features=(256, 256), dropout=0.2), ...",
        spec_string(
            "name your own Linen or NNX class by import path ('mymodels:Net(width=64)'), "
            "or pass a module object to create_train_state and fit"
        ),
    )
    optimizer: Any = setting(
        "adam", "optimizer spec: sgd, momentum, adam, adamw, optax.lion, 'adam | clip(1.0)', ..."
    )
    learning_rate: float = setting(
        1e-2,
        "learning rate",
        number(0.0, closed=(False, True)),
        parse=float,
        flag="--lr",
        aliases=("--learning-rate",),
    )
    schedule: str = setting(
        "constant", f"learning-rate schedule (durations in epochs): {_SCHEDULES}", string
    )
    batch_size: int = setting(100, "examples per optimizer step", at_least(1), parse=int)
    epochs: int | None = setting(
        None, "number of epochs", optional(at_least(1)), parse=int, exclusive="length"
    )
    steps: int | None = setting(
        None,
        "number of optimizer steps (default 6000, the paper's)",
        optional(at_least(1)),
        parse=int,
        exclusive="length",
    )
    val_fraction: float = setting(
        0.1,
        "fraction of the training data held out for validation, in (0, 1)",
        number(0.0, 1.0, closed=(False, False)),
        parse=float,
    )
    stratify: bool = setting(
        True, "plain random validation split", boolean, parse=bool, flag="--no-stratify"
    )
    preprocess: str = setting(
        "standardize",
        "standardize, minmax, minmax(-1, 1) or none; each feature its own statistics with "
        "per_feature=True, e.g. standardize(per_feature=True)",
        string,
    )
    target_scale: str = setting(
        "none",
        "regression targets as the model learns them: none, or standardize (per output, "
        "with the training rows' mean and std; metrics and predictions in the targets' units)",
        one_of(TARGET_SCALES),
    )
    seed: int = setting(0, "the run's seed", at_least(0, 2**63 - 1), parse=int)
    eval_batch_size: int = setting(1000, "examples per evaluation batch", at_least(1), parse=int)
    early_stopping: int | None = setting(
        None,
        "stop when the validation loss has not improved for PATIENCE epochs; keep the best",
        optional(at_least(1)),
        parse=int,
        metavar="PATIENCE",
    )
    checkpoint_every: int = setting(
        10, "checkpoint every N epochs (and at the end)", at_least(1), parse=int
    )
    keep_checkpoints: int = setting(
        3, "keep the last K checkpoints (plus the best)", at_least(1), parse=int
    )
    max_nonfinite: int = setting(
        20,
        "stop after N consecutive steps with a NaN/inf loss or gradient (each is skipped)",
        at_least(1),
        parse=int,
    )
    augment: str | None = setting(
        None, f"training-only augmentation pipeline, {_AUGMENTS}", optional(string)
    )
    mixup: float | None = setting(
        None,
        "mixup with Beta(ALPHA, ALPHA)",
        optional(number(0.0, closed=(False, True))),
        parse=float,
        metavar="ALPHA",
        exclusive="mixing",
    )
    cutmix: float | None = setting(
        None,
        "cutmix with Beta(ALPHA, ALPHA)",
        optional(number(0.0, closed=(False, True))),
        parse=float,
        metavar="ALPHA",
        exclusive="mixing",
    )
    label_smoothing: float = setting(
        0.0,
        "train on targets (1 - S) * one_hot + S / C (default 0: off)",
        number(0.0, 1.0, closed=(True, False)),
        parse=float,
        metavar="S",
    )
    sampler: str | None = setting(
        None,
        "balanced: draw each training batch with every class equally likely (with "
        "replacement, on the device, exact on resume; in-memory data)",
        optional(one_of(SAMPLERS)),
        metavar="NAME",
    )
    class_weight: str | None = setting(
        None,
        "weigh each class's training loss: balanced (n / (C * n_c) from the training labels, "
        "scikit-learn's) or {0: 2.0, 3: 5.0} (the others 1)",
        optional(class_weight_spec),
        metavar="SPEC",
    )
    loss: str = setting(
        "cross_entropy",
        "training loss: cross_entropy, focal(gamma=2.0) (softmax focal; multilabel: sigmoid), "
        "gce(q=0.7) (generalized cross-entropy, robust to noisy labels), huber(delta=1.0) "
        "(regression, robust to outlying targets); evaluation reports the plain loss",
        loss_spec,
        metavar="SPEC",
    )
    logit_adjust: float | None = setting(
        None,
        "train on logits + TAU * log(training class frequency), the logit-adjusted loss for "
        "long-tailed data (Menon et al. 2021; TAU = 1 is the paper's)",
        optional(number(0.0, closed=(False, True))),
        parse=float,
        metavar="TAU",
    )
    tta: int = setting(
        1,
        "test-time augmentation: report final validation/test metrics of the mean softmax "
        "over V views (the clean input and V-1 augmented ones; default 1: off)",
        at_least(1),
        parse=int,
        metavar="V",
    )
    tta_augment: str | None = setting(
        None,
        "augmentation pipeline for the --tta views (default: --augment)",
        optional(string),
        metavar="SPEC",
    )
    ema: float | None = setting(
        None,
        "keep an exponential moving average of the parameters (e.g. 0.999); validation and "
        "test are also reported on it",
        optional(number(0.0, 1.0, closed=(True, False))),
        parse=float,
        metavar="DECAY",
    )
    ema_debias: bool = setting(
        False,
        "start the EMA from zero and read it divided by 1 - decay^step (Adam's bias "
        "correction): an average of the steps' parameters only, for a decay slow for the run",
        boolean,
        parse=bool,
    )
    eval_params: str = setting(
        "auto",
        "the parameters validation, test, early stopping, the best checkpoint and TTA use: "
        "auto (the optimizer's evaluation parameters where it declares them, e.g. "
        "schedule-free, else the training ones), train, or ema (needs --ema)",
        eval_source,
        metavar="SOURCE",
    )
    swa: int | None = setting(
        None,
        "stochastic weight averaging from EPOCH on; BatchNorm re-estimated at the end",
        optional(at_least(1)),
        parse=int,
        metavar="EPOCH",
    )
    ensemble: int = setting(
        1,
        "train N models at once (one vmapped program); reports each member and the ensemble",
        at_least(1),
        parse=int,
        metavar="N",
    )
    accumulate: int = setting(
        1,
        "gradient accumulation: K micro-batches of --batch-size per optimizer update",
        at_least(1),
        parse=int,
        metavar="K",
    )
    precision: str = setting(
        "float32",
        "float32, or bf16 (compute in bfloat16; float32 master parameters and optimizer state)",
        one_of(PRECISIONS),
    )
    fused: bool = setting(
        False,
        "fused optimizer: the update runs over one flat buffer per dtype group "
        "(jtricks.optim.fused), so its cost does not grow with the number of parameter arrays",
        boolean,
        parse=bool,
    )
    tensorboard: bool = setting(
        False,
        "also write TensorBoard event files of every epoch's record and of the config into "
        "RUN/tensorboard (pip install 'jtricks[tensorboard]')",
        boolean,
        parse=bool,
    )
    pretrained: str | None = setting(
        None,
        "load matching parameters from a run folder or checkpoint folder",
        optional(string),
        metavar="DIR",
    )
    finetune: str | None = setting(
        None,
        "with --pretrained: head (train the last layer), last:K (the last K layers) or all",
        optional(string),
        metavar="PRESET",
    )
    stream: bool = setting(
        False,
        "train from a stream of host batches fed to the device ahead of use, as for a "
        "dataset on disk (shards:DIR always streams); the batches are the in-memory path's",
        boolean,
        parse=bool,
    )
    loader: str = setting(
        "python",
        "who reads a stream's batches: python (a background thread) or grain (Grain's "
        "threaded reader; pip install 'jtricks[grain]')",
        one_of(LOADERS),
        metavar="NAME",
    )
    chunk: int | None = setting(
        None,
        "steps per compiled program: a stream's chunk (default: up to 64 batches or 64 "
        "MiB); in-memory epochs longer than K steps (default 1000) run in equal parts, "
        "the progress bar and step records advancing after each",
        optional(at_least(1)),
        parse=int,
        metavar="K",
    )
    mesh: str | None = setting(
        None,
        "devices as a mesh of named axes, e.g. data=4,fsdp=2 (sizes multiply to the device "
        "count): batches split over both, parameters, optimizer state and BatchNorm "
        "statistics sharded along fsdp (default: data-parallel over every device)",
        optional(string),
        metavar="AXES",
    )
    log_every_steps: int | None = setting(
        None,
        "also record every N-th step (loss, lr, gradient, update and parameter norms, "
        "skipped) into RUN/steps.jsonl (and TensorBoard): kept on the device, written when "
        "each compiled program returns",
        optional(at_least(1)),
        parse=int,
        metavar="N",
    )
    profile: str | None = setting(
        None,
        "trace steps A to B (inclusive; A:B, or A) with jax.profiler into RUN/profile, "
        "one annotated dispatch per step: open with TensorBoard's profile plugin or Perfetto",
        optional(profile_steps),
        metavar="A:B",
    )

    DEFAULT_STEPS = 6000

    def __post_init__(self) -> None:
        # NumPy scalars (a rate from np.logspace, a size from np.arange) become the Python
        # numbers they are: checked, compared and written to config.json as typed by hand
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.generic):
                object.__setattr__(self, field.name, value.item())

    def validate(self) -> None:
        """Run every field's check, then every rule of `jtricks.run.rules.RULES` (names are
        checked when built).

        Raises:
          ConfigError: naming the field, its value and what is allowed.
        """
        for field in dataclasses.fields(self):
            check = field.metadata.get("check")
            if check is not None:
                check(field.name, getattr(self, field.name))
        for rule in RULES:
            rule(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (e.g. parsed JSON); an unknown key is a `ConfigError`."""
        check_keys(d)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_keys(settings: dict[str, Any]) -> None:
    """Raise `ConfigError` for a key that is not a `TrainConfig` field, listing the valid
    ones, with a hint for each unknown key that is a flag's name (``lr``: the key is
    ``learning_rate``), a recipe, or close to a key."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        hints = "".join(_key_hint(k, fields) for k in unknown)
        raise ConfigError(
            f"unknown config key(s) {unknown}{hints}; valid keys are: {', '.join(sorted(fields))}"
        )


KEY_HINTS = {
    "recipe": "a recipe is a config: jtricks.train(jtricks.run.recipe('tricks', epochs=5))",
    "weight_decay": "weight decay belongs to the optimizer: optimizer='adamw(weight_decay=1e-4)' "
    "or the stage '... | weight_decay(1e-4)'",
}
"""Hints for keys that name no setting but something else that does the job."""


def _key_hint(key: str, fields: dict[str, dataclasses.Field]) -> str:
    """``"; "`` and what an unknown config ``key`` may have meant, or ``""``."""
    if key in KEY_HINTS:
        return f"; {KEY_HINTS[key]}"
    for name, f in fields.items():
        flags = (flag_of(f), *f.metadata.get("aliases", ()))
        if any(flag.lstrip("-").replace("-", "_") == key for flag in flags):
            value = "False" if flag_of(f).startswith("--no-") else "..."
            return f"; {key} is the flag {flag_of(f)}: give {name}={value}"
    close = did_you_mean(key, fields)
    return f"; {key}: {close[2:]}" if close else ""


def check_recordable(settings: dict[str, Any]) -> None:
    """Raise `ConfigError` for a setting JSON cannot hold, such as a Python function given
    as the optimizer: a run folder records its config as JSON, from which ``--resume``
    rebuilds the run."""
    for name, value in settings.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name}={value!r} cannot be recorded in the run folder's config.json, from "
                "which --resume rebuilds the run: name it by a spec string (a factory of your "
                "own by its import path, 'mymodule:make'), or train without out",
                param=name,
            ) from None
