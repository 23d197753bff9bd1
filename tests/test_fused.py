"""Fused multi-tensor optimizer (`jtricks.optim.fused`): the same updates as the unfused chain
on mixed-dtype trees with masks, flat layouts, the flat train step, fit, ensembles, CLI, resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.cli import main
from jtricks.errors import ConfigError
from jtricks.nn import MLP, build_model
from jtricks.optim import (
    Flat,
    FusedState,
    Layout,
    build_optimizer,
    flatten_params,
    fused,
    masked,
)
from jtricks.optim.fused import segment_values
from jtricks.training import create_train_state, fit
from jtricks.training.ensemble import create_ensemble, fit_ensemble
from jtricks.training.fused_state import flat_train_state, tree_train_state
from jtricks.training.steps import make_train_step

# A tree with float32 matrices and vectors, a bfloat16 matrix and vector, a scalar leaf
# and a nested list: every grouping case of the layout.
_K = jax.random.split(jax.random.key(0), 16)
PARAMS = {
    "conv": {"kernel": jax.random.normal(_K[0], (3, 2, 4)), "bias": jax.random.normal(_K[1], (4,))},
    "dense": {"kernel": jax.random.normal(_K[2], (4, 3)), "bias": jax.random.normal(_K[3], (3,))},
    "half": {
        "kernel": jax.random.normal(_K[4], (3, 5)).astype(jnp.bfloat16),
        "bias": jax.random.normal(_K[5], (5,)).astype(jnp.bfloat16),
    },
    "scale": jax.random.normal(_K[6], ()),
    "blocks": [jax.random.normal(_K[7], (2, 2)), jax.random.normal(_K[8], (6,))],
}
MASK_TREE = {  # non-uniform within the float32 matrix and vector groups
    "conv": {"kernel": True, "bias": False},
    "dense": {"kernel": False, "bias": True},
    "half": {"kernel": True, "bias": True},
    "scale": False,
    "blocks": [True, False],
}


def _grads(step: int):
    keys = jax.random.split(jax.random.fold_in(_K[9], step), len(jax.tree.leaves(PARAMS)))
    leaves, treedef = jax.tree.flatten(PARAMS)
    return jax.tree.unflatten(
        treedef,
        [
            (jax.random.normal(k, p.shape) * (0.2 + i)).astype(p.dtype)
            for i, (k, p) in enumerate(zip(keys, leaves, strict=True))
        ],
    )


GRADS = [_grads(t) for t in range(3)]

# Every optimizer and transform of the pipeline, with the masks and forms that change code paths.
SPECS = [
    "sgd(lr=0.1)",
    "momentum(lr=0.1, gamma=0.9)",
    "momentum(lr=0.1, form='lr_inside', nesterov=True)",
    "momentum(lr=0.1, form='damped')",
    "momentum(lr=0.1, form='torch', nesterov=True)",
    "adagrad(lr=0.1)",
    "adagrad(lr=0.1, eps_in_sqrt=False, initial_accumulator=0.1)",
    "normalized_sgd(lr=0.1)",
    "rmsprop(lr=0.01)",
    "rmsprop(lr=0.01, centered=True, momentum=0.9)",
    "adam(lr=0.01)",
    "adamw(lr=0.01, weight_decay=0.1)",
    "adadelta(lr=1.0)",
    "sgd(lr=0.1) | clip_by_value(0.5)",
    "momentum(lr=0.1) | clip_global_norm(1.0)",
    "adamw(lr=0.01, weight_decay=0.1) | clip_global_norm(1.0)",
    "sgd(lr=0.1) | clip_global_norm_unit(1.0)",
    "sgd(lr=0.1) | clip_per_leaf_norm(0.5)",
    "adam(lr=0.01) | l2(0.1)",
    "sgd(lr=0.1) | l1(0.1, mask='all')",
    "sgd(lr=0.1) | l1(0.1, form='proximal')",
    "momentum(lr=0.1) | elastic_net(0.1, alpha=0.3)",
    "adam(lr=0.01) | weight_decay(0.1, mask='all')",
]
# Purely element-wise chains (no global sums): fused must be bit-identical.
EXACT = {
    "sgd(lr=0.1)",
    "momentum(lr=0.1, gamma=0.9)",
    "momentum(lr=0.1, form='damped')",
    "adam(lr=0.01)",
    "adamw(lr=0.01, weight_decay=0.1)",
    "adagrad(lr=0.1)",
    "sgd(lr=0.1) | clip_by_value(0.5)",
}


def _run(tx, params, grads_list, *, flat: bool):
    """Three updates under one jit; ``flat`` runs fused on `Flat` params and gradients."""

    @jax.jit
    def go(params):
        if flat:
            params = flatten_params(params)
        state = tx.init(params)
        ups = []
        for g in grads_list:
            if flat:
                g = params.layout.flatten(g)
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
            ups.append(u.unflatten() if flat else u)
        return (params.unflatten() if flat else params), ups

    return go(params)


def _max_rel(a, b) -> float:
    errs = jax.tree.map(
        lambda x, y: float(
            jnp.max(
                jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
                / (jnp.abs(x.astype(jnp.float32)) + 1e-6)
            )
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(errs))


def _scaled_err(a, b) -> float:
    """Largest ``max|a - b| / max|a|`` over leaves (for trajectories, where XLA may fuse the
    step differently around the flat buffers and round a gradient's last bit differently)."""
    err = jax.tree.map(lambda p, q: float(jnp.max(jnp.abs(p - q)) / jnp.max(jnp.abs(p))), a, b)
    return max(jax.tree.leaves(err))


def _same_dtypes(a, b) -> bool:
    return jax.tree.map(
        lambda x, y: x.dtype == y.dtype and x.shape == y.shape, a, b
    ) == jax.tree.map(lambda x: True, a)


@pytest.mark.parametrize("spec", SPECS)
def test_fused_matches_unfused(spec):
    tx = build_optimizer(spec)
    ref_params, ref_updates = _run(tx, PARAMS, GRADS, flat=False)
    for flat in (True, False):  # Flat fast path, and trees flattened at the boundary
        params, updates = _run(fused(tx), PARAMS, GRADS, flat=flat)
        assert _same_dtypes(params, ref_params)
        if spec in EXACT:
            assert jax.tree.all(
                jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, ref_params)
            )
        # float32 leaves within 4e-6 relative error (about 30 float32 ulps after three
        # steps: the two programs compile apart, and XLA's CPU code generation rounds them
        # differently; measured 1.6e-6 for elastic_net's L1 steps near zero at the tests'
        # optimisation level 0, under 1e-6 at XLA's default); bfloat16 leaves within their
        # own rounding
        f32 = lambda t: jax.tree.map(  # noqa: E731
            lambda x: x if x.dtype == jnp.float32 else jnp.zeros(()), t
        )
        assert _max_rel(f32(params), f32(ref_params)) <= 4e-6, spec
        assert _max_rel(ref_updates, updates) <= 1e-2, spec  # bf16 rounding of tiny updates
        assert _max_rel(f32(updates), f32(ref_updates)) <= 1e-5, spec


