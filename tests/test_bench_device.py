"""MFU's numerator and denominators (`jtricks.bench.device`): the FLOP count of a small
conv net against a hand count, and the datasheet peaks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtricks.bench.device import lowered_flops, peak_flops

N, H, W, C_IN, C_OUT, K, CLASSES = 2, 8, 8, 2, 4, 3, 3
HO, WO = H - K + 1, W - K + 1  # VALID padding


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(C_OUT, (K, K), padding="VALID")(x))
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


def _hand_forward() -> int:
    """2 FLOPs per multiply-add of the convolution and the dense layer, one per bias add
    and per ReLU."""
    conv = 2 * N * HO * WO * C_OUT * (K * K * C_IN)
    conv_rest = 2 * N * HO * WO * C_OUT  # bias, ReLU
    features = HO * WO * C_OUT
    dense = 2 * N * features * CLASSES + N * CLASSES
    return conv + conv_rest + dense


def _setup():
    x = jax.random.normal(jax.random.key(0), (N, H, W, C_IN))
    model = ConvNet()
    return model, model.init(jax.random.key(1), x), x


def test_lowered_flops_of_a_conv_net_equal_a_hand_count():
    model, params, x = _setup()
    assert lowered_flops(jax.jit(model.apply).lower(params, x)) == _hand_forward()


def test_lowered_flops_count_the_backward_convolution():
    """The gradient adds the weight gradient of the convolution (as many multiply-adds as
    the forward one) and both products of the dense layer; element-wise work adds a few
    percent at most."""
    model, params, x = _setup()

    def loss(p):
        return jnp.sum(model.apply(p, x) ** 2)

    got = lowered_flops(jax.jit(jax.grad(loss)).lower(params))
    conv_dw = 2 * N * HO * WO * C_OUT * (K * K * C_IN)
    dense_back = 2 * (2 * N * HO * WO * C_OUT * CLASSES)
    floor = _hand_forward() + conv_dw + dense_back
    assert floor <= got <= 1.05 * floor, (got, floor)


def test_peak_flops_match_datasheet_parts_only():
    assert peak_flops("NVIDIA H200", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.7e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") is None
    assert peak_flops("cpu", "float32") is None
