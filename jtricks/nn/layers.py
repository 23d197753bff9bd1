"""Layers the models share: a fast 1-D convolution, normalisation by name, PyTorch-style biases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.errors import ConfigError

NORMS = (None, "batch", "batch_unbiased", "layer", "weight", "weight_scaled")
"""``batch``/``weight`` follow Flax; ``batch_unbiased``/``weight_scaled`` follow PyTorch's
conventions (see `BatchNorm` and `WeightNormDense`)."""


def check_norm(norm: str | None) -> None:
    if norm not in NORMS:
        raise ConfigError(
            f"norm must be one of {', '.join(map(repr, NORMS))}; got {norm!r}", param="norm"
        )


def uses_bias(norm: str | None) -> bool:
    """Whether a layer before ``norm`` keeps its bias (a batch or layer norm's offset
    replaces it)."""
    return norm in (None, "weight", "weight_scaled")


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias initialiser, U(±1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def bias_init_for(initializer: str, fan_in: int) -> Callable:
    """Biases start at 0, except with the ``"uniform"`` (PyTorch) initialiser: U(±1/sqrt(fan_in))."""
    return torch_bias_init(fan_in) if initializer == "uniform" else nn.initializers.zeros


class Conv1D(nn.Module):
    """1-D convolution over ``(N, L, C)`` with `flax.linen.Conv`'s parameters and numbers.

    New here: the convolution is computed as ``k`` strided slices of the padded
    input, concatenated on the channel axis, and one matmul with the kernel
    reshaped to ``(k * C_in, C_out)``. On CPU, inside `lax.scan`, this trains small
    1-D CNNs faster than ``nn.Conv`` (XLA's convolution gradients are slow there;
    ``benchmarks/bench_conv.py`` measures it), and under `vmap` it stays a batched
    matmul instead of a grouped convolution. ``impl="lax"`` uses ``nn.Conv`` itself. Parameters (``kernel``
    ``(k, C_in, C_out)``, ``bias``) are identical, so checkpoints move between the two.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    impl: str = "slices"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        if self.impl == "lax":
            conv = nn.Conv(
                self.features,
                (k,),
                strides=(self.strides,),
                padding=[(self.padding, self.padding)],
                use_bias=self.use_bias,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                name="conv",
            )
            return conv(x)
        kernel = self.param("kernel", self.kernel_init, (k, c_in, self.features))
        xp = jnp.pad(x, ((0, 0), (self.padding, self.padding), (0, 0)))
        length = (x.shape[1] + 2 * self.padding - k) // self.strides + 1
        if length < 1:
            raise ValueError(
                f"input length {x.shape[1]} is too short for kernel {k} with padding {self.padding}"
            )
        span = self.strides * (length - 1) + 1
        cols = jnp.concatenate([xp[:, j : j + span : self.strides, :] for j in range(k)], axis=-1)
        y = cols @ kernel.reshape(k * c_in, self.features).astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
        return y


def conv(
    features: int,
    kernel_size: int,
    x: jax.Array,
    *,
    strides: int = 1,
    padding: int | None = None,
    use_bias: bool = True,
    kernel_init: Callable,
    name: str | None = None,
) -> jax.Array:
    """Apply a conv to ``x``: `Conv1D` for ``(N, L, C)``, ``nn.Conv`` for ``(N, H, W, C)``.
    ``padding=None`` is 'same' padding for odd kernels."""
    pad = (kernel_size - 1) // 2 if padding is None else padding
    if x.ndim == 3:
        return Conv1D(
            features,
            kernel_size,
            strides,
            pad,
            use_bias=use_bias,
            kernel_init=kernel_init,
            name=name,
        )(x)
    window = (kernel_size,) * (x.ndim - 2)
    return nn.Conv(
        features,
        window,
        strides=(strides,) * len(window),
        padding=[(pad, pad)] * len(window),
        use_bias=use_bias,
        kernel_init=kernel_init,
        name=name,
    )(x)


