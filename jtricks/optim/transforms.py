"""Gradient transformations that optax lacks or parameterises differently.

Each factory returns an `optax.GradientTransformation`; states are NamedTuples
named after the papers' symbols. Where optax has exactly the same rule, the
factory builds on optax's primitive and says so.

Sign convention: transforms before the learning-rate scale act on gradients
(``g``); the update finally applied is ``w <- w + u``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtricks.errors import ConfigError, check_range
from jtricks.optim.fused import masked_buffers, on_flat, per_leaf_buffers, squares

# ----------------------------------------------------------------------------- helpers


def _lr_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


def check_lr(learning_rate: optax.ScalarOrSchedule) -> None:
    """Validate a Python-number learning rate at construction (schedules and traced values pass)."""
    if isinstance(learning_rate, int | float) and not isinstance(learning_rate, bool):
        check_range("learning_rate", learning_rate, low=0.0, low_inclusive=False)


def weights_mask(params: Any) -> Any:
    """Default penalty mask: True for leaves with ``ndim >= 2`` (kernels), False for biases,
    norm scales and other vectors, which are usually not decayed."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


MaskSpec = Any  # None | "weights" | "all" | pytree of bools | Callable[[params], pytree of bools]


def resolve_mask(mask: MaskSpec) -> Any:
    """Turn a mask argument into something `optax.masked` takes (default: `weights_mask`)."""
    if mask is None or mask == "weights":
        return weights_mask
    if mask == "all":
        return lambda params: jax.tree.map(lambda _: True, params)
    if isinstance(mask, str):
        raise ConfigError(
            f"mask must be 'weights', 'all', a pytree of bools or a callable; got {mask!r}"
        )
    return mask


def masked(inner: optax.GradientTransformation, mask: MaskSpec) -> optax.GradientTransformation:
    """Apply ``inner`` only where ``mask`` is True; elsewhere the update passes unchanged.

    On parameter trees this is exactly `optax.masked` (with `resolve_mask`'s defaults).
    New here: it also works on the flat buffers of `jtricks.optim.fused`, where the mask
    is selected per buffer (`jtricks.optim.fused.masked_buffers`).
    """
    mask_fn = resolve_mask(mask)
    return on_flat(optax.masked(inner, mask_fn), masked_buffers(inner, mask_fn))


# ----------------------------------------------------------------------------- momentum

MOMENTUM_FORMS = ("classic", "lr_inside", "damped", "torch")


def scale_by_damped_momentum(
    beta: float, *, nesterov: bool = False
) -> optax.GradientTransformation:
    """Damped (EMA) momentum, texts' form (c): ``v <- beta v + (1 - beta) g``; output ``v``.

    Without Nesterov this is exactly ``optax.ema(beta, debias=False)``, which it returns.
    New here: ``nesterov=True``, whose output is ``beta v_new + (1 - beta) g`` (the same
    state). Follow with a learning-rate scale: ``w <- w - eta v``.
    """
    check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    ema = optax.ema(beta, debias=False)
    if not nesterov:
        return ema

    def update_fn(updates, state, params=None):
        v, state = ema.update(updates, state, params)
        return jax.tree.map(lambda v, g: beta * v + (1 - beta) * g, v, updates), state

    return optax.GradientTransformation(ema.init, update_fn)


