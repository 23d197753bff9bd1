"""First models in Flax Linen: an MLP and the MNIST-1D paper's 1-D CNN.

Every model is pure: ``variables = model.init(key, x)`` then
``model.apply(variables, x, train=..., rngs={"dropout": key})``. One ``train``
flag flows to every stochastic or stateful layer. Dropout takes the *drop*
probability ``rate`` (flax convention); a dropout key is required when
``train=True`` and ``rate > 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.errors import ConfigError, check_range, unknown_name
from jtricks.nn.initializers import get_initializer

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "elu": nn.elu,
    "silu": nn.silu,
    "leaky_relu": nn.leaky_relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by name; the error lists the valid names."""
    if name not in ACTIVATIONS:
        raise unknown_name("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def _bias_init(initializer: str, fan_in: int):
    """Biases start at 0, except for ``"uniform"`` (PyTorch's default): U(±1/sqrt(fan_in))."""
    if initializer != "uniform":
        return nn.initializers.zeros
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _check_common(num_classes: int, dropout: float, activation: str, init: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer; got {num_classes!r}")
    check_range("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    get_activation(activation)
    get_initializer(init)


class MLP(nn.Module):
    """Multi-layer perceptron: flatten, then ``Dense -> act -> Dropout`` per hidden layer, then a linear head.

    The MNIST-1D paper's MLP is ``MLP(features=(100, 100))``.

    Attributes:
      num_classes: output width.
      features: hidden widths, one per layer.
      activation: name in `ACTIVATIONS`.
      dropout: drop probability after each hidden activation (0 disables).
      initializer: weight initialiser name (`jtricks.nn.initializers`). The default
        ``"uniform"`` is PyTorch's, as in the paper, and then biases are
        U(±1/sqrt(fan_in)) too; with any other initialiser biases start at 0.
    """

    num_classes: int = 10
    features: Sequence[int] = (100, 100)
    activation: str = "relu"
    dropout: float = 0.0
    initializer: str = "uniform"

    def __post_init__(self) -> None:
        _check_common(self.num_classes, self.dropout, self.activation, self.initializer)
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in self.features):
            raise ConfigError(f"features must be positive integers; got {tuple(self.features)!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act = get_activation(self.activation)
        kernel_init = get_initializer(self.initializer)
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = act(
                nn.Dense(
                    width,
                    kernel_init=kernel_init,
                    bias_init=_bias_init(self.initializer, x.shape[-1]),
                )(x)
            )
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=kernel_init,
            bias_init=_bias_init(self.initializer, x.shape[-1]),
        )(x)


class CNN1D(nn.Module):
    """The MNIST-1D paper's 1-D CNN: three conv layers, then a linear head.

    Defaults: 25 channels each, kernels 5/3/3, stride 2, padding 1, ReLU, as in the
    paper's reference notebook; on length-40 inputs the feature maps have length
    19, 10 and 5. Weights start from ``initializer`` (default ``"uniform"``, PyTorch's
    default and so the paper's, with biases U(±1/sqrt(fan_in)); other
    initialisers start biases at 0). Input ``(N, L)`` is read as one channel; ``(N, L, C)`` as C channels.

    References:
      Greydanus, "Scaling down deep learning with MNIST-1D", https://arxiv.org/abs/2011.14439
    """

    num_classes: int = 10
    channels: Sequence[int] = (25, 25, 25)
    kernel_sizes: Sequence[int] = (5, 3, 3)
    strides: Sequence[int] = (2, 2, 2)
    padding: int = 1
    activation: str = "relu"
    dropout: float = 0.0
    initializer: str = "uniform"

    def __post_init__(self) -> None:
        _check_common(self.num_classes, self.dropout, self.activation, self.initializer)
        if not (len(self.channels) == len(self.kernel_sizes) == len(self.strides)):
            raise ConfigError(
                "channels, kernel_sizes and strides must have equal lengths; got "
                f"{len(self.channels)}, {len(self.kernel_sizes)}, {len(self.strides)}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act = get_activation(self.activation)
        kernel_init = get_initializer(self.initializer)
        if x.ndim == 2:
            x = x[..., None]
        for ch, k, s in zip(self.channels, self.kernel_sizes, self.strides, strict=True):
            x = nn.Conv(
                ch,
                (k,),
                strides=(s,),
                padding=[(self.padding, self.padding)],
                kernel_init=kernel_init,
                bias_init=_bias_init(self.initializer, k * x.shape[-1]),
            )(x)
            x = act(x)
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(
            self.num_classes,
            kernel_init=kernel_init,
            bias_init=_bias_init(self.initializer, x.shape[-1]),
        )(x)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN1D}
