"""Flax NNX models: `fit` equals a hand-written ``nnx`` loop with the same keys and batches,
and a checkpointed run resumes bit-identically."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jtricks.data import epoch_indices
from jtricks.training import create_train_state, evaluate, fit, nnx_module
from jtricks.training.checkpoint import restore, save

BATCH, EPOCHS = 20, 3


class Net(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear."""

    def __init__(self, rngs: nnx.Rngs):
        # no bias before BatchNorm: its gradient is zero up to rounding, which Adam would
        # amplify into +-lr steps that differ between any two correct implementations
        self.hidden = nnx.Linear(16, 32, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


def _net() -> Net:
    return Net(nnx.Rngs(params=0, dropout=1))


def _hand_written(data, data_key) -> Net:
    """The loop of Flax's NNX guide: nnx.Optimizer, nnx.value_and_grad, nnx.jit."""
    x, y = (jnp.asarray(a) for a in data)
    model = _net()
    model.train()
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    steps = x.shape[0] // BATCH
    for epoch in range(EPOCHS):
        for b in epoch_indices(jax.random.fold_in(data_key, epoch), x.shape[0], BATCH, steps):
            step(model, opt, x[b], y[b])
    return model


@pytest.fixture(scope="module")
def nnx_run(tiny_data):
    data = (tiny_data.x_train, tiny_data.y_train)
    data_key = jax.random.key(7)
    state = create_train_state(_net(), optax.adam(1e-2), data[0], jax.random.key(0))
    state, hist = fit(state, data, batch_size=BATCH, epochs=EPOCHS, data_key=data_key)
    return state, hist, data, data_key


def test_nnx_fit_matches_hand_written_loop(nnx_run, tiny_data):
    state, hist, data, data_key = nnx_run
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    model = _hand_written(data, data_key)
    params = nnx.split(model, nnx.Param, ...)[1]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    stats = nnx.state(model, nnx.BatchStat)
    ours = nnx.split(nnx.merge(state.apply_fn.eval_graph, state.params, state.batch_stats))[1]
    np.testing.assert_allclose(
        ours["norm"]["mean"].get_value(), stats["norm"]["mean"].get_value(), rtol=2e-4, atol=2e-5
    )
    model.eval()  # evaluation mode: running statistics, no dropout
    logits = model(jnp.asarray(tiny_data.x_test))
    got = evaluate(state, (tiny_data.x_test, tiny_data.y_test))
    np.testing.assert_allclose(
        got["accuracy"], np.mean(np.argmax(logits, -1) == tiny_data.y_test), atol=0.011
    )


def test_nnx_checkpoint_resumes_bit_identically(nnx_run, tmp_path):
    full, _, data, data_key = nnx_run
    state = create_train_state(_net(), optax.adam(1e-2), data[0], jax.random.key(0))
    steps = data[0].shape[0] // BATCH
    state, _ = fit(state, data, batch_size=BATCH, steps=steps + 3, data_key=data_key)
    path = save(tmp_path, "mid", state, {})
    fresh = create_train_state(_net(), optax.adam(1e-2), data[0], jax.random.key(0))
    resumed, _ = restore(path, fresh)
    assert int(resumed.step) == steps + 3
    resumed, _ = fit(
        resumed, data, batch_size=BATCH, steps=EPOCHS * steps - steps - 3, data_key=data_key
    )
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.array_equal(a, b)


def test_the_callers_module_keeps_its_mode_and_the_trained_module_comes_back(tiny_data):
    """`create_train_state` leaves the module it is given as it was (here in evaluation
    mode); `nnx_module` gives the trained module back, whose evaluation-mode output is the
    one `evaluate` scores, and which a later `fit` of the state does not consume."""
    model = _net()
    model.eval()
    x, y = tiny_data.x_train, tiny_data.y_train
    state = create_train_state(model, optax.adam(1e-2), x, jax.random.key(0))
    assert model.drop.deterministic and model.norm.use_running_average
    state, _ = fit(state, (x, y), batch_size=BATCH, epochs=1)
    trained = nnx_module(state)
    assert trained.drop.deterministic and not nnx_module(state, train=True).drop.deterministic
    x_test = jnp.asarray(tiny_data.x_test)
    logits = trained(x_test)
    accuracy = evaluate(state, (tiny_data.x_test, tiny_data.y_test))["accuracy"]
    assert accuracy == pytest.approx(np.mean(np.argmax(logits, -1) == tiny_data.y_test))
    fit(state, (x, y), batch_size=BATCH, steps=1)  # donates the state, not the module
    np.testing.assert_array_equal(trained(x_test), logits)


def test_a_module_bridged_to_linen_gets_its_dropout_stream_and_its_mode():
    """``nnx.bridge.to_linen`` of a module whose ``nnx.Dropout`` takes ``rngs``: init is
    given the ``dropout`` stream it asks for, training draws a new mask per key, and
    evaluation (the NNX ``__call__``'s ``deterministic``) equals the forward pass written
    out by hand without dropout."""
    from flax.nnx import bridge

    from jtricks.training.model import apply_model

    class Bridged(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(5, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x, *, deterministic: bool = False):
            return self.out(self.drop(nnx.relu(self.hidden(x)), deterministic=deterministic))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)).astype(np.float32), rng.integers(0, 3, 20)
    state = create_train_state(bridge.to_linen(Bridged), optax.sgd(0.1), x, jax.random.key(0))
    state, hist = fit(state, (x, y), batch_size=10, epochs=1)
    assert np.isfinite(hist["train_loss"][-1])
    p = state.params
    by_hand = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    by_hand = by_hand @ p["out"]["kernel"] + p["out"]["bias"]
    evaluated, _ = apply_model(state, p, x, train=False, key=None)
    np.testing.assert_allclose(evaluated, by_hand, rtol=1e-5, atol=1e-5)
    a, _ = apply_model(state, p, x, train=True, key=jax.random.key(1))
    b, _ = apply_model(state, p, x, train=True, key=jax.random.key(2))
    assert not np.allclose(a, b)


