"""Models in Flax Linen: MLP, the MNIST-1D paper's CNN and a wide residual
variant, CIFAR-style ResNets, LSTM/GRU classifiers and a pre-norm transformer encoder.

Every model is pure: ``variables = model.init(key, x)`` then
``model.apply(variables, x, train=..., rngs={"dropout": key}, mutable=["batch_stats"])``.
One ``train`` flag flows to BatchNorm (batch statistics in training, running
averages in evaluation) and Dropout. Shared options on every model:

* ``norm``: ``None``, ``"batch"``, ``"layer"`` or ``"weight"`` (weight normalisation
  of the dense layers), placed after the weights and before the activation;
  ``"batch_unbiased"`` and ``"weight_scaled"`` are the PyTorch conventions of the
  running variance and of the weight-norm initialisation (`jtricks.nn.layers`);
* ``dropout``: the *drop* probability (Flax's convention; keep = 1 - rate),
  applied only with ``train=True``, which then requires a ``"dropout"`` key;
* ``initializer``: a name from `jtricks.nn.initializers`;
* ``activation``: a name from `ACTIVATIONS`;
* ``zero_head``: the output layer starts at zero, so the initial loss is the task's
  zero-output reference (``log C``: `jtricks.diagnostics.initial_loss`) whatever the
  scale of the features; the body learns from the second step (big_vision's
  ``head_zeroinit``).

Every model accepts MNIST-1D sequences ``(N, 40)``; the ResNets also take images
``(N, H, W, C)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.errors import ConfigError, check_range, unknown_name
from jtricks.nn.initializers import get_initializer
from jtricks.nn.layers import Conv1D, bias_init_for, check_norm, conv, dense, normalize, uses_bias

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "elu": nn.elu,
    "silu": nn.silu,
    "leaky_relu": nn.leaky_relu,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by name; the error lists the valid names."""
    if name not in ACTIVATIONS:
        raise unknown_name("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def positive_ints(name: str, values: Sequence[int]) -> None:
    if isinstance(values, int) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ConfigError(
            f"{name} must be a sequence of positive integers; got {values!r}", param=name
        )


def with_channels(x: jax.Array) -> jax.Array:
    """``(N, L)`` -> ``(N, L, 1)``: one channel for signals given without one; other
    shapes unchanged."""
    return x[..., None] if x.ndim == 2 else x


def as_sequence(x: jax.Array) -> jax.Array:
    """``(N, L)`` -> ``(N, L, 1)``; ``(N, L, ...)`` -> ``(N, L, F)``: L steps of F features."""
    x = with_channels(x)
    return x.reshape((x.shape[0], x.shape[1], -1))


def act_and_init(module: nn.Module) -> tuple[Callable[[jax.Array], jax.Array], Any]:
    """A module's activation function and kernel initializer, from its ``activation``
    and ``initializer`` names."""
    return get_activation(module.activation), get_initializer(module.initializer)


class ModelBase(nn.Module):
    """Options every model shares; validated when the module is built."""

    num_classes: int = 10
    activation: str = "relu"
    dropout: float = 0.0
    initializer: str = "lecun_normal"
    norm: str | None = None
    zero_head: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 1
        ):
            raise ConfigError(
                f"num_classes must be a positive integer; got {self.num_classes!r}",
                param="num_classes",
            )
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        get_activation(self.activation)
        get_initializer(self.initializer)
        check_norm(self.norm)
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(value := getattr(self, f.name), bool):
                raise ConfigError(f"{f.name} must be True or False; got {value!r}", param=f.name)
        super().__post_init__()

    def _drop(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.Dropout(self.dropout, deterministic=not train)(x) if self.dropout > 0 else x

    def _head(self, x: jax.Array) -> jax.Array:
        zeros = nn.initializers.zeros_init() if self.zero_head else None
        return nn.Dense(
            self.num_classes,
            kernel_init=zeros or get_initializer(self.initializer),
            bias_init=zeros or bias_init_for(self.initializer, x.shape[-1]),
            name="head",
        )(x)


class MLP(ModelBase):
    """Multi-layer perceptron: flatten, then per hidden layer ``Dense -> norm -> act -> dropout``,
    then a linear head. With ``residual=True``, a layer whose width equals its input's
    adds its input: ``x <- x + F(x)``.

    The MNIST-1D paper's MLP is ``MLP(features=(100, 100), initializer="uniform")``,
    the default here.
    """

    features: Sequence[int] = (100, 100)
    residual: bool = False
    initializer: str = "uniform"

    def __post_init__(self) -> None:
        positive_ints("features", self.features)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act, kinit = act_and_init(self)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.features):
            h = dense(
                width,
                x,
                norm=self.norm,
                kernel_init=kinit,
                bias_init=bias_init_for(self.initializer, x.shape[-1]),
                name=f"Dense_{i}",
            )
            h = self._drop(act(normalize(self.norm, h, train=train, name=f"Norm_{i}")), train)
            x = x + h if self.residual and h.shape == x.shape else h
        return self._head(x)


