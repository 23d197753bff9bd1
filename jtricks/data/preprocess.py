"""Input scaling fitted on the training split only and seeded splits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jtricks.errors import ConfigError, check_int, check_range, unknown_name
from jtricks.spec import parse_spec


@dataclass(frozen=True)
class Scaler:
    """An affine map ``x -> (x - shift) * scale + offset`` whose statistics come from training data.

    Build it with `Scaler.fit` on the training split, then apply it to every split:
    the validation and test statistics are never looked at.

    * ``standardize``: ``(x - mean) / std`` -> mean 0, std 1 on the training split.
      A zero std (constant feature) is treated as 1.
    * ``minmax(low=0, high=1)``: ``low + (x - min) * (high - low) / (max - min)`` ->
      training values in ``[low, high]``; use ``minmax(-1, 1)`` for ``[-1, 1]``.
    * ``none``: identity.

    With ``per_feature=False`` (default) one scalar statistic covers all features;
    with ``per_feature=True`` each feature (all axes but the first) gets its own, as
    scikit-learn's ``StandardScaler`` and ``MinMaxScaler`` do (tabular features of
    different units); the spec may say so: ``"standardize(per_feature=True)"``.

    Example:
      >>> s = Scaler.fit("standardize", x_train)
      >>> x_train, x_test = s(x_train), s(x_test)
    """

    kind: str
    shift: np.ndarray
    scale: np.ndarray
    offset: float = 0.0

    KINDS = ("none", "standardize", "minmax")

    @classmethod
    def fit(cls, spec: str, x_train: np.ndarray, *, per_feature: bool = False) -> Scaler:
        """Fit the statistics of ``spec`` (``"standardize"``, ``"minmax(-1, 1)"``, ``"none"``)
        on ``x_train`` only."""
        name, args, kwargs = parse_spec(spec, what="preprocess")
        if name not in cls.KINDS:
            raise unknown_name("preprocessing", name, cls.KINDS, param="preprocess")
        per_feature = _per_feature(kwargs, per_feature)
        x = np.asarray(x_train, dtype=np.float64)
        axis = 0 if per_feature else None
        if name == "none":
            if args or kwargs:
                raise ConfigError(
                    f"preprocess 'none' takes no arguments; got {spec!r}", param="preprocess"
                )
            return cls("none", np.zeros(()), np.ones(()))
        if name == "standardize":
            if args or kwargs:
                raise ConfigError(
                    f"preprocess 'standardize' takes no arguments; got {spec!r}", param="preprocess"
                )
            mean, std = x.mean(axis=axis), x.std(axis=axis)
            return cls("standardize", mean, 1.0 / np.where(std > 0, std, 1.0))
        try:
            low, high = _minmax_args(*args, **kwargs)
        except TypeError as e:
            raise ConfigError(
                f"bad arguments for preprocess 'minmax': {e}; valid: low, high", param="preprocess"
            ) from None
        lo, hi = x.min(axis=axis), x.max(axis=axis)
        span = np.where(hi > lo, hi - lo, 1.0)
        return cls("minmax", lo, (high - low) / span, float(low))

    @classmethod
    def fit_chunks(cls, spec: str, chunks: Callable[[], Iterable[np.ndarray]]) -> Scaler:
        """`fit` (one scalar statistic, or one per feature where the spec says
        ``per_feature=True``) over training data too large for memory, given as
        ``chunks()``, an iterable of row blocks (called twice for ``standardize``: the
        mean, then the variance ``sum (x - mean)^2 / N`` around it, both in float64)."""
        name, _, kwargs = parse_spec(spec, what="preprocess")
        axis = 0 if _per_feature(dict(kwargs), False) else None
        first = next(iter(chunks()))
        base = cls.fit(spec, first[:1])  # checks the spec; "none" needs no data
        if name == "none":
            return base
        if name != "standardize":
            lo = np.min([np.min(c, axis=axis) for c in chunks()], axis=0)
            hi = np.max([np.max(c, axis=axis) for c in chunks()], axis=0)
            return cls.fit(spec, np.stack([lo, hi]))
        total, count = 0.0, 0
        for c in chunks():
            total, count = total + np.sum(c, axis=axis, dtype=np.float64), count + np.size(c)
        count = count // first[0].size if axis == 0 else count  # rows, or every value
        mean = total / count
        sq = sum(np.sum((np.asarray(c, np.float64) - mean) ** 2, axis=axis) for c in chunks())
        std = np.sqrt(sq / count)
        return cls("standardize", np.asarray(mean), 1.0 / np.where(std > 0, std, 1.0))

    def to_json(self) -> dict[str, Any]:
        """The fitted map as JSON (float64 statistics round-trip exactly), for a run folder."""
        return {
            "kind": self.kind,
            "shift": np.asarray(self.shift, np.float64).tolist(),
            "scale": np.asarray(self.scale, np.float64).tolist(),
            "offset": float(self.offset),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scaler:
        """The map `to_json` wrote."""
        as_array = lambda v: np.asarray(v, np.float64)  # noqa: E731
        return cls(d["kind"], as_array(d["shift"]), as_array(d["scale"]), float(d["offset"]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Apply the fitted map; keeps float32."""
        out = (np.asarray(x, np.float64) - self.shift) * self.scale + self.offset
        return out.astype(np.float32)