def momentum_chain(
    learning_rate: optax.ScalarOrSchedule,
    gamma: float = 0.9,
    *,
    form: str = "classic",
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """Momentum SGD in one of four parameterisations (the textbooks' three and PyTorch's).

    * ``"classic"`` (a): ``v <- gamma v - eta g ; w <- w + v``. Built as
      ``chain(scale_by_learning_rate(eta), trace(gamma))``: the learning rate is
      *inside* the velocity, so a schedule change affects only new gradients.
    * ``"lr_inside"`` (b): ``v <- gamma v + eta g ; w <- w - v``. The same rule as (a)
      with ``v_b = -v_a``; kept to show the equivalence.
    * ``"damped"`` (c): ``v <- gamma v + (1 - gamma) g ; w <- w - eta v``. For a constant
      learning rate this equals (a) with ``eta * (1 - gamma)``.
    * ``"torch"``: PyTorch's ``SGD(momentum=gamma)``, ``v <- gamma v + g ; w <- w - eta v``
      (learning rate *outside*; equals (a) for a constant learning rate). This is `optax.sgd`.

    Nesterov (``nesterov=True``) uses the usual look-ahead reformulation
    (Sutskever et al. 2013): (a) ``w <- w + gamma v_new - eta g``; torch ``w <- w - eta (g + gamma v_new)``.

    References:
      Polyak (1964); Sutskever et al., "On the importance of initialization and momentum" (2013),
      https://proceedings.mlr.press/v28/sutskever13.html
    """
    if form not in MOMENTUM_FORMS:
        raise ConfigError(
            f"form must be one of {', '.join(MOMENTUM_FORMS)}; got {form!r}", param="form"
        )
    check_range("gamma", gamma, low=0.0, high=1.0, high_inclusive=False)
    check_lr(learning_rate)
    if form == "classic":
        return optax.chain(
            optax.scale_by_learning_rate(learning_rate), optax.trace(gamma, nesterov=nesterov)
        )
    if form == "lr_inside":
        return optax.chain(
            optax.scale_by_learning_rate(learning_rate, flip_sign=False),
            optax.trace(gamma, nesterov=nesterov),
            optax.scale(-1.0),
        )
    if form == "damped":
        return optax.chain(
            scale_by_damped_momentum(gamma, nesterov=nesterov),
            optax.scale_by_learning_rate(learning_rate),
        )
    return optax.chain(
        optax.trace(gamma, nesterov=nesterov), optax.scale_by_learning_rate(learning_rate)
    )


# ----------------------------------------------------------------------------- Adagrad


class AdagradState(NamedTuple):
    r: Any


def scale_by_adagrad(
    eps: float = 1e-7, *, eps_in_sqrt: bool = True, initial_accumulator: float = 0.0
) -> optax.GradientTransformation:
    """Adagrad scaling: ``r <- r + g^2``, output ``g / sqrt(r + eps)`` (texts' form, ``eps_in_sqrt=True``)
    or ``g / (sqrt(r) + eps)`` (PyTorch's form, ``eps_in_sqrt=False``, with ``eps=1e-10`` there).

    ``r`` starts at ``initial_accumulator`` (0 in the texts and PyTorch; `optax.adagrad`
    starts at 0.1). The texts' form is ``optax.scale_by_rss(initial_accumulator, eps)``,
    which it returns; new here is PyTorch's form, with eps outside the root.

    References:
      Duchi, Hazan & Singer, "Adaptive Subgradient Methods" (2011), https://jmlr.org/papers/v12/duchi11a.html
    """
    check_range("eps", eps, low=0.0)
    check_range("initial_accumulator", initial_accumulator, low=0.0)
    if eps_in_sqrt:
        return optax.scale_by_rss(initial_accumulator, eps)

    def init_fn(params):
        return AdagradState(r=jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator), params))

    def update_fn(updates, state, params=None):
        del params
        r = jax.tree.map(lambda r, g: r + g * g, state.r, updates)
        return jax.tree.map(lambda g, r: g / (jnp.sqrt(r) + eps), updates, r), AdagradState(r=r)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- normalised GD


