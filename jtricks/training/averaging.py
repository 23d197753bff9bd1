"""Weight averaging: stochastic weight averaging and BatchNorm re-estimation.

The exponential moving average (Polyak) lives in the `TrainState` itself
(``create_train_state(..., ema_decay=0.999)``; the train step updates it). This
module adds SWA, an equal-weight average of the parameters at the end of every
epoch from ``start_epoch`` on, and `recompute_batch_stats`, which re-estimates
BatchNorm statistics for averaged weights with one pass over the training data
(the running statistics collected during training belong to other weights).

What is new relative to optax / flax: optax averages *updates* (`optax.ema`) and
flax has no BatchNorm re-estimation; `recompute_batch_stats` works for any Flax
model without knowing its BatchNorm momentum (it is measured, see below).

References:
  Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization" (2018),
  https://arxiv.org/abs/1803.05407
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.caches import jitted
from jtricks.errors import ConfigError, check_int
from jtricks.optim.eval_params import declaring_nodes
from jtricks.training.state import TrainState, device_copy, first_member, is_ensemble


def recompute_batch_stats(
    state: TrainState, x: Any, *, batch_size: int = 500, key: jax.Array | None = None
) -> Any:
    """BatchNorm statistics of ``state.params`` re-estimated on ``x``: the equal-weight
    mean, over the ``N // batch_size`` full batches (one batch if ``N < batch_size``), of
    each batch's mean and (biased) variance. PyTorch's ``update_bn`` computes the same.

    Flax's BatchNorm updates ``r <- m r + (1 - m) b`` for a batch statistic ``b`` with an
    unknown momentum ``m``. Starting every batch from ``r = 0`` gives ``(1 - m) b``; one
    extra pass from ``r = 1`` gives ``m + (1 - m) b``, so ``m`` and then ``b`` follow
    exactly, whatever the momentum. The model runs in training mode (dropout on, with
    ``key``, as PyTorch does).

    Stacked states (an ensemble, `is_ensemble`) get every member's statistics, each
    measured on the same batches.

    Returns:
      A new ``batch_stats`` collection (the state's own if it has none).
    """
    if not state.batch_stats:
        return state.batch_stats
    x = jnp.asarray(x)
    batch_size = min(check_int("batch_size", batch_size, low=1), x.shape[0])
    nb = x.shape[0] // batch_size
    xb = x[: nb * batch_size].reshape(nb, batch_size, *x.shape[1:])
    key = jax.random.key(0) if key is None else key

    def one(params, batch_stats, xb):
        def stats(init, xi, k):
            _, upd = state.apply_fn(
                {"params": params, "batch_stats": init},
                xi,
                train=True,
                rngs={"dropout": k},
                mutable=["batch_stats"],
            )
            return upd["batch_stats"]

        zeros, ones = _filled(batch_stats, 0.0), _filled(batch_stats, 1.0)
        from_zero = stats(zeros, xb[0], key)
        momentum = _on_stats(jnp.subtract, stats(ones, xb[0], key), from_zero)

        def body(total, i):
            s = stats(zeros, xb[i], jax.random.fold_in(key, i))
            return _on_stats(jnp.add, total, s), None

        total, _ = jax.lax.scan(body, zeros, jnp.arange(nb))
        mean = _on_stats(lambda t, m: t / nb / (1.0 - m), total, momentum)
        return _on_stats(lambda new, old: new, mean, batch_stats)

    run = jax.vmap(one, in_axes=(0, 0, None)) if is_ensemble(state) else one
    return jax.jit(run)(state.params, state.batch_stats, xb)


def _is_stat(a: Any) -> bool:
    """A statistic (floating point) rather than another variable an NNX model keeps with
    them (its RNG streams' keys and counts), which recomputing leaves as it was."""
    return jnp.issubdtype(a.dtype, jnp.floating)


def _filled(tree: Any, value: float) -> Any:
    return jax.tree.map(lambda a: jnp.full_like(a, value) if _is_stat(a) else a, tree)


def _on_stats(fn: Any, a: Any, b: Any) -> Any:
    """``fn`` on the statistics of ``a`` and ``b``; ``b``'s other variables."""
    return jax.tree.map(lambda u, v: fn(u, v) if _is_stat(v) else v, a, b)


class SWA:
    """`fit` callback: stochastic weight averaging.

    From epoch ``start_epoch`` (1-based) on, the parameters at the end of every epoch are
    averaged with equal weights, ``avg <- avg + (params - avg) / (n + 1)``. At the end of
    training the state's parameters are replaced by the average and, when the model has
    BatchNorm, its statistics are re-estimated on ``train_x`` (`recompute_batch_stats`).
    The optimizer state is left as it was. ``self.count`` is the number of averaged epochs.
    An optimizer that evaluates on parameters of its own (schedule-free's ``x``,
    Lookahead's slow weights: `jtricks.optim.eval_params`) is refused at the first
    averaged epoch: evaluation would read those, not the average.

    A run resumes exactly with SWA: `state_dict` (the count) goes into a checkpoint's
    metadata and `arrays` (the average) beside its state (`Checkpointer`'s ``meta_fn`` and
    ``arrays_fn``); `load_state_dict` takes both back. New relative to PyTorch's
    ``AveragedModel``, whose average a resume must save and load by hand.
    """

    takes_copy = True  # reads the state: fit runs the next epoch meanwhile (`Callback`)

    def __init__(self, start_epoch: int, train_x: Any = None, *, batch_size: int = 500) -> None:
        self.start_epoch = check_int("start_epoch", start_epoch, low=1)
        self.train_x = None if train_x is None else np.asarray(train_x)
        self.batch_size = batch_size
        self.count = 0
        self.average: Any = None

    def on_epoch_end(self, record: dict[str, Any], state: TrainState) -> None:
        if record["epoch"] < self.start_epoch:
            return None
        if self.average is None:
            self.check(state)
            self.average = device_copy(state.params)  # the state may be donated next
        else:
            self.average = _running_mean(self.average, state.params, jnp.float32(self.count))
        self.count += 1
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def arrays(self) -> dict[str, Any]:
        """The average as a checkpoint's named arrays (none before the first epoch averaged)."""
        return {} if self.average is None else {"swa": self.average}

    def load_state_dict(self, d: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
        """Continue from a checkpoint's `state_dict` and `arrays`; a count without its
        average is a `ConfigError` (the checkpoint was not written with ``arrays_fn``)."""
        count = int(d["count"])
        average = (arrays or {}).get("swa")
        if count and average is None:
            raise ConfigError(
                f"the checkpoint says {count} epoch(s) were averaged but holds no SWA average; "
                "write checkpoints with Checkpointer(arrays_fn=swa.arrays) to resume SWA",
                param="resume",
            )
        self.count, self.average = count, average if count else None

    @staticmethod
    def check(state: TrainState) -> None:
        """Refuse (`ConfigError`) a state whose optimizer declares evaluation parameters;
        a state of `jax.ShapeDtypeStruct` s will do (`jax.eval_shape`)."""
        nodes = declaring_nodes(first_member(state).opt_state)
        if nodes:
            raise ConfigError(
                f"swa averages the training parameters, but the optimizer evaluates on its "
                f"own ({type(nodes[0]).__name__}), so the average would never be evaluated: "
                "drop swa or use an optimizer without evaluation parameters",
                param="swa",
            )

    def on_train_end(self, state: TrainState) -> TrainState:
        if self.average is None:
            return state
        state = state.replace(params=self.average)
        if state.batch_stats and self.train_x is not None:
            state = state.replace(
                batch_stats=recompute_batch_stats(state, self.train_x, batch_size=self.batch_size)
            )
        return state


@jitted
def _running_mean(avg: Any, new: Any, n: jax.Array) -> Any:
    return jax.tree.map(lambda a, p: a + (p - a) / (n + 1), avg, new)
