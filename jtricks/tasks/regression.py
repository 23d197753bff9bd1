"""Regression: real-valued targets of any shape, mean squared error."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import optax

from jtricks.tasks.base import Task, array_of, at_least_f32, check_finite


@dataclasses.dataclass(frozen=True)
class Regression(Task):
    """Regression with the mean squared error.

    Outputs and targets share their per-example shape (targets ``(N,)`` also fit
    outputs ``(N, 1)``). With ``D`` target values per example, flattened:

    * loss (per example) ``(1/D) sum_d (p_d - t_d)^2``; metric ``mse``, its split mean;
    * ``mae``: ``(1/(N D)) sum_i sum_d |p_id - t_id|``;
    * ``r2``: ``(1/D) sum_d (1 - SSE_d / SST_d)`` with ``SSE_d = sum_i (t_id - p_id)^2`` and
      ``SST_d = sum_i (t_id - mean_d)^2 = sum_i t_id^2 - (sum_i t_id)^2 / N`` (scikit-learn's
      ``r2_score``, "uniform_average"). Accumulated as sums over the split in float32,
      of ``t_id - c_d`` around a ``center`` ``c`` (`centered`).

    With a ``scale`` ``(m, s)`` (`standardized`) the model learns standardized targets:
    its outputs ``o`` stand for ``p = o s + m`` (`values`), the loss is
    ``(1/D) sum_d (o_d - (t_d - m_d) / s_d)^2``, and ``mse``, ``mae`` and ``r2`` are the
    formulas above on ``p``, in the targets' units (scikit-learn's
    ``TransformedTargetRegressor`` with a ``StandardScaler``, here inside the loss).
    """

    name: ClassVar[str] = "regression"
    train_metrics: ClassVar[tuple[str, ...]] = ("mae",)
    center: tuple[float, ...] | None = None
    """Per-output values the ``r2`` sums are taken around (``None``: the ``scale``'s mean,
    or 0). ``SST_d`` is the same around any center, but float32 sums of ``t^2`` keep it
    only to about ``eps * sum_i t_id^2``: targets far from 0 against their spread
    (3000 +- 1) lost it all (``r2`` of -inf). `jtricks.fit` and `jtricks.evaluate` center
    on the targets' mean."""

    scale: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """Per-output ``(mean, std)`` of the targets, or ``None``: the model learns the targets
    ``(t - mean) / std`` (a start from zero outputs is then the targets' mean, and the
    learning rate acts alike on targets of any size: outputs near 3000 +- 1 are out of an
    Adam step's reach at 1e-2 without it)."""

    def standardized(self, targets: np.ndarray) -> Regression:
        """This task learning standardized targets: ``scale`` from the per-output mean and
        standard deviation of host ``targets`` ``(N, ...)`` (float64; a constant output
        keeps std 1)."""
        t = np.asarray(targets, np.float64).reshape(len(targets), -1)
        std = t.std(0)
        std = np.where(std > 0, std, 1.0)
        return dataclasses.replace(
            self, scale=(tuple(map(float, t.mean(0))), tuple(map(float, std)))
        )

    def values(self, outputs):
        """``outputs o s + m`` in the targets' units (``outputs`` itself without a
        ``scale``); any leading axes (``(N, ...)``, an ensemble's ``(M, N, ...)``)."""
        if self.scale is None:
            return outputs
        mean, std = (np.asarray(v, np.float32) for v in self.scale)
        shape = outputs.shape[_per_example_axes(outputs.shape, mean.size) :]
        return outputs * std.reshape(shape) + mean.reshape(shape)

    huber_delta: float | None = None
    """Train on the Huber loss of the residual ``r = o - t`` (of the standardized targets
    with a ``scale``), ``(1/D) sum_d h(r_d)`` with ``h(r) = r^2 / 2`` for ``|r| <= delta``,
    else ``delta (|r| - delta / 2)`` (`optax.huber_loss`): quadratic near the target,
    linear beyond, so outlying targets pull with a bounded gradient. Evaluation reports
    the mse as ``loss``. ``None``: the mse.

    References:
      Huber, "Robust estimation of a location parameter" (1964)."""

    def train_loss(self, outputs, batch):
        if self.huber_delta is None:
            return self.loss(outputs, batch)
        p, t = self._pair(outputs, batch)
        return jnp.mean(optax.huber_loss(p, self._standard(t)[0], delta=self.huber_delta), axis=-1)

    def _standard(self, t):
        """Targets ``t`` ``(N, D)`` in the model's units, with ``s`` (or ``None``)."""
        if self.scale is None:
            return t, None
        mean, std = (jnp.asarray(v, t.dtype) for v in self.scale)
        return (t - mean) / std, std

    def centered(self, targets: np.ndarray) -> Regression:
        """This task around the per-output mean of host ``targets`` ``(N, ...)`` (in
        float64), unless it has a center already."""
        if self.center is not None or len(targets) == 0:
            return self
        t = np.asarray(targets, np.float64).reshape(len(targets), -1)
        return dataclasses.replace(self, center=tuple(float(m) for m in t.mean(0)))

    def _pair(self, outputs, batch):
        p = at_least_f32(outputs.reshape(outputs.shape[0], -1))
        y = self.targets(batch)
        t = y.reshape(y.shape[0], -1).astype(p.dtype)
        if t.shape != p.shape:  # a one-line error, never JAX's broadcasting one
            raise ValueError(
                f"regression needs one target per model output: outputs of shape "
                f"{outputs.shape} take targets of {outputs.shape} (or {p.shape}); got targets "
                f"of shape {y.shape}"
            )
        return p, t

    def loss(self, outputs, batch):
        p, t = self._pair(outputs, batch)
        return jnp.mean(jnp.square(p - self._standard(t)[0]), axis=-1)

    def stats(self, outputs, batch):
        p, t = self._pair(outputs, batch)
        standard, std = self._standard(t)
        err = p - t if std is None else (p - standard) * std  # in the targets' units
        center = self.center if self.center is not None or std is None else self.scale[0]
        c = t if center is None else t - jnp.asarray(center, t.dtype)
        return {
            "sq_err": jnp.square(err),
            "abs_err": jnp.mean(jnp.abs(err), axis=-1),
            "t": c,
            "t2": jnp.square(c),
        }

    def finalize(self, sums):
        n = sums["count"]
        sst = sums["t2"] - jnp.square(sums["t"]) / n
        return {
            "mse": jnp.mean(sums["sq_err"]) / n,
            "mae": sums["abs_err"] / n,
            "r2": jnp.mean(1.0 - sums["sq_err"] / sst),
        }

    def check(self, batch, outputs, where):
        t = array_of(self.targets(batch))
        field = self.field_name(batch, "targets")
        per_example = tuple(outputs.shape[1:])
        if t.shape[1:] != per_example and not (per_example == (1,) and t.ndim == 1):
            raise self.error(
                where,
                field,
                f"targets must have the model's output shape {per_example} per example; "
                f"got {t.shape[1:]}",
            )
        if not np.issubdtype(t.dtype, np.number) or np.issubdtype(t.dtype, np.complexfloating):
            raise self.error(where, field, f"targets must be real numbers; got dtype {t.dtype}")
        check_finite(self, where, field, t)
        size = int(np.prod(per_example))
        if self.scale is not None and len(self.scale[0]) != size:
            raise self.error(
                where,
                field,
                f"the task's scale holds {len(self.scale[0])} means and stds; the model "
                f"gives {size} outputs per example (standardized() on targets of this shape)",
            )


def _per_example_axes(shape: tuple[int, ...], size: int) -> int:
    """Where the per-example axes of ``size`` values start in ``shape``: the fewest
    trailing axes whose product is ``size`` (none for one value per example)."""
    if size == 1:
        return len(shape)
    for start in range(len(shape) - 1, -1, -1):
        if int(np.prod(shape[start:])) == size:
            return start
    raise ValueError(f"outputs of shape {shape} do not end in {size} values per example")