def normalize_by_global_norm(eps: float = 0.0) -> optax.GradientTransformation:
    """Normalised gradient: ``g / (||g|| + eps)`` with ``||.||`` the global L2 norm over all leaves.

    A zero gradient stays zero. Followed by a learning-rate scale this is
    normalised gradient descent, ``w <- w - eta g / ||g||``: every step has length eta.
    """
    check_range("eps", eps, low=0.0)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        denom = norm + eps
        safe = jnp.where(denom > 0, denom, 1.0)
        return jax.tree.map(
            lambda g: jnp.where(denom > 0, g / safe.astype(g.dtype), jnp.zeros_like(g)), updates
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ----------------------------------------------------------------------------- clipping


def clip_by_value(max_delta: float) -> optax.GradientTransformation:
    """Clip every gradient entry to ``[-theta, theta]`` (`optax.clip`, validated)."""
    check_range("max_delta", max_delta, low=0.0, low_inclusive=False)
    return optax.clip(max_delta)


def clip_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Library form of norm clipping: if ``||g|| > theta`` then ``g <- g * theta / ||g||``
    (`optax.clip_by_global_norm`, validated)."""
    check_range("max_norm", max_norm, low=0.0, low_inclusive=False)
    return optax.clip_by_global_norm(max_norm)


def clip_global_norm_unit(max_norm: float) -> optax.GradientTransformation:
    """The texts' clipping rule: if ``||g|| > theta`` then ``g <- g / ||g||`` (unit norm), else unchanged.

    Note the discontinuity at ``||g|| = theta`` (for theta != 1). The common library
    form, `optax.clip_by_global_norm`, rescales to norm theta instead:
    ``g <- g * theta / ||g||``.
    """
    check_range("max_norm", max_norm, low=0.0, low_inclusive=False)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        clip = norm > max_norm
        safe = jnp.where(clip, norm, 1.0)
        return jax.tree.map(lambda g: jnp.where(clip, g / safe.astype(g.dtype), g), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_per_leaf_norm(max_norm: float) -> optax.GradientTransformation:
    """Per-layer clipping: each leaf ``g_l <- g_l * min(1, theta / ||g_l||)``, so every layer's
    gradient has norm at most theta (the global form lets one layer dominate)."""
    check_range("max_norm", max_norm, low=0.0, low_inclusive=False)

    def scale(norm):
        return jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)

    def clip(g):
        return (g * scale(jnp.sqrt(jnp.sum(squares(g)))).astype(g.dtype)).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(clip, updates), state

    tree_tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
    return on_flat(tree_tx, per_leaf_buffers(scale))


# ----------------------------------------------------------------------------- penalties


def _add_param_term(term: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("this penalty needs params: call update(grads, state, params)")
        return jax.tree.map(lambda g, p: g + term(p).astype(g.dtype), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def l2(lam: float, *, mask: MaskSpec = None) -> optax.GradientTransformation:
    """Coupled L2 (ridge) penalty ``lam * ||w||_2^2`` added to the loss: ``g <- g + 2 lam w``.

    Convention: the texts' ``+ lambda ||theta||^2`` (no 1/2). PyTorch's and optax's
    ``weight_decay=wd`` add ``wd * w``, i.e. ``l2(wd / 2)``. Built on
    `optax.add_decayed_weights`. Default mask: kernels only (`weights_mask`).
    """
    check_range("lam", lam, low=0.0)
    return masked(optax.add_decayed_weights(2.0 * lam), mask)


def l1(lam: float, *, mask: MaskSpec = None) -> optax.GradientTransformation:
    """L1 (LASSO) penalty ``lam * ||w||_1`` by subgradient: ``g <- g + lam sign(w)`` (``sign(0) = 0``).

    The subgradient form oscillates around 0 and rarely reaches exact zeros; use
    `l1_prox` (proximal soft-threshold) for exact sparsity.
    """
    check_range("lam", lam, low=0.0)
    return masked(_add_param_term(lambda p: lam * jnp.sign(p)), mask)


def elastic_net(
    lam: float, alpha: float = 0.5, *, mask: MaskSpec = None
) -> optax.GradientTransformation:
    """Elastic-net penalty ``lam [(1 - alpha) ||w||_1 + alpha ||w||_2^2]`` by subgradient:
    ``g <- g + lam [(1 - alpha) sign(w) + 2 alpha w]``. ``alpha = 1`` is `l2`, ``alpha = 0`` is `l1`.

    References:
      Zou & Hastie, "Regularization and variable selection via the elastic net" (2005)
    """
    check_range("lam", lam, low=0.0)
    check_range("alpha", alpha, low=0.0, high=1.0)
    return masked(
        _add_param_term(lambda p: lam * ((1 - alpha) * jnp.sign(p) + 2 * alpha * p)), mask
    )


class ScheduledState(NamedTuple):
    count: jax.Array


def decoupled_weight_decay(
    weight_decay: float, learning_rate: optax.ScalarOrSchedule, *, mask: MaskSpec = None
) -> optax.GradientTransformation:
    """Decoupled weight decay, applied to the *update* after the learning-rate scale:
    ``u <- u - eta_t * lam * w``, i.e. ``w <- w - eta_t (step + lam w)`` (AdamW).

    The decay never passes through the optimizer's preconditioner (unlike `l2`).
    Scaled by the learning rate as in PyTorch's and optax's AdamW.

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019), https://arxiv.org/abs/1711.05101
    """
    check_range("weight_decay", weight_decay, low=0.0)

    def decay(eta, updates, params):
        return jax.tree.map(
            lambda u, p: u - (eta * weight_decay * p).astype(u.dtype), updates, params
        )

    return masked(_with_rate("decoupled_weight_decay", learning_rate, decay), mask)


def l1_prox(
    lam: float, learning_rate: optax.ScalarOrSchedule, *, mask: MaskSpec = None
) -> optax.GradientTransformation:
    """Proximal L1: after the step, soft-threshold the new weights by ``eta_t * lam``:

    ``w' = w + u ; w_new = sign(w') * max(|w'| - eta_t lam, 0) ; u <- w_new - w``.

    This is the proximal-gradient (ISTA) step for ``lam ||w||_1``; it sets small
    weights to exactly 0 (feature selection).

    References:
      Beck & Teboulle, "A Fast Iterative Shrinkage-Thresholding Algorithm" (2009)
    """
    check_range("lam", lam, low=0.0)

    def shrink(eta, updates, params):
        thresh = eta * lam

        def prox(u, p):
            w = p + u
            w_new = jnp.sign(w) * jnp.maximum(jnp.abs(w) - thresh.astype(w.dtype), 0)
            return (w_new - p).astype(u.dtype)

        return jax.tree.map(prox, updates, params)

    return masked(_with_rate("l1_prox", learning_rate, shrink), mask)


def _with_rate(
    name: str, learning_rate: optax.ScalarOrSchedule, apply
) -> optax.GradientTransformation:
    """A transform of the updates that needs the parameters and the step's learning rate
    ``eta_t``: ``apply(eta_t, updates, params)``; its state counts the steps."""

    def init_fn(params):
        del params
        return ScheduledState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs params")
        out = apply(_lr_at(learning_rate, state.count), updates, params)
        return out, ScheduledState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- plateau scale


class PlateauScaleState(NamedTuple):
    plateau_scale: jax.Array


def scale_by_plateau() -> optax.GradientTransformation:
    """Multiply updates by ``plateau_scale`` (starts at 1), which a fit callback lowers when the
    validation metric stops improving (`jtricks.training.callbacks.ReduceLROnPlateau`) via
    ``optax.tree_utils.tree_set(opt_state, plateau_scale=...)``.

    Compared with `optax.contrib.reduce_on_plateau`, which watches the loss passed to each
    update and counts patience in updates, the decision here is taken on the host once per
    epoch, on any record entry (``val_loss``, ``val_accuracy``, ...), with Keras' or
    PyTorch's patience counting; the transform itself only holds and applies the scale."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.plateau_scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(
        lambda params: PlateauScaleState(jnp.ones([])),
        update_fn,  # float64 under x64
    )
