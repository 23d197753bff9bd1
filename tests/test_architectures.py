"""Inception and DenseNet-BC (T22, T25): sizes by formulas written out by hand, shapes,
evaluation determinism, the branch and dense-connectivity structure, and bad arguments."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtricks.errors import ConfigError
from jtricks.nn import DenseLayer, DenseNet, Inception, InceptionBlock, build_model

SEQ = jnp.asarray(np.random.default_rng(0).normal(size=(3, 40)), jnp.float32)
IMG = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)


def _count(model, x) -> int:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
    return sum(a.size for a in jax.tree.leaves(shapes["params"]))


def _bn_conv(c_in: int, c_out: int, taps: int) -> int:
    """A bias-free convolution with ``taps`` kernel positions, then BatchNorm (scale, bias)."""
    return taps * c_in * c_out + 2 * c_out


def _inception_block(c: int, f: int, taps: int) -> int:
    """GoogLeNet-3a proportions: 1x1 f/4; 1x1 3f/8 -> 3x3 f/2; 1x1 f/16 -> 3x3 f/8 -> 3x3
    f/8; pool -> 1x1 f/8."""
    return (
        _bn_conv(c, f // 4, 1)
        + _bn_conv(c, 3 * f // 8, 1)
        + _bn_conv(3 * f // 8, f // 2, taps)
        + _bn_conv(c, f // 16, 1)
        + _bn_conv(f // 16, f // 8, taps)
        + _bn_conv(f // 8, f // 8, taps)
        + _bn_conv(c, f // 8, 1)
    )


def _inception(c_in, stem, stem_taps, widths, blocks, taps, classes=10) -> int:
    total, c = _bn_conv(c_in, stem, stem_taps), stem
    for w in widths:
        for _ in range(blocks):
            total, c = total + _inception_block(c, w, taps), w
    return total + c * classes + classes


def _densenet_bc(depth, k, c_in, stem_taps, taps, classes=10, theta=0.5) -> int:
    """Huang et al. 2017: stem conv to 2k, three blocks of (depth - 4) / 6 bottleneck layers
    (BN, 1x1 to 4k, BN, 3x3 to k), transitions (BN, 1x1 to floor(theta m)), final BN, head."""
    n, m = (depth - 4) // 6, 2 * k
    total = stem_taps * c_in * m
    for b in range(3):
        for _ in range(n):
            total += 2 * m + m * 4 * k + 2 * 4 * k + taps * 4 * k * k
            m += k
        if b < 2:
            out = int(theta * m)
            total, m = total + 2 * m + m * out, out
    return total + 2 * m + m * classes + classes


def test_densenet_bc_100_12_has_the_published_size():
    """Table 2 of Huang et al. (2017) lists DenseNet-BC (L=100, k=12) at 0.8M parameters;
    the exact count on 32x32x3 inputs with 10 classes is 769,162 (the formula above)."""
    n = _count(build_model("densenet", 10), jnp.zeros((1, 32, 32, 3)))
    assert n == _densenet_bc(100, 12, 3, 9, 9) == 769_162


def test_cifar_inception_size_by_formula():
    n = _count(build_model("inception", 10), jnp.zeros((1, 32, 32, 3)))
    assert n == _inception(3, 64, 9, (64, 128, 256), 2, 9) == 440_314


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("inception1d", _inception(1, 32, 5, (64, 128), 1, 3)),
        ("densenet1d", _densenet_bc(40, 12, 1, 5, 3)),
    ],
)
def test_mnist1d_variants_size_by_formula(spec, expected):
    assert _count(build_model(spec, 10), SEQ) == expected


TINY = {
    "inception": "inception(stem=8, widths=(16, 32), blocks=1)",
    "inception1d": "inception1d(stem=8, widths=(16, 16))",
    "densenet": "densenet(depth=10, growth=4)",
    "densenet1d": "densenet1d(depth=10, growth=4)",
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_shapes_and_eval_determinism(name):
    model = build_model(TINY[name], 10)
    x = IMG if name in ("inception", "densenet") else SEQ
    v = jax.jit(model.init)(jax.random.key(0), x)
    apply = jax.jit(model.apply)
    a, b = apply(v, x), apply(v, x)
    assert a.shape == (x.shape[0], 10) and bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(a, b)
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert out.shape == a.shape and set(upd) == {"batch_stats"}


def test_remat_changes_memory_not_numbers():
    """`remat=True` recomputes each layer in the backward pass: same parameters, same
    outputs and gradients."""
    plain = build_model("densenet1d(depth=10, growth=4)", 10)
    remat = build_model("densenet1d(depth=10, growth=4, remat=True)", 10)
    v = jax.jit(plain.init)(jax.random.key(0), SEQ)
    shapes = jax.eval_shape(remat.init, jax.random.key(0), SEQ)
    assert jax.tree.structure(v) == jax.tree.structure(shapes)

    def loss(model, params):
        out, _ = model.apply({**v, "params": params}, SEQ, train=True, mutable=["batch_stats"])
        return jnp.sum(out**2)

    for a, b in zip(
        jax.tree.leaves(jax.jit(jax.grad(lambda p: loss(plain, p)))(v["params"])),
        jax.tree.leaves(jax.jit(jax.grad(lambda p: loss(remat, p)))(v["params"])),
        strict=True,
    ):
        # float32 round-off of sums through ten layers, as XLA's fusion orders them (up to
        # 1.1e-6 on gradients near 1); a layer left out of the recomputation is off by far more
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_inception_block_concatenates_its_four_branches():
    block = InceptionBlock(32)
    v = jax.jit(lambda k, x: block.init(k, x, train=False))(jax.random.key(0), SEQ[..., None])
    names = set(v["params"])
    assert {"b1x1", "b3x3_reduce", "b3x3", "b5x5_reduce", "b5x5_a", "b5x5_b", "pool_proj"} <= names
    y = jax.jit(lambda v, x: block.apply(v, x, train=False))(v, SEQ[..., None])
    assert y.shape == (3, 40, 32)  # 8 + 16 + 4 + 4 channels, stride 1
    assert bool(jnp.all(y >= 0))  # every branch ends in a ReLU


def test_dense_layer_keeps_its_input_and_adds_growth_channels():
    """Dense connectivity: a layer's input comes out unchanged in its first channels, and a
    block of n layers ends with stem + n * growth channels (read off the head's kernel)."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 40, 7)), jnp.float32)
    layer = DenseLayer(5)
    v = jax.jit(lambda k, x: layer.init(k, x, False))(jax.random.key(0), x)
    y = jax.jit(lambda v, x: layer.apply(v, x, False))(v, x)
    assert y.shape == (3, 40, 12)
    np.testing.assert_array_equal(y[..., :7], x)
    model = DenseNet(num_classes=3, layers=(2,), growth=5)
    head = jax.eval_shape(model.init, jax.random.key(0), SEQ)["params"]["head"]["kernel"]
    assert head.shape == (2 * 5 + 2 * 5, 3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Inception(widths=(24,)), "widths must be multiples of 16"),
        (lambda: Inception(widths=(0,)), "widths must be a sequence of positive integers"),
        (lambda: DenseNet(depth=50), "depth must be 6n \\+ 4"),
        (lambda: DenseNet(compression=0.0), "compression"),
        (lambda: DenseNet(growth=-1), "growth must be"),
        (lambda: DenseNet(layers=(2, 0)), "layers must be"),
    ],
)
def test_bad_arguments_name_the_field(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize(
    "model", ["inception1d(stem=8, widths=(16, 16))", "densenet1d(depth=10, growth=4)"]
)
def test_trains_one_epoch_from_the_cli(tmp_path, model):
    from jtricks.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            model,
            "--dataset",
            "mnist1d(num_samples=300)",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    net = build_model(model, 10)  # the count, by a second path: the model's own shapes
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 40)))["params"]
    assert summary["num_params"] == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and np.isfinite(records[0]["train_loss"])
