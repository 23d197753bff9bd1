"""Augmentations (T10): shapes, identity at zero strength, keyed determinism, geometry checks,
mixup/cutmix label mixing, training-only application."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.data import augment as A
from jtricks.errors import ConfigError
from jtricks.nn import MLP
from jtricks.training import create_train_state, evaluate, fit

IMG = jax.random.normal(jax.random.key(0), (9, 9, 3))
SIG = jax.random.normal(jax.random.key(1), (40,))
SIG2 = jax.random.normal(jax.random.key(2), (40, 2))

IMAGE_AUGS = {
    "hflip": ({}, {"p": 0.0}),
    "translate": ({"max_pixels": 2}, {"max_pixels": 0}),
    "random_crop": ({"padding": 2}, {"padding": 0}),
    "rotate": ({"max_degrees": 15.0}, {"max_degrees": 0.0}),
    "cutout": ({"size": 4}, {"size": 0}),
    "brightness": ({"delta": 0.2}, {"delta": 0.0}),
    "contrast": ({"strength": 0.3}, {"strength": 0.0}),
    "noise": ({"std": 0.1}, {"std": 0.0}),
    "scale": ({"strength": 0.2}, {"strength": 0.0}),
}
SIGNAL_AUGS = {
    "shift": ({"max_shift": 3}, {"max_shift": 0}),
    "time_stretch": ({"max_factor": 0.2}, {"max_factor": 0.0}),
    "noise": ({"std": 0.1}, {"std": 0.0}),
    "scale": ({"strength": 0.2}, {"strength": 0.0}),
    "trend": ({"strength": 1.0}, {"strength": 0.0}),
}
CASES = [(n, IMG, kw) for n, kw in IMAGE_AUGS.items()] + [
    (n, s, kw) for n, kw in SIGNAL_AUGS.items() for s in (SIG, SIG2)
]


@pytest.mark.parametrize(("name", "x", "kw"), CASES, ids=[f"{c[0]}-{c[1].shape}" for c in CASES])
def test_shape_dtype_identity_and_keys(name, x, kw):
    strong, zero = kw
    fn = jax.jit(A.AUGMENTATIONS[name](**strong))
    y1, y2 = fn(jax.random.key(3), x), fn(jax.random.key(3), x)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    np.testing.assert_array_equal(y1, y2)  # same key, same output
    outs = [fn(jax.random.key(k), x) for k in range(6)]
    assert any(not np.allclose(outs[0], o) for o in outs[1:])  # different keys differ
    ident = jax.jit(A.AUGMENTATIONS[name](**zero))(jax.random.key(4), x)
    np.testing.assert_allclose(ident, x, rtol=1e-6, atol=1e-6)  # zero strength is the identity


def test_flip_twice_is_identity_and_flip_is_mirror():
    flip = A.hflip(p=1.0)
    once = flip(jax.random.key(0), IMG)
    np.testing.assert_array_equal(once, IMG[:, ::-1, :])
    np.testing.assert_array_equal(flip(jax.random.key(1), once), IMG)


def test_crop_stays_in_bounds():
    x = jnp.arange(6 * 6, dtype=jnp.float32).reshape(6, 6, 1) + 1.0
    padded = np.pad(np.asarray(x), ((2, 2), (2, 2), (0, 0)))
    crop = jax.jit(A.random_crop(padding=2))
    for k in range(20):
        y = np.asarray(crop(jax.random.key(k), x))
        windows = [padded[i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(np.array_equal(y, w) for w in windows)


def test_rotation_matches_scipy_and_keeps_the_centre():
    """Second code path: scipy.ndimage.rotate (bilinear), compared away from the border where
    the two libraries' edge handling differs."""
    import scipy.ndimage as nd

    x = jax.random.normal(jax.random.key(5), (15, 15, 1))
    y = np.asarray(A.rotate(max_degrees=30.0)(jax.random.key(0), x))
    angle = float(
        jax.random.uniform(jax.random.key(0), (), minval=-30.0, maxval=30.0)
    )  # the angle rotate drew
    ref = nd.rotate(
        np.asarray(x)[..., 0], -angle, reshape=False, order=1, mode="constant", cval=0.0
    )
    np.testing.assert_allclose(y[4:11, 4:11, 0], ref[4:11, 4:11], atol=1e-5)
    np.testing.assert_allclose(
        y[7, 7], np.asarray(x)[7, 7], rtol=1e-5
    )  # the centre pixel does not move