def _per_feature(kwargs: dict[str, Any], default: bool) -> bool:
    """A spec's ``per_feature=True`` (taken out of ``kwargs``), else ``default``."""
    value = kwargs.pop("per_feature", default)
    if not isinstance(value, bool):
        raise ConfigError(
            f"preprocess per_feature must be True or False; got {value!r}", param="preprocess"
        )
    return value


def _minmax_args(low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    if not (float(low) < float(high)):
        raise ConfigError(
            f"minmax needs low < high; got low={low!r}, high={high!r}", param="preprocess"
        )
    return float(low), float(high)


def train_val_split(
    x: np.ndarray,
    y: np.ndarray,
    val_fraction: float,
    *,
    seed: int,
    stratify: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off a validation set, reproducibly from ``seed``.

    Without stratification, ``round(val_fraction * N)`` examples chosen uniformly
    at random form the validation split. With ``stratify=True``, each class ``c``
    contributes ``round(val_fraction * N_c)`` examples, so class proportions match.
    Both splits keep at least one example.

    Returns:
      ``(x_train, y_train, x_val, y_val)``; within each split the original order is kept.

    Raises:
      ConfigError: if ``val_fraction`` is not in (0, 1) or a split would be empty.
    """
    check_range(
        "val_fraction", val_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    x, y = np.asarray(x), np.asarray(y)
    n = len(y)
    if len(x) != n:
        raise ConfigError(f"x and y must hold the same examples; got {len(x)} and {n}", param="y")
    if stratify and (y.ndim != 1 or y.dtype.kind not in "iub"):
        raise ConfigError(
            f"stratify=True keeps each class's share, so y must be class labels, integers of "
            f"shape (N,); got {y.dtype} of shape {y.shape}: give stratify=False",
            param="stratify",
        )
    rng = np.random.default_rng(seed)
    if stratify:
        val_idx = []
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            k = round(val_fraction * len(members))
            val_idx.append(rng.permutation(members)[:k])
        val_idx = np.concatenate(val_idx)
    else:
        val_idx = rng.permutation(n)[: round(val_fraction * n)]
    is_val = np.zeros(n, dtype=bool)
    is_val[val_idx] = True
    if is_val.all() or not is_val.any():
        raise ConfigError(
            f"val_fraction={val_fraction} leaves an empty split of {n} examples"
            + (
                " (stratified: each class gives round(val_fraction * its count))"
                if stratify
                else ""
            )
            + "; use a fraction that keeps at least one example on each side",
            param="val_fraction",
        )
    return x[~is_val], y[~is_val], x[is_val], y[is_val]


def select_classes(
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[int],
    *,
    per_class: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The examples of ``classes`` only, relabelled ``classes[i] -> i``; with ``per_class``,
    a seeded random ``per_class`` of each (for few-label transfer experiments).

    Raises:
      ConfigError: an empty or repeated class list, a class with no examples, or fewer
        than ``per_class`` examples in a class.
    """
    x, y = np.asarray(x), np.asarray(y)
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"classes must be distinct labels; got {classes}", param="classes")
    if per_class is not None:
        check_int("per_class", per_class, low=1)
    rng = np.random.default_rng(seed)
    keep = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if idx.size == 0:
            raise ConfigError(f"class {c} has no examples", param="classes")
        if per_class is not None:
            if idx.size < per_class:
                raise ConfigError(
                    f"per_class={per_class} but class {c} has only {idx.size} examples",
                    param="per_class",
                )
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        keep.append(idx)
    idx = np.sort(np.concatenate(keep))
    relabel = {c: i for i, c in enumerate(classes)}
    return x[idx], np.asarray([relabel[int(v)] for v in y[idx]], np.int32)
