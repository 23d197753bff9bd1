"""DenseNet-BC: every layer of a dense block sees the feature maps of all the
layers before it, concatenated, and adds ``growth`` new channels of its own.

Layer ``l`` of a block computes ``x_l = H_l([x_0, x_1, ..., x_{l-1}])``, with ``H_l`` the
bottleneck composite ``norm -> act -> 1x1 conv (bottleneck * growth channels) -> norm
-> act -> 3x3 conv (growth channels)`` ("B"); a transition between blocks is ``norm ->
act -> 1x1 conv`` to ``floor(compression * m)`` of its ``m`` channels (``compression``
0.5: "C") ``-> 2x2 average pool, stride 2``. The CIFAR network starts with a 3x3
convolution of ``2 * growth`` channels and ends with ``norm -> act``, global average
pooling and a linear head; with three blocks and depth ``L`` each block has
``(L - 4) / 6`` layers. It works on images ``(N, H, W, C)`` and, with 1-D convolutions,
on sequences ``(N, L)`` / ``(N, L, C)``.

Memory: this is the usual concatenate-as-you-go form. Layer ``l`` of a block with
``m_0`` input channels reads a fresh concatenation of ``m_0 + l * growth`` channels, and
training keeps each of these (and its normalised copy) for the backward pass, so a
block of ``n`` layers holds about ``n * m_0 + growth * n**2 / 2`` channels per position
of activations, quadratic in ``n``, against ``n * growth`` for the layers' own
outputs. ``remat=True`` wraps each layer in `flax.linen.remat` (`jax.checkpoint`): the
concatenation, norms and bottleneck are recomputed in the backward pass, so only the
layers' inputs are kept (the memory-efficient scheme of Pleiss et al.), for about one
more forward pass of compute.

References:
  Huang et al., "Densely Connected Convolutional Networks" (2017),
  https://arxiv.org/abs/1608.06993;
  Pleiss et al., "Memory-Efficient Implementation of DenseNets" (2017),
  https://arxiv.org/abs/1707.06990
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.errors import ConfigError, check_range
from jtricks.nn.layers import conv, normalize
from jtricks.nn.models import ModelBase, act_and_init, positive_ints, with_channels


class DenseLayer(nn.Module):
    """One bottleneck layer: ``[x, H(x)]`` with ``H = norm -> act -> 1x1 conv(bottleneck *
    growth) -> norm -> act -> 3x3 conv(growth)`` (pre-activation, convolutions without
    bias)."""

    growth: int
    norm: str | None = "batch"
    bottleneck: int = 4
    activation: str = "relu"
    initializer: str = "he_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act, kinit = act_and_init(self)
        h = act(normalize(self.norm, x, train=train, name="norm1"))
        h = conv(
            self.bottleneck * self.growth, 1, h, use_bias=False, kernel_init=kinit, name="conv1"
        )
        h = act(normalize(self.norm, h, train=train, name="norm2"))
        h = conv(self.growth, 3, h, use_bias=False, kernel_init=kinit, name="conv2")
        return jnp.concatenate([x, h], axis=-1)


class DenseNet(ModelBase):
    """DenseNet-BC (see the module docstring). ``layers`` gives the number of layers of
    each dense block; by default three blocks of ``(depth - 4) // 6``. ``stem`` defaults
    to ``2 * growth`` channels; ``stem_kernel`` is 3 for images (5 suits MNIST-1D). The
    shared ``dropout`` option (off by default) acts before the head; the convolutions
    never have biases (each is followed by the next layer's norm).

    ``densenet``: depth 100, growth 12 (DenseNet-BC-100, k = 12; 769,162 parameters on
    32x32x3 images with 10 classes); ``densenet1d``: depth 40 (three blocks of 6
    layers), growth 12, stem kernel 5, for MNIST-1D.
    """

    depth: int = 100
    growth: int = 12
    layers: Sequence[int] | None = None
    bottleneck: int = 4
    compression: float = 0.5
    stem: int | None = None
    stem_kernel: int = 3
    remat: bool = False
    norm: str | None = "batch"
    initializer: str = "he_normal"

    def __post_init__(self) -> None:
        for name in ("growth", "bottleneck", "stem_kernel"):
            positive_ints(name, (getattr(self, name),))
        if self.layers is not None:
            positive_ints("layers", self.layers)
        elif not isinstance(self.depth, int) or self.depth < 10 or (self.depth - 4) % 6:
            raise ConfigError(
                f"depth must be 6n + 4 for three blocks of n bottleneck layers (e.g. 40, "
                f"100, 250); got {self.depth!r}",
                param="depth",
            )
        if self.stem is not None:
            positive_ints("stem", (self.stem,))
        check_range("compression", self.compression, low=0.0, high=1.0, low_inclusive=False)
        super().__post_init__()

    def _block_sizes(self) -> tuple[int, ...]:
        return tuple(self.layers) if self.layers is not None else ((self.depth - 4) // 6,) * 3

    def _transition(self, x: jax.Array, i: int, train: bool) -> jax.Array:
        act, kinit = act_and_init(self)
        h = act(normalize(self.norm, x, train=train, name=f"transition{i}_norm"))
        out = int(self.compression * x.shape[-1])
        h = conv(out, 1, h, use_bias=False, kernel_init=kinit, name=f"transition{i}_conv")
        window = (2,) * (x.ndim - 2)
        return nn.avg_pool(h, window, strides=window, padding="VALID")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = with_channels(x)
        act, kinit = act_and_init(self)
        stem = self.stem or 2 * self.growth
        x = conv(stem, self.stem_kernel, x, use_bias=False, kernel_init=kinit, name="stem")
        layer_cls = nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer
        sizes = self._block_sizes()
        for b, n in enumerate(sizes):
            for j in range(n):
                layer = layer_cls(
                    self.growth,
                    self.norm,
                    self.bottleneck,
                    self.activation,
                    self.initializer,
                    name=f"block{b + 1}_layer{j + 1}",
                )
                x = layer(x, train)
            if b < len(sizes) - 1:
                x = self._transition(x, b + 1, train)
        x = act(normalize(self.norm, x, train=train, name="final_norm"))
        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        return self._head(self._drop(x, train))


def densenet(num_classes: int = 10, depth: int = 100, growth: int = 12, **kwargs) -> DenseNet:
    """DenseNet-BC for CIFAR-sized images: depth 100, growth 12 by default."""
    return DenseNet(num_classes=num_classes, depth=depth, growth=growth, **kwargs)


def densenet1d(
    num_classes: int = 10, depth: int = 40, growth: int = 12, stem_kernel: int = 5, **kwargs
) -> DenseNet:
    """DenseNet-BC for MNIST-1D: depth 40 (three blocks of 6 layers), growth 12, stem kernel 5."""
    return DenseNet(
        num_classes=num_classes, depth=depth, growth=growth, stem_kernel=stem_kernel, **kwargs
    )