def test_masks_on_flat_buffers():
    # a non-uniform mask tree, a callable, and a uniform one: jtricks' masked, fused on the
    # flat buffers, equals optax.masked with the same mask on the tree
    from jtricks.optim.transforms import resolve_mask

    tx = optax.chain(optax.scale_by_adam(), optax.scale(-0.01))
    for mask in (MASK_TREE, lambda p: jax.tree.map(lambda x: x.ndim == 1, p), "weights"):
        inner = optax.chain(
            masked(optax.add_decayed_weights(0.5), mask), tx, masked(optax.scale(3.0), mask)
        )
        m = resolve_mask(mask)
        reference = optax.chain(
            optax.masked(optax.add_decayed_weights(0.5), m), tx, optax.masked(optax.scale(3.0), m)
        )
        ref, _ = _run(reference, PARAMS, GRADS, flat=False)
        got, _ = _run(fused(inner), PARAMS, GRADS, flat=True)
        assert _max_rel(ref, got) <= 1e-6


def test_raw_optax_mask_is_refused():
    tx = optax.chain(
        optax.masked(
            optax.add_decayed_weights(0.1), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
        optax.sgd(0.1),
    )
    with pytest.raises(ConfigError, match=r"optax\.masked"):
        fused(tx).init(PARAMS)
    with pytest.raises(ConfigError, match="group_by"):
        fused(optax.sgd(0.1), group_by="layers")


def test_layout_round_trip_and_groups():
    flat = flatten_params(PARAMS)
    groups = {g.name: len(g.leaves) for g in flat.layout.groups}
    assert groups == {
        "float32/matrix": 3,  # conv, dense kernels and the 2x2 block
        "float32/vector": 4,  # two biases, the scalar, the length-6 block
        "bfloat16/matrix": 1,
        "bfloat16/vector": 1,
    }
    assert sum(b.size for b in flat.buffers) == sum(p.size for p in jax.tree.leaves(PARAMS))
    back = flat.unflatten()
    assert jax.tree.structure(back) == jax.tree.structure(PARAMS)
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)) and a.dtype == b.dtype, back, PARAMS)
    )
    assert len(flatten_params(PARAMS, group_by="dtype").buffers) == 2
    # the number of buffers does not grow with the number of leaves
    many = {f"w{i}": jnp.ones((3, 4)) for i in range(300)}
    assert len(flatten_params(many).buffers) == 1
    assert isinstance(Layout.of(flat), Layout)


