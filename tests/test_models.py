"""Models, layers, initialisers and losses (T03, T05, T06, T20, T22-T25)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtricks.errors import ConfigError
from jtricks.losses import binary_cross_entropy, cross_entropy, dice_loss, mse
from jtricks.nn import CNN1D, INITIALIZERS, MLP, MODELS, Conv1D, build_model
from jtricks.nn.initializers import VARIANCE, get_initializer
from jtricks.training.state import QUICK_INIT, init_compiler_options

SEQ = jnp.asarray(np.random.default_rng(0).normal(size=(4, 40)), jnp.float32)
IMG = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)

# parameter counts on MNIST-1D inputs (N, 40), 10 classes
PARAMS = {
    "mlp": 15210,  # 40*100+100 + 100*100+100 + 100*10+10, the paper's MLP
    "cnn": 5210,  # the paper's CNN
    "cnn_wide": 232970,
    "resnet20": 93914,
    "resnet18": 3848778,
    "lstm": 17546,  # 4 gates * (1*64 + 64*64 + 64) + 64*10+10
    "gru": 13386,
    "transformer": 70410,
}


PER_POSITION = ("fcn1d", "transformer_lm")  # an output at every position: tested below
ELSEWHERE = ("inception", "inception1d", "densenet", "densenet1d")  # test_architectures.py
CLASSIFIERS = sorted(set(MODELS) - set(PER_POSITION) - set(ELSEWHERE))


@pytest.fixture(scope="module")
def variables():
    """Each model initialised by one compiled program (op by op, the eager init of eight
    models took 29 s of the suite against 22 s compiled)."""
    return {
        name: jax.jit(build_model(name, 10).init)(jax.random.key(0), SEQ) for name in CLASSIFIERS
    }


def _count(v):
    return sum(p.size for p in jax.tree.leaves(v["params"]))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shapes_counts_and_eval_determinism(name, variables):
    model, v = build_model(name, 10), variables[name]
    assert _count(v) == PARAMS[name]
    apply = jax.jit(model.apply)
    a, b = apply(v, SEQ), apply(v, SEQ)
    assert a.shape == (4, 10) and bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(a, b)  # evaluation has no randomness


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm"])
def test_the_quick_init_level_gives_the_default_levels_parameters(name):
    """`create_train_state` compiles ``init`` at XLA level 1 for a quick start (a cold
    run compiled it in 0.8 s instead of 2.1 s): the parameters are those of the default
    level 2, bit for bit (lecun and orthogonal initialisers, biases: Threefry hashing,
    inverse erf, QR). Both levels are named, as the tests' own XLA_FLAGS set level 0."""
    model, key = build_model(name, 10), jax.random.key(0)
    quick = jax.jit(model.init, compiler_options=QUICK_INIT)(key, SEQ)
    default = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 2})
    for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(default(key, SEQ)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_level_in_xla_flags_wins_over_the_quick_init(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    assert init_compiler_options() == QUICK_INIT
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert init_compiler_options() == {}


def test_lstm_count_by_formula(variables):
    """The built LSTM's parameters against the formula: 4 gates of input, recurrent and
    bias weights (1 input feature, 64 units), plus the 10-class head."""
    h = 64
    assert _count(variables["lstm"]) == 4 * (1 * h + h * h + h) + h * 10 + 10


@pytest.mark.parametrize(("name", "count"), [("resnet20", 272_474), ("resnet18", 11_173_962)])
def test_resnets_on_cifar_images_match_published_sizes(name, count):
    model = build_model(name, 10)
    v = jax.eval_shape(model.init, jax.random.key(0), IMG)  # shapes only: no compute
    # ResNet-20 "0.27M" (He et al. 2016, Table 6); ResNet-18 for CIFAR: 11,173,962
    assert _count(v) == count
    assert jax.eval_shape(model.apply, v, IMG).shape == (2, 10)


def test_cnn_matches_lax_conv_reference(variables):
    """Second code path: the conv stack written out with lax.conv_general_dilated."""
    params = variables["cnn"]["params"]
    h = SEQ[..., None]
    for name in ("Conv_0", "Conv_1", "Conv_2"):
        p = params[name]
        h = jax.lax.conv_general_dilated(
            h, p["kernel"], (2,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC")
        )
        h = jax.nn.relu(h + p["bias"])
    assert h.shape == (4, 5, 25)  # lengths 19, 10, 5
    expect = h.reshape(4, -1) @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(CNN1D().apply({"params": params}, SEQ), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "s", "p"), [(5, 2, 1), (3, 1, 1), (4, 3, 0), (1, 1, 0)])
def test_fast_conv1d_equals_flax_conv(k, s, p):
    x = jax.random.normal(jax.random.key(2), (3, 17, 4))
    fast, ref = Conv1D(6, k, s, p), Conv1D(6, k, s, p, impl="lax")
    v = fast.init(jax.random.key(3), x)
    vref = {"params": {"conv": v["params"]}}
    np.testing.assert_allclose(fast.apply(v, x), ref.apply(vref, x), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda v: jnp.sum(fast.apply(v, x) ** 2))(v)
    gref = jax.grad(lambda v: jnp.sum(ref.apply(v, x) ** 2))(vref)
    np.testing.assert_allclose(
        g["params"]["kernel"], gref["params"]["conv"]["kernel"], rtol=1e-4, atol=1e-4
    )


def test_mlp_residual_adds_input(key):
    m = MLP(features=(8, 8, 8), residual=True, activation="identity")
    v = m.init(key, jnp.ones((1, 8)))
    plain = MLP(features=(8, 8, 8), residual=False, activation="identity")
    assert not np.allclose(m.apply(v, SEQ[:, :8]), plain.apply(v, SEQ[:, :8]))
    # by hand: layer 0 maps 8->8, then x + F(x) for layers 0..2 (widths match everywhere)
    x = SEQ[:, :8]
    for i in range(3):
        p = v["params"][f"Dense_{i}"]
        x = x + x @ p["kernel"] + p["bias"]
    np.testing.assert_allclose(
        m.apply(v, SEQ[:, :8]),
        x @ v["params"]["head"]["kernel"] + v["params"]["head"]["bias"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_dropout_needs_key_and_is_seeded(key):
    model = MLP(dropout=0.5)
    v = model.init(key, SEQ)
    with pytest.raises(Exception, match="dropout"):
        model.apply(v, SEQ, train=True)
    a = model.apply(v, SEQ, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(v, SEQ, train=True, rngs={"dropout": jax.random.key(1)})
    c = model.apply(v, SEQ, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(model.apply(v, SEQ), model.apply(v, SEQ))


def test_batchnorm_statistics_change_only_in_training(key):
    model = MLP(norm="batch", features=(16,))
    v = model.init(key, SEQ)
    stats0 = v["batch_stats"]
    _, upd = model.apply(v, SEQ, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), stats0, upd["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # by hand: running mean <- 0.9 * 0 + 0.1 * batch mean of the pre-activation
    p = v["params"]["Dense_0"]
    pre = SEQ @ p["kernel"] + p["bias"]
    np.testing.assert_allclose(
        upd["batch_stats"]["Norm_0"]["mean"], 0.1 * pre.mean(0), rtol=1e-5, atol=1e-6
    )
    _, upd_eval = model.apply(v, SEQ, train=False, mutable=["batch_stats"])
    for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(upd_eval["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # in evaluation the output uses running statistics: independent of the rest of the batch
    np.testing.assert_allclose(model.apply(v, SEQ)[:1], model.apply(v, SEQ[:1]), rtol=1e-6)


def test_layer_and_weight_norm(key):
    for norm in ("layer", "weight"):
        m = MLP(norm=norm, features=(16,))
        v = m.init(key, SEQ)
        assert m.apply(v, SEQ).shape == (4, 10) and "batch_stats" not in v
    m = MLP(norm="weight", features=(16,), activation="identity")
    p = m.init(key, SEQ)["params"]
    v, g = p["Dense_0"]["kernel"], p["WeightNorm_0"]["Dense_0/kernel/scale"]
    w = g * v / jnp.linalg.norm(v, axis=0)  # w = g v / ||v|| per output unit
    h = SEQ @ w + p["Dense_0"]["bias"]
    np.testing.assert_allclose(
        m.apply({"params": p}, SEQ),
        h @ p["head"]["kernel"] + p["head"]["bias"],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_initializer_variance(name):
    n_in, n_out = 400, 300
    w = get_initializer(name)(jax.random.key(0), (n_in, n_out), jnp.float32)
    np.testing.assert_allclose(float(jnp.var(w)), VARIANCE[name](n_in, n_out), rtol=0.05)
    assert abs(float(jnp.mean(w))) < 0.05 * np.sqrt(VARIANCE[name](n_in, n_out)) * 10


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "vgg",
            "valid models are: cnn, cnn_wide, densenet, densenet1d, fcn1d, gru, inception, inception1d, lstm, mlp, resnet18, resnet20, transformer, transformer_lm",
        ),
        ("mlp(width=3)", "valid arguments are"),
        ("mlp(dropout=1.0)", "dropout"),
        ("mlp(activation='swishy')", "valid activations"),
        ("cnn(initializer='zeros')", "valid initializers"),
        ("cnn(norm='group')", "norm must be one of"),
        ("cnn(channels=(4, 4), kernel_sizes=(3,), strides=(1, 1))", "equal lengths"),
        ("mlp(features=(0,))", "positive"),
        ("transformer(d_model=30, heads=4)", "divisible"),
        ("lstm(hidden=0)", "hidden"),
        ("mlp(", "cannot parse"),
        ("mlp(zero_head='yes')", "zero_head must be True or False; got 'yes'"),
        ("mlp(residual=1)", "residual must be True or False; got 1"),
    ],
)
def test_bad_model_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_model(spec, 10)


# --------------------------------------------------------------------------- losses (float64 formulas)


def _logits():
    rng = np.random.default_rng(5)
    return rng.normal(size=(6, 4)) * 3, rng.integers(0, 4, 6)


def test_cross_entropy_integer_onehot_and_smoothing():
    z, y = _logits()
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            cross_entropy(jnp.asarray(z), jnp.asarray(y)), -logp[np.arange(6), y], rtol=1e-12
        )
        onehot = np.eye(4)[y]
        np.testing.assert_allclose(
            cross_entropy(jnp.asarray(z), jnp.asarray(onehot)), -logp[np.arange(6), y], rtol=1e-12
        )
        q = 0.9 * onehot + 0.1 / 4
        np.testing.assert_allclose(
            cross_entropy(jnp.asarray(z), jnp.asarray(y), label_smoothing=0.1),
            -(q * logp).sum(1),
            rtol=1e-12,
        )


def test_bce_mse_formulas():
    rng = np.random.default_rng(6)
    z, t = rng.normal(size=(5, 3)) * 4, rng.integers(0, 2, (5, 3)).astype(float)
    s = 1 / (1 + np.exp(-z))
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            binary_cross_entropy(jnp.asarray(z), jnp.asarray(t)),
            -(t * np.log(s) + (1 - t) * np.log(1 - s)).sum(1),
            rtol=1e-10,
        )
        np.testing.assert_allclose(
            mse(jnp.asarray(z), jnp.asarray(t)), ((z - t) ** 2).mean(1), rtol=1e-12
        )


def test_dice_formula_and_perfect_prediction():
    rng = np.random.default_rng(7)
    z, y = rng.normal(size=(2, 5, 5, 3)), rng.integers(0, 3, (2, 5, 5))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    oh = np.eye(3)[y]
    d = (2 * (p * oh).sum((1, 2)) + 1) / (p.sum((1, 2)) + oh.sum((1, 2)) + 1)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            dice_loss(jnp.asarray(z), jnp.asarray(y)), 1 - d.mean(-1), rtol=1e-12
        )
        perfect = jnp.asarray(oh * 1e4)
        np.testing.assert_allclose(dice_loss(perfect, jnp.asarray(y)), 0.0, atol=1e-12)


def test_losses_stable_for_huge_logits():
    z = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], jnp.float32)
    y = jnp.array([1, 1])
    for value in (
        cross_entropy(z, y),
        cross_entropy(z, y, label_smoothing=0.1),
        binary_cross_entropy(z, jnp.ones_like(z)),
        mse(z, jnp.zeros_like(z)),
        dice_loss(z, y),
    ):
        assert bool(jnp.all(jnp.isfinite(value)))
    np.testing.assert_allclose(cross_entropy(z, y)[0], 2e4, rtol=1e-6)
    g = jax.grad(
        lambda z: (
            cross_entropy(z, y).sum()
            + binary_cross_entropy(z, jnp.ones_like(z)).sum()
            + dice_loss(z, y).sum()
        )
    )(z)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_fcn1d_counts_shapes_and_determinism():
    model = build_model("fcn1d", 3)
    v = model.init(jax.random.key(0), SEQ)
    # conv 1->32 (k5), three convs 32->32 (k5), per-position head 32->3, all with biases
    assert _count(v) == (5 * 1 * 32 + 32) + 3 * (5 * 32 * 32 + 32) + (32 * 3 + 3)
    a = model.apply(v, SEQ)
    assert a.shape == (4, 40, 3)
    np.testing.assert_array_equal(a, model.apply(v, SEQ))


@pytest.mark.parametrize("spec", ["mlp(zero_head=True)", "cnn(zero_head=True)", "fcn1d"])
def test_a_zero_head_starts_at_log_c_and_its_first_gradient_is_the_head_s_alone(spec):
    """``zero_head``: every initial logit is 0, so the cross-entropy is ``log C``; the first
    gradient reaches the head only, its bias's gradient ``mean_n(1/C - onehot(y_n))`` written
    out by hand (``fcn1d`` starts so by default: its random head gave loss 2.5 on 3 classes)."""
    c, y = 3, jnp.asarray(np.random.default_rng(3).integers(0, 3, size=(4, 40)))
    y = y if spec == "fcn1d" else y[:, 0]
    model = build_model(spec, c)
    params = model.init(jax.random.key(0), SEQ)["params"]

    def loss(p):
        return cross_entropy(model.apply({"params": p}, SEQ), y).mean()

    assert float(loss(params)) == pytest.approx(np.log(c), rel=1e-6)
    g = jax.grad(loss)(params)
    onehot = np.eye(c)[np.asarray(y)].reshape(-1, c)
    np.testing.assert_allclose(g["head"]["bias"], (1 / c - onehot).mean(0), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g["head"]["kernel"]).max()) > 0
    body = {k: v for k, v in g.items() if k != "head"}
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(body))


def test_transformer_lm_counts_and_is_causal():
    model = build_model("transformer_lm(d_model=32, heads=2, layers=1)", 16)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 16, size=(2, 12)), jnp.int32)
    v = model.init(jax.random.key(0), tokens)
    d, vocab, t = 32, 16, 12
    block = 2 * (2 * d) + 4 * (d * d + d) + (d * 2 * d + 2 * d) + (2 * d * d + d)
    assert _count(v) == vocab * d + t * d + block + 2 * d + (d * vocab + vocab)
    out = model.apply(v, tokens)
    assert out.shape == (2, 12, 16)
    changed = model.apply(v, tokens.at[:, 7].set((tokens[:, 7] + 1) % 16))
    diff = np.abs(np.asarray(out - changed)).max(axis=(0, 2))
    assert (diff[:7] == 0).all() and (diff[7:] > 0).all()  # position t sees tokens 0..t only
