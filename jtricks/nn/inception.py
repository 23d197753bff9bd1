"""Inception networks: blocks of parallel convolution paths of different receptive
fields, concatenated, so that a layer chooses its own mix of scales.

`InceptionBlock` has GoogLeNet's four branches with two later refinements: BatchNorm
after every convolution, before its activation (Inception v2), and the 5x5 path
factorised into two 3x3 convolutions (the same receptive field for 18/25 of the
weights, Inception v3). `Inception` stacks them into a small CIFAR-style network, and
works on sequences ``(N, L)`` / ``(N, L, C)`` with 1-D convolutions as on images
``(N, H, W, C)``: ``inception`` and ``inception1d`` are its image and MNIST-1D sizes.

References:
  Szegedy et al., "Going Deeper with Convolutions" (2015), https://arxiv.org/abs/1409.4842;
  Ioffe & Szegedy, "Batch Normalization" (2015), https://arxiv.org/abs/1502.03167;
  Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (2016),
  https://arxiv.org/abs/1512.00567
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.errors import ConfigError
from jtricks.nn.initializers import get_initializer
from jtricks.nn.layers import conv, normalize, uses_bias
from jtricks.nn.models import ModelBase, act_and_init, get_activation, positive_ints, with_channels


class InceptionBlock(nn.Module):
    """One Inception block with ``features`` output channels: four branches on the same
    input, concatenated on the channel axis,

    * 1x1 convolution, ``features / 4`` channels;
    * 1x1 reduction (``3 features / 8``), then 3x3, ``features / 2`` channels;
    * 1x1 reduction (``features / 16``), then 3x3 and 3x3 (a factorised 5x5),
      ``features / 8`` channels;
    * 3x3 max pool (stride 1), then a 1x1 projection, ``features / 8`` channels

    (GoogLeNet's block 3a in proportions). Every convolution is ``conv -> norm -> act``,
    without a bias when a norm follows. ``features`` must be a multiple of 16.
    """

    features: int
    norm: str | None = "batch"
    activation: str = "relu"
    initializer: str = "he_normal"

    def _unit(self, x: jax.Array, features: int, k: int, name: str, train: bool) -> jax.Array:
        bias = uses_bias(self.norm)
        y = conv(
            features, k, x, use_bias=bias, kernel_init=get_initializer(self.initializer), name=name
        )
        return get_activation(self.activation)(
            normalize(self.norm, y, train=train, name=f"{name}_norm")
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        f = self.features
        b1 = self._unit(x, f // 4, 1, "b1x1", train)
        b3 = self._unit(
            self._unit(x, 3 * f // 8, 1, "b3x3_reduce", train), f // 2, 3, "b3x3", train
        )
        b5 = self._unit(x, f // 16, 1, "b5x5_reduce", train)
        b5 = self._unit(self._unit(b5, f // 8, 3, "b5x5_a", train), f // 8, 3, "b5x5_b", train)
        window = (3,) * (x.ndim - 2)
        pool = nn.max_pool(x, window, strides=(1,) * len(window), padding="SAME")
        bp = self._unit(pool, f // 8, 1, "pool_proj", train)
        return jnp.concatenate([b1, b3, b5, bp], axis=-1)


class Inception(ModelBase):
    """A small Inception network: a ``stem_kernel`` convolution of ``stem`` channels
    (``conv -> norm -> act``), then one stage per entry of ``widths`` of ``blocks``
    `InceptionBlock` s of that width, a 3x3 max pool of stride 2 between stages, global
    average pooling, dropout (the shared ``dropout`` option, off by default) and a linear
    head. With ``norm=None`` the convolutions get biases.

    ``inception``: stem 64, widths 64/128/256, 2 blocks per stage (32x32 images: 32, 16
    and 8 pixels a side per stage); ``inception1d``: stem 32 with kernel 5, widths
    64/128, 1 block per stage, for MNIST-1D's length-40 sequences (40 then 20 positions).
    """

    stem: int = 64
    stem_kernel: int = 3
    widths: Sequence[int] = (64, 128, 256)
    blocks: int = 2
    norm: str | None = "batch"
    initializer: str = "he_normal"

    def __post_init__(self) -> None:
        positive_ints("widths", self.widths)
        positive_ints("stem", (self.stem,))
        positive_ints("stem_kernel", (self.stem_kernel,))
        positive_ints("blocks", (self.blocks,))
        if any(w % 16 for w in self.widths):
            raise ConfigError(
                f"widths must be multiples of 16 (the branches take 1/4, 1/2, 1/8, 1/8 and "
                f"the 5x5 reduction 1/16 of them); got {tuple(self.widths)!r}",
                param="widths",
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = with_channels(x)
        act, kinit = act_and_init(self)
        bias = uses_bias(self.norm)
        x = conv(self.stem, self.stem_kernel, x, use_bias=bias, kernel_init=kinit, name="stem")
        x = act(normalize(self.norm, x, train=train, name="stem_norm"))
        for i, width in enumerate(self.widths):
            if i > 0:
                window = (3,) * (x.ndim - 2)
                x = nn.max_pool(x, window, strides=(2,) * len(window), padding="SAME")
            for j in range(self.blocks):
                block = InceptionBlock(
                    width,
                    self.norm,
                    self.activation,
                    self.initializer,
                    name=f"stage{i + 1}_block{j + 1}",
                )
                x = block(x, train=train)
        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        return self._head(self._drop(x, train))


def inception(num_classes: int = 10, **kwargs) -> Inception:
    """The CIFAR-sized `Inception`: stem 64, widths 64/128/256, 2 blocks per stage."""
    return Inception(num_classes=num_classes, **kwargs)


def inception1d(
    num_classes: int = 10,
    stem: int = 32,
    stem_kernel: int = 5,
    widths: Sequence[int] = (64, 128),
    blocks: int = 1,
    **kwargs,
) -> Inception:
    """The MNIST-1D-sized `Inception`: stem 32 (kernel 5), widths 64/128, 1 block per stage."""
    return Inception(
        num_classes=num_classes,
        stem=stem,
        stem_kernel=stem_kernel,
        widths=widths,
        blocks=blocks,
        **kwargs,
    )