def test_gradient_through_flat_is_one_concatenate():
    def loss(p):
        return sum(
            jnp.sum(jnp.sin(x.astype(jnp.float32)) * (i + 1))
            for i, x in enumerate(jax.tree.leaves(p))
        )

    flat = flatten_params(PARAMS)
    g_flat = jax.grad(lambda f: loss(f.unflatten()))(flat)
    assert isinstance(g_flat, Flat)
    g_tree = jax.grad(loss)(PARAMS)
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), g_flat.unflatten(), g_tree)
    )
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda f: loss(f.unflatten())))(flat))
    assert "pad" not in jaxpr  # the split transposes to concatenate, not sums of pads
    multi = sum(len(g.leaves) > 1 for g in flat.layout.groups)
    assert jaxpr.count("concatenate") == multi  # one per multi-leaf buffer


def test_segment_values_matches_repeat():
    flat = flatten_params({f"w{i}": jnp.ones((i + 1, 3)) for i in range(70)}, group_by="dtype")
    g = flat.layout.groups[0]
    vals = jnp.arange(len(g.leaves), dtype=jnp.float32)
    want = np.repeat(np.arange(len(g.leaves)), g.sizes)
    np.testing.assert_array_equal(segment_values(g, vals), want)  # > 64 segments: the scan path


@pytest.fixture(scope="module")
def small_cnn_data():
    rng = np.random.RandomState(0)
    return rng.randn(128, 24).astype(np.float32), rng.randint(0, 4, 128)


def test_fit_fused_equals_unfused(small_cnn_data):
    # BatchNorm, dropout-free CNN, EMA; momentum + decoupled weight decay, fused and not:
    # the parameters, EMA and statistics agree to 1e-5 of their scale after 8 steps
    x, y = small_cnn_data
    model = build_model("cnn(channels=(4, 4, 4), norm='batch')", 4)
    for spec in ("momentum(lr=0.05) | weight_decay(1e-3)",):
        tx = build_optimizer(spec)
        out = []
        for t in (tx, fused(tx)):
            s = create_train_state(model, t, x[:1], jax.random.key(1), ema_decay=0.9)
            s, h = fit(s, (x, y), batch_size=32, epochs=2, val_data=(x[:32], y[:32]))
            out.append((s, h))
        (a, ha), (b, hb) = out
        assert isinstance(b.opt_state, FusedState) and not isinstance(b.params, Flat)
        # XLA fuses the step differently around the flat buffers, so gradients can differ
        # in the last bit; after 8 steps the leaves agree to 1e-5 of their scale
        err = _scaled_err(
            (a.params, a.ema_params, a.batch_stats), (b.params, b.ema_params, b.batch_stats)
        )
        assert err <= 1e-5
        np.testing.assert_allclose(
            ha.records[-1]["val_loss"], hb.records[-1]["val_loss"], rtol=1e-6
        )