def test_freeze_trains_only_the_unfrozen_layers_of_an_nnx_model(tiny_data):
    from jtricks.training.transfer import freeze
    from jtricks.trees import named_leaves

    tx = freeze(optax.adam(1e-2), trainable=["out/*"])  # patterns over "layer/leaf" paths
    state = create_train_state(_net(), tx, tiny_data.x_train, jax.random.key(0))
    before = {k: np.asarray(v) for k, v in named_leaves(state.params).items()}
    state, _ = fit(state, (tiny_data.x_train, tiny_data.y_train), batch_size=BATCH, epochs=1)
    after = {k: np.asarray(v) for k, v in named_leaves(state.params).items()}
    for frozen in [("hidden", "kernel"), ("norm", "scale"), ("norm", "bias")]:
        np.testing.assert_array_equal(after[frozen], before[frozen])
    assert not np.allclose(after[("out", "kernel")], before[("out", "kernel")])


def test_load_pretrained_copies_an_nnx_checkpoint_into_a_new_nnx_model(
    nnx_run, tiny_data, tmp_path
):
    from jtricks.training.transfer import describe_loaded, load_pretrained
    from jtricks.trees import key_data, named_leaves

    trained = nnx_run[0]
    path = save(tmp_path, "epoch-000003", trained, {"epoch": 3, "step": 1})
    fresh = create_train_state(_net(), optax.adam(1e-2), tiny_data.x_train, jax.random.key(5))
    state, info = load_pretrained(fresh, path)
    names = {"hidden/kernel", "norm/scale", "norm/bias", "out/kernel", "out/bias"}
    assert set(info["loaded"]) == names and set(info["stats_loaded"]) == {"norm/mean", "norm/var"}
    assert info["stats_kept"] == []  # Dropout's RNG stream is no layer: fresh, not reported
    assert "drop" not in describe_loaded(info) and "no new layer" in describe_loaded(info)
    fresh_stream = {
        k: v for k, v in named_leaves(key_data(fresh.batch_stats)).items() if "drop" in k
    }
    for name, value in fresh_stream.items():  # the RNG stream as initialised
        np.testing.assert_array_equal(named_leaves(key_data(state.batch_stats))[name], value)
    test = (tiny_data.x_test, tiny_data.y_test)
    assert evaluate(state, test) == evaluate(trained, test)  # statistics came with the layers


