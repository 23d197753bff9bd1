"""Long-tailed and noisy-label versions of a classification dataset (trick T29).

`degrade` holds out a clean, class-balanced validation split first, then makes the rest
of the training split long-tailed (`long_tail_counts`) and flips a fraction of its
labels; the test split is left as it is. So a run trains on imbalanced or noisy labels
but selects and reports on balanced, clean ones, the protocol of the long-tailed
benchmarks. The dataset specs ``mnist1d``, ``digits`` and ``synthetic`` take
``imbalance=R`` and ``label_noise=p`` (``jtricks train --dataset 'mnist1d(imbalance=100)'``).

References:
  Cui et al., "Class-Balanced Loss Based on Effective Number of Samples" (2019),
  https://arxiv.org/abs/1901.05555 (the exponential profile of CIFAR-LT)
  Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss"
  (2019), https://arxiv.org/abs/1906.07413
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.errors import ConfigError, check_range

VAL_FRACTION = 0.1
"""The share of each class's training examples held out as the balanced validation split
(of the smallest class's count, for every class alike)."""


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """Examples kept per class under the exponential profile
    ``n_c = floor(n_max * R^(-c / (C - 1)))`` (at least 1): class 0 keeps ``n_max``,
    the last ``n_max / R``, so the largest class is ``R`` times the smallest."""
    c = np.arange(num_classes)
    counts = np.floor(n_max * float(imbalance) ** (-c / max(num_classes - 1, 1)) + 1e-9)
    return np.maximum(counts, 1).astype(np.int64)


def degrade(data: Dataset, *, imbalance: float = 1.0, label_noise: float = 0.0, seed: int = 0):
    """``data`` with a long-tailed and/or noisy training split and a clean balanced
    validation split (`Dataset.val`); unchanged when ``imbalance == 1`` and
    ``label_noise == 0``.

    Each class gives ``round(VAL_FRACTION * m)`` examples to validation (``m``: the
    smallest class's training count). Then class ``c`` keeps the first
    `long_tail_counts` ``(m', C, R)[c]`` of its remaining examples in a seeded order
    (``m'``: the smallest remaining count), and ``round(p * n)`` of the ``n`` kept
    examples, chosen at random, get a label drawn uniformly from the *other* ``C - 1``
    classes (so exactly a fraction ``p`` is wrong; symmetric noise).

    Raises:
      ConfigError: ``imbalance < 1``, ``label_noise`` outside [0, 1), or a dataset that
      is not single-label classification.
    """
    check_range("imbalance", imbalance, low=1.0)
    check_range("label_noise", label_noise, low=0.0, high=1.0, high_inclusive=False)
    if imbalance == 1 and label_noise == 0:
        return data
    if data.task != "classification" or data.y_train.ndim != 1:
        raise ConfigError(
            f"imbalance and label_noise apply to single-label classification; {data.name} "
            f"is a {data.task} dataset",
            param="dataset",
        )
    rng = np.random.default_rng([seed, 7])
    x, y, val = _balanced_validation(data, seed)
    keep = _long_tail_rows(y, data.num_classes, imbalance, rng)
    x, y = x[keep], _flip(y[keep], data.num_classes, label_noise, rng)
    name = f"{data.name}(imbalance={imbalance}, label_noise={label_noise})"
    return dataclasses.replace(data, name=name, x_train=x, y_train=y, val=val)


def _balanced_validation(data: Dataset, seed: int):
    """The training split less a validation split with the same count of every class."""
    counts = np.bincount(data.y_train, minlength=data.num_classes)
    per_class = max(1, round(VAL_FRACTION * counts.min()))
    if counts.min() <= per_class:
        raise ConfigError(
            f"{data.name}: a class has {counts.min()} training example(s), too few to hold "
            "out a balanced validation split and keep some for training",
            param="dataset",
        )
    rng = np.random.default_rng([seed, 11])
    val = np.concatenate(
        [rng.permutation(np.flatnonzero(data.y_train == c))[:per_class] for c in range(len(counts))]
    )
    val = np.sort(val)
    rest = np.setdiff1d(np.arange(len(data.y_train)), val)
    return data.x_train[rest], data.y_train[rest], (data.x_train[val], data.y_train[val])


def _long_tail_rows(y: np.ndarray, num_classes: int, imbalance: float, rng) -> np.ndarray:
    """Row indices (sorted) keeping `long_tail_counts` examples of each class."""
    counts = np.bincount(y, minlength=num_classes)
    quota = long_tail_counts(int(counts.min()), num_classes, imbalance)
    rows = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in enumerate(quota)]
    return np.sort(np.concatenate(rows))


def _flip(y: np.ndarray, num_classes: int, fraction: float, rng) -> np.ndarray:
    """``y`` with ``round(fraction * n)`` random labels moved to another class."""
    flip = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    shift = rng.integers(1, num_classes, size=len(flip))  # never 0: always another class
    y = y.copy()
    y[flip] = (y[flip] + shift) % num_classes
    return y