def test_train_step_with_flat_state_matches(small_cnn_data):
    x, y = small_cnn_data
    model = MLP(features=(16, 16), num_classes=4)
    tx = build_optimizer("adamw(lr=1e-2, weight_decay=0.1) | clip_global_norm(1.0)")
    step = jax.jit(make_train_step(accumulate=2))
    a = create_train_state(model, tx, x[:1], jax.random.key(2))
    b = flat_train_state(create_train_state(model, fused(tx), x[:1], jax.random.key(2)))
    assert isinstance(b.params, Flat)
    for i in range(4):
        batch = (x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)])
        a, ma = step(a, batch)
        b, mb = step(b, batch)
        np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    assert _max_rel(a.params, tree_train_state(b).params) <= 1e-5


def test_ensemble_fused_equals_unfused(small_cnn_data):
    x, y = small_cnn_data
    model = MLP(features=(8,), num_classes=4)
    tx = build_optimizer("momentum(lr=0.05)")
    out = []
    for t in (tx, fused(tx)):
        states = create_ensemble(model, t, x[:1], jax.random.split(jax.random.key(3), 2))
        states, _ = fit_ensemble(
            states, (x, y), batch_size=32, epochs=1, data_key=jax.random.key(4)
        )
        out.append(states.params)
    assert _scaled_err(*out) <= 1e-5


def test_cli_fused_resume_is_bit_identical(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        "synthetic(num_train=200, num_test=40, shape=(8,), num_classes=3)",
        "--model",
        "mlp(features=(8,))",
        "--optimizer",
        "adamw(lr=1e-2) | clip_global_norm(1.0)",
        "--batch-size",
        "20",
        "--epochs",
        "4",
        "--checkpoint-every",
        "2",
        "--no-progress",
        "--fused",
    ]
    full = tmp_path / "full"
    assert main([*args, "--out", str(full)]) == 0
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["config"]["fused"] is True
    # the same run cut after epoch 2 (later checkpoints and the summary removed), resumed
    import shutil

    from jtricks.training.checkpoint import list_checkpoints

    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "summary.json").unlink()
    for ck in list_checkpoints(part / "checkpoints"):
        if ck.name != "epoch-000002":
            shutil.rmtree(ck)
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    import orbax.checkpoint as ocp

    def final_params(run):
        ck = ocp.StandardCheckpointer()
        arrays = ck.restore((run / "checkpoints" / "epoch-000004" / "state").absolute())
        ck.close()
        return arrays["params"]

    p1, p2 = final_params(full), final_params(part)
    assert set(p1) == {"Dense_0", "head"}  # the checkpoint holds the parameter tree
    assert jax.tree.all(jax.tree.map(lambda p, q: bool(np.all(p == q)), p1, p2))
    capsys.readouterr()


def test_freeze_around_fused_keeps_frozen_bit_identical(small_cnn_data):
    from jtricks.training.transfer import freeze

    x, y = small_cnn_data
    model = MLP(features=(8, 8), num_classes=4)
    tx = freeze(fused(optax.adamw(1e-2, weight_decay=0.1)), trainable=["head/*"])
    state = create_train_state(model, tx, x[:1], jax.random.key(5))
    before = jax.tree.map(np.array, state.params)
    state, _ = fit(state, (x, y), batch_size=32, steps=8)
    for name in ("Dense_0", "Dense_1"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(state.params[name][leaf]), before[name][leaf])
    assert not np.array_equal(np.asarray(state.params["head"]["kernel"]), before["head"]["kernel"])


def test_bad_fused_config():
    from jtricks.run import TrainConfig

    with pytest.raises(ConfigError, match="fused"):
        TrainConfig(fused="yes").validate()