class BatchNorm(nn.Module):
    """Batch normalisation with PyTorch's running-variance rule.

    Training: ``y = gamma (x - mu_B) / sqrt(var_B + eps) + beta`` with the biased batch
    variance ``var_B = mean((x - mu_B)^2)`` over every axis but the last (as Flax and
    PyTorch both normalise); the running statistics update as
    ``mu <- m mu + (1 - m) mu_B`` and ``var <- m var + (1 - m) n / (n - 1) var_B``, ``n``
    the values per feature. The ``n / (n - 1)`` (the unbiased batch variance) is PyTorch's
    ``BatchNorm`` rule; `flax.linen.BatchNorm` averages the biased ``var_B`` instead, so
    its running variance is smaller by ``(n - 1) / n`` in the limit. Evaluation uses the
    running statistics. ``momentum`` is Flax's ``m`` (PyTorch's ``momentum`` is
    ``1 - m``). Parameters and statistics have `flax.linen.BatchNorm`'s names and shapes
    (``scale``, ``bias``; ``mean``, ``var``), so checkpoints move between the two.

    New here: Flax has no option for the unbiased running variance.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            n = x.size // features
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class WeightNormDense(nn.Module):
    """A Dense layer ``y = x w + b`` with ``w = g v / ||v||`` per output unit, ``g``
    initialised to ``||v||`` so that ``w = v`` at initialisation (PyTorch's
    ``weight_norm``): the kernel initialiser's scale survives.

    `flax.linen.WeightNorm` starts ``g`` at 1 instead (unit-norm columns whatever the
    initialiser); that is ``norm="weight"``. Salimans & Kingma (2016),
    https://arxiv.org/abs/1602.07868. New here: the initialiser-preserving ``g``.
    """

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        g = self.param("scale", lambda _: jnp.linalg.norm(v, axis=0))
        b = self.param("bias", self.bias_init, (self.features,))
        w = v * (g / jnp.linalg.norm(v, axis=0))
        return x @ w.astype(x.dtype) + b.astype(x.dtype)


def normalize(kind: str | None, x: jax.Array, *, train: bool, name: str | None = None) -> jax.Array:
    """Apply the normalisation ``kind`` over the feature (last) axis.

    * ``"batch"``: ``gamma (x - mu_B) / sqrt(var_B + eps) + beta`` with the batch's statistics
      in training and running averages (momentum 0.9, like PyTorch's 0.1) in evaluation;
      the running variance averages the biased batch variance (`flax.linen.BatchNorm`).
    * ``"batch_unbiased"``: the same with PyTorch's running variance, which averages the
      unbiased batch variance (`BatchNorm`).
    * ``"layer"``: the same with each example's own statistics over its features.
    * ``None`` / ``"weight"`` / ``"weight_scaled"``: identity (weight norm acts on the
      layer's kernel instead, see `dense`).
    """
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)(x)
    if kind == "batch_unbiased":
        return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)(x)
    if kind == "layer":
        return nn.LayerNorm(epsilon=1e-5, name=name)(x)
    return x


def dense(
    features: int,
    x: jax.Array,
    *,
    norm: Any,
    kernel_init: Callable,
    bias_init: Callable,
    name: str | None = None,
):
    """A Dense layer; with ``norm="weight"`` its kernel is weight-normalised,
    ``w = g v / ||v||`` per output unit with ``g`` starting at 1 (`flax.linen.WeightNorm`);
    with ``norm="weight_scaled"`` ``g`` starts at ``||v||`` (PyTorch's convention,
    `WeightNormDense`). Salimans & Kingma 2016, https://arxiv.org/abs/1602.07868."""
    if norm == "weight_scaled":
        return WeightNormDense(features, kernel_init, bias_init, name=name)(x)
    layer = nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, name=name)
    if norm == "weight":
        return nn.WeightNorm(layer)(x)
    return layer(x)
