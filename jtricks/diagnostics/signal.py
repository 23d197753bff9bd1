"""`signal_propagation` and `track_signal`: per-layer activation and gradient statistics,
with flags for vanishing and exploding signals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jtricks.diagnostics.common import diagnostic_batch, group_by_layer, text_table
from jtricks.errors import check_int, check_range
from jtricks.plotting import save_figure, subplots
from jtricks.tasks import Task
from jtricks.training.gradients import objective
from jtricks.training.model import NNXApply
from jtricks.training.state import TrainState
from jtricks.training.steps import LossFn
from jtricks.training.transfer import forward_layers
from jtricks.trees import named_leaves


def signal_propagation(
    state: TrainState,
    x: Any,
    y: Any = None,
    *,
    threshold: float = 1e3,
    task: Task | str | None = None,
    loss_fn: LossFn | None = None,
) -> SignalReport:
    """Activation mean / std and parameter-gradient norm of every layer, on one batch.

    Activations are each layer's output (``capture_intermediates``, forward order) in
    training mode with the state's dropout key; BatchNorm uses batch statistics (as in
    training) and its running averages are not changed. Flags:

    * ``vanishing gradients``: first layer's gradient norm / last layer's < ``1 / threshold``;
    * ``exploding gradients``: that ratio > ``threshold``, or a non-finite gradient;
    * ``exploding activations`` / ``vanishing activations``: last layer's output std /
      first layer's beyond ``threshold`` either way, or non-finite activations.

    A head at zero (all its parameters exactly 0: ``zero_head=True`` at initialisation)
    outputs 0 and passes no gradient below it: the gradient ratio is then NaN and the
    output ratio is over the layers below it. An NNX model's outputs are captured with
    `flax.nnx.capture` and its layers ordered by the forward pass's first reads of their
    parameters (`jtricks.training.transfer.first_reads`).

    ``threshold`` is 1e3 by default (three orders of magnitude across the depth). The
    batch is ``(x, y)`` (or ``x`` any batch pytree with ``y=None``), the loss ``task``'s
    or ``loss_fn``'s as in `fit` (neither: classification).
    References: Glorot & Bengio (2010); He et al., "Delving Deep into Rectifiers" (2015).
    """
    check_range("threshold", threshold, low=1.0, low_inclusive=False)
    task, batch = diagnostic_batch(x, y, task, loss_fn)
    x = task.inputs(batch)
    rngs = {"dropout": jax.random.fold_in(state.key, state.step)} if state.key is not None else None

    def loss(params):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        if isinstance(state.apply_fn, NNXApply):  # dropout from the module's own streams
            outputs, acts = state.apply_fn.layer_outputs(variables, x, train=True)
            return objective(task, outputs, batch, None), acts
        mutable = ["intermediates", *(["batch_stats"] if state.batch_stats else [])]
        outputs, coll = state.apply_fn(
            variables, x, train=True, rngs=rngs, mutable=mutable, capture_intermediates=True
        )
        flat = traverse_util.flatten_dict(coll["intermediates"])  # {(*path, "__call__"): (out,)}
        acts = {"/".join(p[:-1]): v[0] for p, v in flat.items() if p[-1] == "__call__"}
        return objective(task, outputs, batch, None), acts

    grads, acts = jax.jit(jax.grad(loss, has_aux=True))(state.params)
    layers = group_by_layer(state.params, forward_layers(state, x))
    acts = jax.device_get(acts)
    flat_grads = named_leaves(jax.device_get(grads))
    rows = []
    for layer, paths in layers.items():
        act = np.asarray(acts[layer], np.float64) if layer in acts else None
        gnorm = math.sqrt(
            sum(float(np.sum(np.square(flat_grads[p], dtype=np.float64))) for p in paths)
        )
        rows.append(
            {
                "layer": layer,
                "act_mean": float(act.mean()) if act is not None else float("nan"),
                "act_std": float(act.std()) if act is not None else float("nan"),
                "grad_norm": gnorm,
            }
        )
    flat_params = named_leaves(jax.device_get(state.params))
    zero_head = not any(np.any(flat_params[p]) for p in layers[rows[-1]["layer"]])
    grad_ratio, act_ratio = _ratios(rows, zero_head=zero_head and len(rows) > 1)
    flags = signal_flags(rows, grad_ratio, act_ratio, threshold)
    return SignalReport(int(state.step), rows, grad_ratio, act_ratio, flags, zero_head)


def _ratios(rows: list[dict[str, Any]], *, zero_head: bool) -> tuple[float, float]:
    """``(first/last gradient norm, last/first output std)`` over ``rows``; the output stds
    of the layers that give one. Without the zero head's row, whose outputs are 0 and
    below which no gradient flows; the gradient ratio is then NaN."""
    body = rows[:-1] if zero_head else rows
    first, last = body[0], body[-1]
    grad_ratio = first["grad_norm"] / last["grad_norm"] if last["grad_norm"] > 0 else math.inf
    acts = [r["act_std"] for r in body if not math.isnan(r["act_std"])]
    act_ratio = (acts[-1] / acts[0] if acts[0] > 0 else math.inf) if acts else math.nan
    return (math.nan if zero_head else grad_ratio), act_ratio


@dataclass
class SignalReport:
    """Per-layer statistics of one forward and backward pass (`signal_propagation`).

    ``rows``: per layer, in forward order: ``layer``, ``act_mean``, ``act_std`` (of the
    layer's output), ``grad_norm`` (L2 norm of the gradient of its parameters).
    ``grad_ratio`` = first layer's gradient norm / last layer's; ``act_ratio`` = last
    layer's output std / first layer's (of the layers whose ``__call__`` gave an output:
    a head that reuses an embedding's ``attend`` has none). ``flags`` names what is wrong
    (empty: healthy). ``zero_head``: the last layer's parameters are all 0 (both ratios
    then leave it out, see `signal_propagation`).
    """

    step: int
    rows: list[dict[str, Any]]
    grad_ratio: float
    act_ratio: float
    flags: list[str] = field(default_factory=list)
    zero_head: bool = False

    @property
    def passed(self) -> bool:
        return not self.flags

    def table(self) -> str:
        return text_table(
            ["layer", "act mean", "act std", "grad norm"],
            [
                (
                    r["layer"],
                    f"{r['act_mean']:+.3e}",
                    f"{r['act_std']:.3e}",
                    f"{r['grad_norm']:.3e}",
                )
                for r in self.rows
            ],
        )


def signal_flags(
    rows: list[dict[str, Any]], grad_ratio: float, act_ratio: float, threshold: float
) -> list[str]:
    """The flags of `signal_propagation` from its rows and first/last ratios."""
    flags = []
    if not all(math.isfinite(r["grad_norm"]) for r in rows):
        flags.append("exploding gradients (non-finite)")
    elif grad_ratio < 1 / threshold:
        flags.append(f"vanishing gradients (first/last layer gradient norm {grad_ratio:.1e})")
    elif grad_ratio > threshold:
        flags.append(f"exploding gradients (first/last layer gradient norm {grad_ratio:.1e})")
    if not all(math.isfinite(r["act_std"]) for r in rows if not math.isnan(r["act_std"])):
        flags.append("exploding activations (non-finite)")
    elif act_ratio > threshold:
        flags.append(f"exploding activations (last/first layer output std {act_ratio:.1e})")
    elif act_ratio < 1 / threshold:
        flags.append(f"vanishing activations (last/first layer output std {act_ratio:.1e})")
    return flags


def track_signal(
    state: TrainState,
    train_data: Any,
    *,
    at_steps: Sequence[int],
    batch_size: int,
    probe_size: int = 256,
    data_key: jax.Array | None = None,
    **fit_kwargs: Any,
) -> tuple[TrainState, list[SignalReport]]:
    """Train with `jtricks.training.fit` and take a `signal_propagation` report at each of
    ``at_steps`` (0 = at initialisation), on the first ``probe_size`` training examples
    (``train_data`` is any batch pytree; ``task`` or ``loss_fn`` in ``fit_kwargs`` is
    also the probe's loss).

    Training is split into `fit` calls at the requested steps; split calls continue
    exactly, so the run is the same as one uninterrupted call.
    """
    from jtricks.training.fit import fit

    at = sorted({check_int("at_steps", int(s), low=0) for s in at_steps})
    probe = jax.tree.map(lambda a: a[:probe_size], train_data)
    loss = {k: fit_kwargs[k] for k in ("task", "loss_fn") if k in fit_kwargs}
    if data_key is None:
        data_key = jax.random.fold_in(state.key, 1)
    reports = []
    for target in at:
        if target > int(state.step):
            state, _ = fit(
                state,
                train_data,
                batch_size=batch_size,
                steps=target - int(state.step),
                data_key=data_key,
                **fit_kwargs,
            )
        reports.append(signal_propagation(state, probe, **loss))
    return state, reports


def plot_signal(reports: list[SignalReport], path: Any) -> None:

    fig, (ax_a, ax_g) = subplots(1, 2, figsize=(11, 4))
    for rep in reports:
        layers = [r["layer"] for r in rep.rows]
        ax_a.plot(
            range(len(layers)),
            [r["act_std"] for r in rep.rows],
            marker=".",
            label=f"step {rep.step}",
        )
        ax_g.plot(
            range(len(layers)),
            [r["grad_norm"] for r in rep.rows],
            marker=".",
            label=f"step {rep.step}",
        )
    for ax, title in ((ax_a, "activation std"), (ax_g, "gradient norm")):
        ax.set(yscale="log", xlabel="layer (forward order)", title=title)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    save_figure(fig, path, axes=(ax_a, ax_g))