def test_an_nnx_ensemble_gets_one_initialisation_per_member(tiny_data):
    """An NNX module comes initialised, so one module for several members is refused (its
    members were identical copies); a factory builds member ``i`` from ``keys[i]``, as
    ``create_train_state`` of that module does, and N modules are taken as they are."""
    from jtricks.errors import ConfigError
    from jtricks.training.ensemble import create_ensemble
    from jtricks.training.state import first_member

    x, tx = tiny_data.x_train, optax.adam(1e-2)
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ConfigError, match="its 2 members would be identical; give a factory"):
        create_ensemble(_net(), tx, x, keys)

    def make(k):
        return Net(nnx.Rngs(k))

    states = create_ensemble(make, tx, x, keys)
    kernels = states.params["hidden"]["kernel"]
    assert not np.allclose(kernels[0], kernels[1])
    alone = create_train_state(make(keys[0]), tx, x, keys[0])
    jax.tree.map(np.testing.assert_array_equal, first_member(states).params, alone.params)
    listed = create_ensemble([make(k) for k in keys], tx, x, keys)
    jax.tree.map(np.testing.assert_array_equal, listed.params, states.params)
    assert create_ensemble(_net(), tx, x, keys[:1]).params["hidden"]["kernel"].shape[0] == 1


def test_swa_recomputes_an_nnx_models_batchnorm_statistics(tiny_data):
    """`recompute_batch_stats` on an NNX model: the BatchNorm mean and variance equal the
    batches' own averaged by hand; the module's other variables (its RNG streams) are
    left as they were (recomputing once failed on their keys, as did ``--swa``'s probe)."""
    from jtricks.training.averaging import recompute_batch_stats
    from jtricks.trees import named_leaves

    x = np.asarray(tiny_data.x_train[:60], np.float32)
    state = create_train_state(_net(), optax.adam(1e-2), x, jax.random.key(0))
    stats = recompute_batch_stats(state, x, batch_size=20)
    built = _net()  # as a run builds it, before the probe --swa and a search's sizing take
    shapes = jax.eval_shape(
        lambda k: create_train_state(built, optax.adam(1e-2), x, k), jax.random.key(0)
    )
    assert shapes.params["hidden"]["kernel"].shape == state.params["hidden"]["kernel"].shape
    h = (x @ np.asarray(state.params["hidden"]["kernel"], np.float64)).reshape(3, 20, -1)
    got = named_leaves(stats)
    np.testing.assert_allclose(got[("norm", "mean")], h.mean(1).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[("norm", "var")], h.var(1).mean(0), rtol=1e-4, atol=1e-6)

    def raw(a):  # a key's bits, or the array
        return jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a

    others = [p for p in named_leaves(state.batch_stats) if p[0] != "norm"]
    assert others  # the dropout stream's key and count
    for path in others:
        before = named_leaves(state.batch_stats)[path]
        np.testing.assert_array_equal(raw(got[path]), raw(before))


def test_an_nnx_models_ema_averages_its_batchnorm_statistics_only(tiny_data):
    """With an EMA, an NNX model's BatchNorm mean and variance follow ``d avg + (1 - d)
    stats`` (float64 by hand from a run without an EMA); its dropout stream's key and count
    follow the live ones (an average of RNG state would be no RNG state)."""
    from jtricks.training import make_train_step
    from jtricks.trees import named_leaves

    x, y = jnp.asarray(tiny_data.x_train), jnp.asarray(tiny_data.y_train)
    state = create_train_state(_net(), optax.adam(1e-2), x, jax.random.key(0), ema_decay=0.9)
    plain = create_train_state(_net(), optax.adam(1e-2), x, jax.random.key(0))
    norm = [p for p in named_leaves(plain.batch_stats) if p[0] == "norm"]
    hand = {p: np.asarray(named_leaves(plain.batch_stats)[p], np.float64) for p in norm}
    step = jax.jit(make_train_step())
    for i in range(4):
        state, _ = step(state, (x[20 * i : 20 * i + 20], y[20 * i : 20 * i + 20]))
        plain, _ = step(plain, (x[20 * i : 20 * i + 20], y[20 * i : 20 * i + 20]))
        live = named_leaves(plain.batch_stats)
        hand = {p: 0.9 * h + 0.1 * np.asarray(live[p]) for p, h in hand.items()}
    ema, live = named_leaves(state.ema_batch_stats), named_leaves(state.batch_stats)
    assert set(norm) == {("norm", "mean"), ("norm", "var")}
    for path in norm:
        np.testing.assert_allclose(ema[path], hand[path], rtol=1e-5, atol=1e-7)

    def raw(a):
        return jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a

    assert set(live) - set(norm)  # the dropout stream's key and count
    for path in set(live) - set(norm):
        np.testing.assert_array_equal(raw(ema[path]), raw(live[path]))
    assert state.with_ema_params().batch_stats is state.ema_batch_stats