def test_trend_adds_a_zero_mean_ramp_within_strength():
    """The difference is ``c * (t / (n - 1) - 1/2)`` in every channel: a straight line through
    zero at the centre with one slope ``|c| <= strength``, the same for both channels."""
    fn = jax.jit(A.trend(strength=0.8))
    t = np.arange(40) / 39 - 0.5
    slopes = []
    for k in range(20):
        d = np.asarray(fn(jax.random.key(k), SIG2), np.float64) - np.asarray(SIG2, np.float64)
        c = float(d[:, 0] @ t / (t @ t))
        np.testing.assert_allclose(d, np.outer(c * t, np.ones(2)), atol=1e-5)
        slopes.append(c)
    assert max(abs(c) for c in slopes) <= 0.8 and np.std(slopes) > 0.1


def test_shift_modes():
    x = jnp.arange(1.0, 11.0)
    circ, zero = A.shift(3, mode="circular"), A.shift(3, mode="zero")
    for k in range(10):
        c, z = np.asarray(circ(jax.random.key(k), x)), np.asarray(zero(jax.random.key(k), x))
        s = int(np.argmax(c == 1.0))
        s = s - 10 if s > 3 else s  # the roll amount in [-3, 3]
        np.testing.assert_array_equal(c, np.roll(np.asarray(x), s))
        expect = np.roll(np.asarray(x), s)
        if s > 0:
            expect[:s] = 0
        elif s < 0:
            expect[s:] = 0
        np.testing.assert_array_equal(z, expect)


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.2), (1.0, 1.0), (3.0, 3.0), (0.5, 2.0)])
def test_the_loop_free_beta_sampler_follows_the_beta_distribution(a, b):
    """40,000 draws against scipy's Beta CDF at 49 points (the empirical CDF's standard
    deviation is at most 0.0025), and the compiled sampler has no loop of unknown length."""
    from scipy import stats

    keys = jax.random.split(jax.random.key(0), 40_000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: A.beta(k, a, b)))(keys), np.float64)
    assert np.isfinite(draws).all() and draws.min() >= 0 and draws.max() <= 1
    grid = np.linspace(0.02, 0.98, 49)
    empirical = (draws[:, None] <= grid).mean(0)
    np.testing.assert_allclose(empirical, stats.beta(a, b).cdf(grid), atol=0.011)
    text = jax.jit(lambda k: A.beta(k, a, b)).lower(jax.random.key(0)).compile().as_text()
    loops = [line for line in text.splitlines() if " while(" in line]
    assert all("known_trip_count" in line for line in loops)


def test_mixup_and_cutmix_mix_inputs_and_labels():
    x = jax.random.normal(jax.random.key(6), (8, 6, 6, 3))
    y = jnp.arange(8) % 4
    xm, ym = A.mix_batch(jax.random.key(7), x, y, 4, kind="mixup", alpha=0.5)
    np.testing.assert_allclose(ym.sum(1), 1.0, rtol=1e-6)
    k_lam, k_perm, _ = jax.random.split(jax.random.key(7), 3)
    lam, perm = A.beta(k_lam, 0.5, 0.5), jax.random.permutation(k_perm, 8)
    np.testing.assert_allclose(xm, lam * x + (1 - lam) * x[perm], rtol=1e-5, atol=1e-6)
    xc, yc = A.mix_batch(jax.random.key(8), x, y, 4, kind="cutmix", alpha=1.0)
    kept = np.mean(
        np.all(np.asarray(xc) == np.asarray(x), axis=-1), axis=(1, 2)
    )  # fraction of pixels kept
    onehot = np.eye(4)[np.asarray(y)]
    own = np.asarray(yc)[np.arange(8), np.asarray(y)]
    partner_same = (
        np.asarray(y)
        == np.asarray(y)[
            np.asarray(jax.random.permutation(jax.random.split(jax.random.key(8), 3)[1], 8))
        ]
    )
    np.testing.assert_allclose(own[~partner_same], kept[~partner_same], atol=1e-6)
    assert onehot.shape == yc.shape


def test_pipeline_spec_and_errors():
    fn = A.build_augment("shift(2) | noise(0.0) | scale(0.0)")
    assert fn(jax.random.key(0), SIG).shape == SIG.shape
    for spec, match in [
        ("blur", "valid augments are: brightness"),
        ("noise(-1)", "std"),
        ("shift(2, mode='wrap')", "mode"),
        ("", "augment must be"),
        ("shift(2) |", "empty stage"),
    ]:
        with pytest.raises(ConfigError, match=match):
            A.build_augment(spec)