def class_counts(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """``n_c`` of every class of integer ``labels`` (one per example); a class with no
    example is a `ConfigError` naming ``what`` and the missing classes."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"{what} counts class labels: it needs integer labels (N,); got {labels.dtype} "
            f"{labels.shape}",
            param=what,
        )
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ConfigError(
            f"{what}: class(es) {missing.tolist()[:10]} of {num_classes} have no training "
            "example; give the weights explicitly",
            param=what,
        )
    return counts


def class_weights(spec: Any, labels: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Per-class loss weights ``(C,)`` from ``spec``: ``"balanced"`` (scikit-learn's
    ``n / (C * n_c)`` from the training ``labels``, so a balanced set weighs 1 each), a
    mapping ``{class: weight}`` (the others 1) or a sequence of ``C`` weights.

    Raises:
      ConfigError (``param="class_weight"``): another spec, a class outside ``[0, C)``, a
      negative or non-finite weight, all zero, or (balanced) a class with no example.
    """
    what = "class_weight"
    if isinstance(spec, str):
        if spec != "balanced":
            raise ConfigError(
                f"class_weight must be 'balanced', {{class: weight}} or one weight per class; "
                f"got {spec!r}",
                param=what,
            )
        counts = class_counts(labels, num_classes, what)
        return (counts.sum() / (num_classes * counts)).astype(np.float32)
    if isinstance(spec, dict):
        bad = [k for k in spec if isinstance(k, bool) or not isinstance(k, int | np.integer)]
        bad += [k for k in spec if k not in bad and not 0 <= k < num_classes]
        if bad:
            raise ConfigError(
                f"class_weight keys must be classes 0..{num_classes - 1}; got {bad[:5]}",
                param=what,
            )
        weights = np.ones(num_classes, np.float64)
        weights[list(spec)] = list(spec.values())
    else:
        weights = np.asarray(spec, np.float64)
        if weights.shape != (num_classes,):
            raise ConfigError(
                f"class_weight needs one weight per class ({num_classes}); got shape "
                f"{weights.shape}",
                param=what,
            )
    if not np.isfinite(weights).all() or (weights < 0).any() or not weights.any():
        raise ConfigError(
            f"class weights must be finite, >= 0 and not all 0; got {weights.tolist()[:10]}",
            param=what,
        )
    return weights.astype(np.float32)


def logit_adjustment(labels: np.ndarray, num_classes: int, tau: float = 1.0) -> np.ndarray:
    """The offsets ``tau * log(pi_c)`` ``(C,)`` that the logit-adjusted loss adds to the
    logits in training, ``pi_c = n_c / n`` the training labels' class frequencies
    (`jtricks.tasks.Classification`'s ``logit_adjust``). Trained that way, the plain
    ``argmax f(x)`` at test time estimates the balanced-error Bayes classifier.

    References:
      Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021),
      https://arxiv.org/abs/2007.07314
    """
    check_range("logit_adjust", tau, low=0.0)
    counts = class_counts(labels, num_classes, "logit_adjust")
    return (tau * np.log(counts / counts.sum())).astype(np.float32)


def one_balancing(class_weight: Any, sampler: str | None, logit_adjust: Any = None) -> None:
    """Refuse two corrections of one imbalance. ``class_weight="balanced"`` with
    ``sampler="balanced"``: the sampler draws every class equally often, the weights
    ``n / (C n_c)`` scale each class's loss by the inverse of its share, so together a rare
    class counts ``(n / (C n_c))^2`` times as much as under either one. A ``logit_adjust``
    with either: the offsets ``tau log pi_c`` correct for the training labels' frequencies
    ``pi_c``, which the weights or the sampler have already evened out, so the model's
    argmax favours rare classes past balance (Menon et al. 2021 adjust plain
    cross-entropy on the imbalanced data).

    ``logit_adjust``: the temperature ``tau``, or a task's offsets (one per class).

    Raises:
      ConfigError: two of them given as the balancing kind.
    """
    if class_weight == "balanced" and sampler == "balanced":
        raise ConfigError(
            "class_weight='balanced' and sampler='balanced' both undo the class imbalance: "
            "together a class of n_c examples weighs (n / (C n_c))^2; give one of them "
            "(or weights of your own with the sampler)",
            param="class_weight",
        )
    kinds = (("class_weight", class_weight), ("sampler", sampler))
    balanced = [f"{name}='balanced'" for name, value in kinds if value == "balanced"]
    if logit_adjust and balanced:
        given = f"logit_adjust={logit_adjust!r}"
        if isinstance(logit_adjust, tuple | list):  # a task's offsets, one per class
            given = "the task's logit_adjust offsets"
        raise ConfigError(
            f"{given} and {balanced[0]} both undo the class imbalance: "
            "the adjustment corrects for the training labels' frequencies, which "
            f"{balanced[0]} has already evened out, so rare classes would be favoured past "
            "balance; give one of them",
            param="logit_adjust",
        )
