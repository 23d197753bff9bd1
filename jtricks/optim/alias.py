"""Named optimizers: each is an `optax.chain` of building blocks ending in a learning-rate
scale. ``learning_rate`` may be a float or an optax schedule ``step -> lr``.

A rate given as a Python number or a schedule is injected into the optimizer state
(`optax.inject_hyperparams`, via `jtricks.optim.sweep.sweepable`): the state then says what
rate it runs at (`jtricks.optim.current_learning_rate`, the ``lr`` that `fit` logs),
`set_learning_rate` changes it, and optimizers that differ only in the rate are equal, so
a sweep compiles once. The update is the chain's own arithmetic, bit for bit.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import optax

from jtricks.errors import ConfigError, check_range
from jtricks.optim.sweep import sweepable
from jtricks.optim.transforms import (
    MaskSpec,
    check_lr,
    decoupled_weight_decay,
    momentum_chain,
    normalize_by_global_norm,
    scale_by_adagrad,
)

ScalarOrSchedule = optax.ScalarOrSchedule


def rate_in_state(
    factory: Callable[..., optax.GradientTransformation],
) -> Callable[..., optax.GradientTransformation]:
    """``factory`` whose numeric ``learning_rate`` lives in the optimizer state (see the
    module docstring); a schedule is injected too (its value at each step in the state),
    an array rate (inside `build_optimizer`'s own injection) gives the plain chain."""
    signature = inspect.signature(factory)
    injected = sweepable(factory)

    @functools.wraps(factory)
    def make(*args, **kwargs) -> optax.GradientTransformation:
        tx = factory(*args, **kwargs)  # validates every argument now
        rate = signature.bind(*args, **kwargs).arguments.get("learning_rate", 1.0)
        if callable(rate) or (isinstance(rate, int | float) and not isinstance(rate, bool)):
            return injected(*args, **kwargs)
        return tx  # an array: already inside an injecting transformation

    return make


@rate_in_state
def sgd(
    learning_rate: ScalarOrSchedule, momentum: float | None = None, nesterov: bool = False
) -> optax.GradientTransformation:
    """Mini-batch SGD: ``w <- w - eta g``; `optax.sgd`'s arguments.

    With ``momentum=mu``: ``v <- mu v + g ; w <- w - eta v`` (``nesterov=True``:
    ``w <- w - eta (g + mu v)``), the learning rate outside the velocity as in
    `optax.sgd` and PyTorch's ``SGD(momentum=mu)`` (`momentum` with ``form="torch"``;
    its other forms put the rate inside).
    """
    check_lr(learning_rate)
    if momentum is None:
        if nesterov:
            raise ConfigError(
                "nesterov=True looks ahead along the momentum; give momentum too "
                "(e.g. sgd(lr, momentum=0.9, nesterov=True))",
                param="nesterov",
            )
        return optax.chain(optax.scale_by_learning_rate(learning_rate))
    check_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    return momentum_chain(learning_rate, momentum, form="torch", nesterov=nesterov)


@rate_in_state
def momentum(
    learning_rate: ScalarOrSchedule,
    gamma: float = 0.9,
    *,
    form: str = "classic",
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """Momentum SGD, ``form`` in ``"classic"`` (a), ``"lr_inside"`` (b), ``"damped"`` (c) or
    ``"torch"``; see `jtricks.optim.transforms.momentum_chain` for the four update rules.

    Example:
      >>> tx = momentum(0.1, 0.9, form="damped")   # v <- 0.9 v + 0.1 g ; w <- w - 0.1 v
    """
    return momentum_chain(learning_rate, gamma, form=form, nesterov=nesterov)


@rate_in_state
def adagrad(
    learning_rate: ScalarOrSchedule,
    eps: float = 1e-7,
    *,
    eps_in_sqrt: bool = True,
    initial_accumulator: float = 0.0,
) -> optax.GradientTransformation:
    """Adagrad: ``r <- r + g^2 ; w <- w - eta g / sqrt(r + eps)`` (texts' form).

    ``eps_in_sqrt=False`` gives PyTorch's ``g / (sqrt(r) + eps)``. See `scale_by_adagrad`.
    """
    check_lr(learning_rate)
    return optax.chain(
        scale_by_adagrad(eps, eps_in_sqrt=eps_in_sqrt, initial_accumulator=initial_accumulator),
        optax.scale_by_learning_rate(learning_rate),
    )


@rate_in_state
def normalized_sgd(
    learning_rate: ScalarOrSchedule, eps: float = 0.0
) -> optax.GradientTransformation:
    """Normalised gradient descent: ``w <- w - eta g / ||g||`` with the global L2 norm."""
    check_lr(learning_rate)
    return optax.chain(normalize_by_global_norm(eps), optax.scale_by_learning_rate(learning_rate))


@rate_in_state
def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """RMSProp: ``r <- beta r + (1 - beta) g^2 ; w <- w - eta g / (sqrt(r) + eps)``.

    * ``eps_in_sqrt=True``: ``g / sqrt(r + eps)`` (one text's form, and optax's default).
      The default here, eps outside the root, is the texts' main form and PyTorch's.
    * ``centered=True``: divide by ``sqrt(r - m^2)`` with ``m`` the EMA of ``g`` (Graves 2013).
    * ``momentum=mu``: ``b <- mu b + g / (sqrt(r) + eps) ; w <- w - eta b`` (learning rate
      outside the momentum buffer, as in PyTorch; optax.rmsprop puts it inside).

    Built on `optax.scale_by_rms` / `optax.scale_by_stddev` (no bias correction, r starts at 0).

    References:
      Tieleman & Hinton, Lecture 6.5 (2012); Graves, https://arxiv.org/abs/1308.0850
    """
    check_lr(learning_rate)
    check_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    check_range("eps", eps, low=0.0)
    scale = optax.scale_by_stddev if centered else optax.scale_by_rms
    parts = [scale(decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt)]
    if momentum is not None:
        check_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


@rate_in_state
def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    eps_root: float = 0.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """Adam: ``m <- b1 m + (1-b1) g ; v <- b2 v + (1-b2) g^2 ;
    w <- w - eta m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``.

    ``nesterov=True`` is NAdam (`optax.nadam`): ``m_hat = b1 m / (1 - b1^(t+1)) +
    (1 - b1) g / (1 - b1^t)``, the momentum looked up one step ahead.

    Exactly `optax.scale_by_adam` followed by the learning-rate scale (eps outside
    the root, as in the paper and PyTorch).

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2015), https://arxiv.org/abs/1412.6980;
      Dozat, "Incorporating Nesterov Momentum into Adam" (2016)
    """
    check_lr(learning_rate)
    for name, b in (("b1", b1), ("b2", b2)):
        check_range(name, b, low=0.0, high=1.0, high_inclusive=False)
    check_range("eps", eps, low=0.0)
    return optax.chain(
        optax.scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )


@rate_in_state
def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    eps_root: float = 0.0,
    nesterov: bool = False,
    mask: MaskSpec = None,
) -> optax.GradientTransformation:
    """AdamW: Adam plus decoupled weight decay,
    ``w <- w - eta (m_hat / (sqrt(v_hat) + eps) + lam w)``; equal to `optax.adamw`
    with the same mask (``nesterov=True``: NAdamW, `optax.nadamw`). Default mask:
    kernels only."""
    return optax.chain(
        adam(learning_rate, b1, b2, eps, eps_root=eps_root, nesterov=nesterov),
        decoupled_weight_decay(weight_decay, learning_rate, mask=mask),
    )


@rate_in_state
def adadelta(
    learning_rate: ScalarOrSchedule = 1.0, rho: float = 0.9, eps: float = 1e-6
) -> optax.GradientTransformation:
    """Adadelta: ``E[g^2] <- rho E[g^2] + (1-rho) g^2 ;
    d = -sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) g ; E[dx^2] <- rho E[dx^2] + (1-rho) d^2 ; w <- w + eta d``.

    ``eta = 1`` is the paper's rule (PyTorch's default ``lr=1.0``). Exactly
    `optax.scale_by_adadelta` followed by the learning-rate scale.

    References:
      Zeiler, "ADADELTA: An Adaptive Learning Rate Method" (2012), https://arxiv.org/abs/1212.5701
    """
    check_lr(learning_rate)
    check_range("rho", rho, low=0.0, high=1.0, high_inclusive=False)
    return optax.chain(
        optax.scale_by_adadelta(rho, eps), optax.scale_by_learning_rate(learning_rate)
    )