def test_compose_takes_arguments_or_one_list_and_keys_each_part():
    x, key = jnp.linspace(-1.0, 1.0, 16).reshape(16, 1), jax.random.key(3)
    parts = [A.shift(2), A.noise(0.1)]
    hand = parts[1](jax.random.fold_in(key, 1), parts[0](jax.random.fold_in(key, 0), x))
    np.testing.assert_array_equal(A.compose(*parts)(key, x), hand)
    np.testing.assert_array_equal(A.compose(parts)(key, x), hand)
    with pytest.raises(TypeError, match="augmentation 1 is 'noise', not a callable"):
        A.compose(A.shift(2), "noise")


def test_augmentation_is_training_only(tiny_data, adam, key):
    d = tiny_data
    state = create_train_state(MLP(num_classes=4, features=(16,)), adam, d.x_train, key)
    loud = A.noise(100.0)  # training on garbage...
    state, hist = fit(
        state,
        (d.x_train, d.y_train),
        val_data=(d.x_test, d.y_test),
        batch_size=20,
        epochs=1,
        augment=loud,
    )
    assert hist["train_loss"][0] > 5 * hist["val_loss"][0]  # ...while validation sees clean data
    np.testing.assert_allclose(
        evaluate(state, (d.x_test, d.y_test))["loss"], hist["val_loss"][0], rtol=1e-6
    )


def test_cli_augment_and_mixup(tmp_path, capsys):
    from jtricks.cli import main

    base = [
        "train",
        "--dataset",
        "synthetic(num_train=120, num_test=40, shape=(16,), num_classes=3, noise=0.3)",
        "--model",
        "mlp(features=(8,))",
        "--epochs",
        "2",
        "--batch-size",
        "20",
        "--no-progress",
    ]
    assert (
        main(
            [
                *base,
                "--augment",
                "shift(2) | noise(0.05) | time_stretch(0.1)",
                "--mixup",
                "0.2",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    for extra, match in [
        (["--augment", "blur"], "valid augments are"),
        (["--augment", "hflip"], "does not fit examples"),
        (["--cutmix", "1.0"], "cutmix needs images"),
        (["--mixup", "-1"], "mixup"),
    ]:
        assert main([*base, *extra, "--out", str(tmp_path / "b")]) == 2
        assert match in capsys.readouterr().err
        assert not (tmp_path / "b").exists()


def test_token_inputs_are_not_augmented(tmp_path, capsys):
    """A language model's inputs are token ids: noise on them died in the traced step with
    a traceback and a half-written folder, a shift trained on tokens moved away from their
    next-token targets. Both are one line, no folder; in Python `fit` refuses too."""
    from jtricks.cli import main
    from jtricks.nn import build_model
    from jtricks.tasks import LanguageModel

    model = "transformer_lm(d_model=8, heads=2, layers=1)"
    base = ["train", "--dataset", "tokens(num_train=64, num_test=16)", "--model", model]
    base += ["--steps", "2", "--batch-size", "8", "--no-progress", "--out", str(tmp_path / "b")]
    for spec, match in [
        ("noise(0.1)", "does not fit examples of shape (32,) and dtype int32"),
        ("shift(1)", "the language model task's inputs are token ids"),
    ]:
        assert main([*base, "--augment", spec]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and not (tmp_path / "b").exists()
    tokens = np.random.default_rng(0).integers(0, 16, (8, 33)).astype(np.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    state = create_train_state(build_model(model, 16), optax.sgd(0.1), x, jax.random.key(0))
    with pytest.raises(ConfigError, match="inputs are token ids"):
        fit(state, (x, y), task=LanguageModel(), augment="shift(1)", batch_size=4, epochs=1)


def test_apply_batch_is_deprecated_and_equals_the_vmap():
    from jtricks.data.augment import apply_batch, shift

    x = jax.random.normal(jax.random.key(0), (4, 16))
    with pytest.warns(DeprecationWarning, match="apply_batch is deprecated"):
        got = apply_batch(shift(2), jax.random.key(1), x)
    want = jax.vmap(shift(2))(jax.random.split(jax.random.key(1), 4), x)
    np.testing.assert_array_equal(got, want)
