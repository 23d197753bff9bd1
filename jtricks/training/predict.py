"""`predict`: a trained model's outputs on new inputs, batched, in evaluation mode.

``predict(state, x)[i] = f_theta(x_i)`` with ``f`` the model in evaluation mode (no dropout,
BatchNorm's running statistics) and ``theta = state.evaluation_state(params).params``: the
parameters that `evaluate` reads (schedule-free's ``x``, the EMA, or the training ones).

New here: Flax gives ``apply``, which a user calls on one array with the right collections
and ``train=False``; this runs it the way `evaluate` does (the evaluation parameters, the
running statistics), in batches of a fixed size inside one compiled `lax.map`, so a set
larger than one forward pass fits, and one program serves every batch (the last one
padded, its padding dropped) - the equivalent of Keras' ``Model.predict``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jtricks.caches import jitted
from jtricks.errors import ConfigError, check_int
from jtricks.tasks import Task, as_task
from jtricks.training.data_checks import as_arrays, input_outputs, num_examples, pad_batches
from jtricks.training.distributed import like_state
from jtricks.training.model import apply_model
from jtricks.training.state import TrainState, check_eval_source, first_member, is_ensemble


def predict(
    state: TrainState,
    inputs: Any,
    *,
    batch_size: int = 1000,
    params: str = "auto",
    task: Task | str | None = None,
) -> np.ndarray | Any:
    """The model's evaluation-mode outputs on ``inputs`` (what the model reads: an array or
    a pytree of arrays with a common leading axis N), as NumPy: ``(N, ...)`` (a
    classifier's logits: ``jax.nn.softmax`` of them are its probabilities), a pytree of
    them for a model that returns one. A stacked ensemble (`create_ensemble`) gives every
    member's, ``(M, N, ...)`` (`jtricks.training.ensemble.predict_proba` averages their
    probabilities). Run on ``state.evaluation_state(params)`` (``"auto"``, ``"train"`` or
    ``"ema"``, as `evaluate`) in batches of ``batch_size``. With a ``task``, its
    `Task.values` of the outputs: a regression learning standardized targets
    (`jtricks.tasks.Regression.standardized`) predicts in the targets' units.

    Raises:
      ConfigError: inputs the model cannot take (naming their per-example shapes), a
        ``batch_size`` below 1, or an evaluation source the state lacks.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    source = check_eval_source(params, first_member(state))
    inputs = as_arrays(inputs, "predict inputs")
    try:
        input_outputs(first_member(state), inputs, "predict inputs")
    except ConfigError as e:
        if isinstance(inputs, tuple | list):  # a batch (x, y) where the inputs x belong
            raise ConfigError(
                f"{e} (predict takes what the model reads, x, not a batch (x, y))"
            ) from None
        if _takes_one(first_member(state), inputs):
            raise ConfigError(f"{e} (one example? give it a leading axis: x[None])") from None
        raise
    n = num_examples(inputs)
    batches, _ = like_state(pad_batches(inputs, batch_size), state.params)
    out = _outputs(state, batches, source, is_ensemble(state))
    out = jax.tree.map(lambda a: _examples(np.asarray(a), n, is_ensemble(state)), out)
    return out if task is None else as_task(task).values(out)


def _takes_one(state: TrainState, inputs: Any) -> bool:
    """Whether the model takes ``inputs`` as one example (``inputs[None]``)."""
    try:
        input_outputs(state, jax.tree.map(lambda a: a[None], inputs), "predict inputs")
    except ConfigError:
        return False
    return True


def _examples(a: np.ndarray, n: int, stacked: bool) -> np.ndarray:
    """``([M,] B, batch, ...)`` -> ``([M,] n, ...)``: the batches joined, the padding cut."""
    if stacked:
        return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :n]
    return a.reshape(-1, *a.shape[2:])[:n]


@jitted(static_argnums=(2, 3))
def _outputs(state: TrainState, batches: Any, source: str, stacked: bool) -> Any:
    def one(s: TrainState) -> Any:
        s = s.evaluation_state(source)
        return jax.lax.map(lambda b: apply_model(s, s.params, b, train=False, key=None)[0], batches)

    return jax.vmap(one)(state) if stacked else one(state)