class CNN1D(ModelBase):
    """The MNIST-1D paper's 1-D CNN: three conv layers, then a linear head.

    Defaults: 25 channels each, kernels 5/3/3, stride 2, padding 1, ReLU and
    PyTorch's default initialisation (weights and biases U(±1/sqrt(fan_in))), as
    in the paper's reference code; on length-40 inputs the feature maps have
    length 19, 10 and 5 and the model has 5210 parameters. Input ``(N, L)`` is
    one channel, ``(N, L, C)`` C channels. Convolutions use the fast `Conv1D`.

    References:
      Greydanus, "Scaling down deep learning with MNIST-1D", https://arxiv.org/abs/2011.14439
    """

    channels: Sequence[int] = (25, 25, 25)
    kernel_sizes: Sequence[int] = (5, 3, 3)
    strides: Sequence[int] = (2, 2, 2)
    padding: int = 1
    initializer: str = "uniform"
    conv_impl: str = "slices"

    def __post_init__(self) -> None:
        if not (len(self.channels) == len(self.kernel_sizes) == len(self.strides)):
            raise ConfigError(
                "channels, kernel_sizes and strides must have equal lengths; got "
                f"{len(self.channels)}, {len(self.kernel_sizes)}, {len(self.strides)}",
                param="channels",
            )
        for name in ("channels", "kernel_sizes", "strides"):
            positive_ints(name, getattr(self, name))
        if self.conv_impl not in ("slices", "lax"):
            raise ConfigError(
                f"conv_impl must be 'slices' or 'lax'; got {self.conv_impl!r}", param="conv_impl"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act, kinit = act_and_init(self)
        x = with_channels(x)
        for i, (ch, k, s) in enumerate(
            zip(self.channels, self.kernel_sizes, self.strides, strict=True)
        ):
            x = Conv1D(
                ch,
                k,
                s,
                self.padding,
                kernel_init=kinit,
                bias_init=bias_init_for(self.initializer, k * x.shape[-1]),
                impl=self.conv_impl,
                name=f"Conv_{i}",
            )(x)
            x = self._drop(act(normalize(self.norm, x, train=train, name=f"Norm_{i}")), train)
        return self._head(x.reshape((x.shape[0], -1)))


class ResidualBlock(nn.Module):
    """Basic residual block: ``y = act(F(x) + S(x))`` with
    ``F = conv3 -> norm -> act -> conv3 -> norm`` and ``S`` the identity, or a 1x1 conv
    (+ norm) when the shape changes. Convolutions followed by a norm have no bias."""

    features: int
    strides: int = 1
    norm: str | None = "batch"
    activation: str = "relu"
    initializer: str = "he_normal"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        act, kinit = act_and_init(self)
        bias = uses_bias(self.norm)
        y = conv(self.features, 3, x, strides=self.strides, use_bias=bias, kernel_init=kinit)
        y = act(normalize(self.norm, y, train=train))
        y = conv(self.features, 3, y, use_bias=bias, kernel_init=kinit)
        y = normalize(self.norm, y, train=train)
        if x.shape != y.shape:
            x = conv(
                self.features,
                1,
                x,
                strides=self.strides,
                padding=0,
                use_bias=bias,
                kernel_init=kinit,
                name="shortcut",
            )
            x = normalize(self.norm, x, train=train, name="shortcut_norm")
        return act(y + x)


def _residual_stages(
    module: ModelBase,
    x: jax.Array,
    stage_sizes: Sequence[int],
    widths: Sequence[int],
    *,
    train: bool,
    drop: bool = False,
) -> jax.Array:
    """Stages of `ResidualBlock`s inside ``module``'s compact call; the first block of every
    stage after the first halves the resolution. ``drop`` applies dropout after each block."""
    for i, (blocks, width) in enumerate(zip(stage_sizes, widths, strict=True)):
        for j in range(blocks):
            block = ResidualBlock(
                width,
                2 if i > 0 and j == 0 else 1,
                module.norm,
                module.activation,
                module.initializer,
                name=f"stage{i + 1}_block{j + 1}",
            )
            x = block(x, train=train)
            if drop:
                x = module._drop(x, train)
    return x


class ResNet(ModelBase):
    """CIFAR-style ResNet: 3x3 stem, stages of `ResidualBlock`s (the first block of
    every stage after the first halves the resolution), global average pool, linear head.

    Works on images ``(N, H, W, C)`` and on sequences ``(N, L)`` / ``(N, L, C)`` (1-D convs).
    `resnet20`: widths 16/32/64, 3 blocks per stage (He et al. 2016, section 4.2, with 1x1
    projection shortcuts); `resnet18`: widths 64/128/256/512, 2 blocks per stage.

    References:
      He et al., "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385
    """

    stage_sizes: Sequence[int] = (3, 3, 3)
    widths: Sequence[int] = (16, 32, 64)
    norm: str | None = "batch"
    initializer: str = "he_normal"

    def __post_init__(self) -> None:
        positive_ints("stage_sizes", self.stage_sizes)
        positive_ints("widths", self.widths)
        if len(self.stage_sizes) != len(self.widths):
            raise ConfigError("stage_sizes and widths must have equal lengths", param="widths")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = with_channels(x)
        act, kinit = act_and_init(self)
        x = conv(
            self.widths[0],
            3,
            x,
            use_bias=uses_bias(self.norm),
            kernel_init=kinit,
            name="stem",
        )
        x = act(normalize(self.norm, x, train=train, name="stem_norm"))
        x = _residual_stages(self, x, self.stage_sizes, self.widths, train=train)
        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        return self._head(self._drop(x, train))


def resnet20(
    num_classes: int = 10,
    stage_sizes: Sequence[int] = (3, 3, 3),
    widths: Sequence[int] = (16, 32, 64),
    **kwargs,
) -> ResNet:
    """ResNet-20: widths 16/32/64, three stages of three blocks (sizes overridable)."""
    return ResNet(num_classes=num_classes, stage_sizes=stage_sizes, widths=widths, **kwargs)


def resnet18(
    num_classes: int = 10,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    widths: Sequence[int] = (64, 128, 256, 512),
    **kwargs,
) -> ResNet:
    """ResNet-18 (CIFAR stem): widths 64/128/256/512, four stages of two blocks (sizes overridable)."""
    return ResNet(num_classes=num_classes, stage_sizes=stage_sizes, widths=widths, **kwargs)


class WideResCNN1D(ModelBase):
    """Wider residual variant of the MNIST-1D CNN: a 5-wide stem conv, then stages of
    `ResidualBlock`s (1-D), global average pool and a linear head. Defaults: widths 64/128,
    two blocks each, batch norm."""

    widths: Sequence[int] = (64, 128)
    blocks: int = 2
    norm: str | None = "batch"
    initializer: str = "he_normal"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = with_channels(x)
        act, kinit = act_and_init(self)
        x = Conv1D(self.widths[0], 5, 1, 2, kernel_init=kinit, name="stem")(x)
        x = act(normalize(self.norm, x, train=train, name="stem_norm"))
        x = _residual_stages(
            self, x, [self.blocks] * len(self.widths), self.widths, train=train, drop=True
        )
        return self._head(jnp.mean(x, axis=1))


class RNNClassifier(ModelBase):
    """LSTM or GRU sequence classifier: ``layers`` recurrent layers of ``hidden`` units
    (optionally bidirectional), then a linear head on the final hidden state (forward's last
    step, concatenated with backward's first step when bidirectional). Between layers:
    ``norm`` ("layer" or "batch") and dropout. ``(N, L)`` inputs are read as L steps of one feature.
    ``activation`` is the cells' candidate/output non-linearity (tanh by default; gates stay sigmoid).

    Cells: `flax.linen.OptimizedLSTMCell` (forget, input, output gates and a cell state) and
    `flax.linen.GRUCell` (update and reset gates).

    References:
      Hochreiter & Schmidhuber (1997); Cho et al. (2014), https://arxiv.org/abs/1406.1078
    """

    cell: str = "lstm"
    hidden: int = 64
    activation: str = "tanh"
    layers: int = 1
    bidirectional: bool = False

    def __post_init__(self) -> None:
        if self.cell not in ("lstm", "gru"):
            raise ConfigError(f"cell must be 'lstm' or 'gru'; got {self.cell!r}", param="cell")
        positive_ints("hidden", (self.hidden,))
        positive_ints("layers", (self.layers,))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = as_sequence(x)
        cell_cls = nn.OptimizedLSTMCell if self.cell == "lstm" else nn.GRUCell
        kinit, act = get_initializer(self.initializer), get_activation(self.activation)
        for i in range(self.layers):
            fwd = nn.RNN(
                cell_cls(self.hidden, kernel_init=kinit, activation_fn=act), name=f"rnn{i}_fwd"
            )
            if self.bidirectional:
                bwd = nn.RNN(
                    cell_cls(self.hidden, kernel_init=kinit, activation_fn=act),
                    reverse=True,
                    keep_order=True,
                    name=f"rnn{i}_bwd",
                )
                x = nn.Bidirectional(fwd, bwd, name=f"birnn{i}")(x)
            else:
                x = fwd(x)
            if i < self.layers - 1:
                x = self._drop(normalize(self.norm, x, train=train, name=f"Norm_{i}"), train)
        last = x[:, -1, : self.hidden]
        if self.bidirectional:
            last = jnp.concatenate([last, x[:, 0, self.hidden :]], axis=-1)
        return self._head(self._drop(last, train))


class Transformer(ModelBase):
    """Pre-norm transformer encoder classifier.

    Each position's features are embedded by a Dense layer to ``d_model`` and a learned
    position embedding is added; then ``layers`` blocks of
    ``x <- x + MHA(norm(x))`` and ``x <- x + MLP(norm(x))`` (multi-head scaled dot-product
    self-attention, ``softmax(Q K^T / sqrt(d_head)) V``), a final norm, mean pooling over
    positions and a linear head. ``norm`` defaults to ``"layer"``.

    References:
      Vaswani et al., "Attention Is All You Need", https://arxiv.org/abs/1706.03762;
      Xiong et al., "On Layer Normalization in the Transformer Architecture", https://arxiv.org/abs/2002.04745
    """

    d_model: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 2
    norm: str | None = "layer"
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "layers", "mlp_ratio"):
            positive_ints(name, (getattr(self, name),))
        if self.d_model % self.heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by heads ({self.heads})", param="heads"
            )
        super().__post_init__()

    def _positions(self, length: int) -> jax.Array:
        return self.param("pos_embedding", nn.initializers.normal(0.02), (1, length, self.d_model))

    def _blocks(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """The pre-norm blocks and the final norm; ``mask`` limits attention (causal models)."""
        act, kinit = act_and_init(self)
        for i in range(self.layers):
            h = normalize(self.norm, x, train=train, name=f"block{i}_norm1")
            h = nn.MultiHeadDotProductAttention(
                num_heads=self.heads,
                kernel_init=kinit,
                dropout_rate=self.dropout,
                deterministic=not train,
                name=f"block{i}_attention",
            )(h, h, mask=mask)
            x = x + self._drop(h, train)
            h = normalize(self.norm, x, train=train, name=f"block{i}_norm2")
            h = nn.Dense(self.d_model * self.mlp_ratio, kernel_init=kinit, name=f"block{i}_mlp1")(h)
            h = nn.Dense(self.d_model, kernel_init=kinit, name=f"block{i}_mlp2")(
                self._drop(act(h), train)
            )
            x = x + self._drop(h, train)
        return normalize(self.norm, x, train=train, name="final_norm")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = as_sequence(x)
        kinit = get_initializer(self.initializer)
        x = nn.Dense(self.d_model, kernel_init=kinit, name="embed")(x)
        x = self._drop(x + self._positions(x.shape[1]), train)
        return self._head(jnp.mean(self._blocks(x, train), axis=1))


def lstm(num_classes: int = 10, **kwargs) -> RNNClassifier:
    """LSTM classifier (`RNNClassifier` with ``cell="lstm"``)."""
    return RNNClassifier(num_classes=num_classes, cell="lstm", **kwargs)


def gru(num_classes: int = 10, **kwargs) -> RNNClassifier:
    """GRU classifier (`RNNClassifier` with ``cell="gru"``)."""
    return RNNClassifier(num_classes=num_classes, cell="gru", **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN1D,
    "cnn_wide": WideResCNN1D,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "lstm": lstm,
    "gru": gru,
    "transformer": Transformer,
}
