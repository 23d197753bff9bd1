"""Models with an output at every position: a dilated fully convolutional 1-D network
(segmentation) and a causal transformer (language models).

Both share the options of every jtricks model (``num_classes``, ``activation``,
``dropout``, ``initializer``, ``norm``) and return ``(N, L, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jtricks.errors import ConfigError
from jtricks.nn.layers import bias_init_for, normalize
from jtricks.nn.models import (
    ModelBase,
    Transformer,
    act_and_init,
    as_sequence,
    positive_ints,
)


def _equal_lengths(channels: Sequence[int], dilations: Sequence[int]) -> None:
    if len(channels) != len(dilations):
        raise ConfigError(
            f"channels and dilations must have equal lengths; got {len(channels)} and "
            f"{len(dilations)}",
            param="dilations",
        )


class FCN1D(ModelBase):
    """A fully convolutional 1-D network: per layer ``conv (SAME, dilated) -> norm -> act ->
    dropout``, a residual connection where the width is unchanged, and a per-position
    linear head, so ``(N, L)`` or ``(N, L, C)`` signals give ``(N, L, num_classes)`` logits.

    Dilations ``1, 2, 4, ...`` grow the receptive field exponentially with depth:
    ``1 + (k - 1) sum_l d_l`` positions (61 with the defaults). The head starts at zero
    (``zero_head=True``): the residual sums of ReLU features grow with depth, and a random
    head gave initial logits of standard deviation 2 (loss 2.5 against ``log 3``).

    References:
      Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation"
      (2015), https://arxiv.org/abs/1411.4038; Yu & Koltun, "Multi-Scale Context Aggregation
      by Dilated Convolutions" (2016), https://arxiv.org/abs/1511.07122
    """

    channels: Sequence[int] = (32, 32, 32, 32)
    dilations: Sequence[int] = (1, 2, 4, 8)
    kernel_size: int = 5
    zero_head: bool = True

    def __post_init__(self) -> None:
        positive_ints("channels", self.channels)
        positive_ints("dilations", self.dilations)
        positive_ints("kernel_size", (self.kernel_size,))
        _equal_lengths(self.channels, self.dilations)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act, kinit = act_and_init(self)
        x = as_sequence(x)
        for i, (ch, d) in enumerate(zip(self.channels, self.dilations, strict=True)):
            h = nn.Conv(
                ch,
                (self.kernel_size,),
                kernel_dilation=(d,),
                padding="SAME",
                kernel_init=kinit,
                bias_init=bias_init_for(self.initializer, self.kernel_size * x.shape[-1]),
                name=f"conv{i}",
            )(x)
            h = self._drop(act(normalize(self.norm, h, train=train, name=f"norm{i}")), train)
            x = x + h if h.shape == x.shape else h
        return self._head(x)


class TransformerLM(Transformer):
    """A causal (decoder-only) pre-norm transformer language model.

    Integer tokens ``(N, T)`` from a vocabulary of ``num_classes`` are embedded (plus a
    learned position embedding for the ``T`` positions seen at initialisation), pass the
    blocks of `jtricks.nn.Transformer` with a causal mask (position ``t`` attends to
    ``0..t`` only), and a per-position head gives next-token logits ``(N, T, num_classes)``.

    References:
      Radford et al., "Improving Language Understanding by Generative Pre-Training" (2018);
      Vaswani et al., "Attention Is All You Need" (2017), https://arxiv.org/abs/1706.03762
    """

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"TransformerLM takes tokens (N, T); got shape {tokens.shape}")
        x = nn.Embed(
            self.num_classes,
            self.d_model,
            embedding_init=nn.initializers.normal(0.02),
            name="embed",
        )(tokens)
        x = self._drop(x + self._positions(tokens.shape[1]), train)
        return self._head(self._blocks(x, train, nn.make_causal_mask(tokens)))


__all__ = ["FCN1D", "TransformerLM"]
