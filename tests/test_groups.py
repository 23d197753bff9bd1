"""Parameter groups: the right rule and rate on the right leaf (by hand on a two-layer
model), one injected learning rate, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.optim import build_optimizer, current_learning_rate, fused
from jtricks.optim.pipeline import param_groups, parse_groups

PARAMS = {
    "Dense_0": {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.full((4,), 0.25)},
    "Dense_1": {"kernel": jnp.full((4, 2), -0.5), "bias": jnp.full((2,), 1.0)},
}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.2), PARAMS)


def _updates(tx, steps=1):
    state = tx.init(PARAMS)
    for _ in range(steps):
        updates, state = tx.update(GRADS, state, PARAMS)
    return updates, state


def test_rank_groups_by_hand():
    updates, _ = _updates(build_optimizer("matrices -> sgd ; rest x0.1 -> sgd", 0.5))
    for layer in ("Dense_0", "Dense_1"):
        np.testing.assert_allclose(updates[layer]["kernel"], -0.5 * 0.2)
        np.testing.assert_allclose(updates[layer]["bias"], -0.05 * 0.2)


def test_path_groups_by_hand_with_momentum_and_a_schedule():
    schedule = lambda base: optax.linear_schedule(base, 0.0, 10)  # noqa: E731
    tx = build_optimizer(
        "Dense_0/* -> sgd ; rest x0.5 -> momentum(gamma=0.9, form='torch')", 1.0, schedule=schedule
    )
    updates, state = _updates(tx, steps=2)
    # step 0 at lr 1.0, step 1 at lr 0.9; PyTorch's momentum: v1 = g, v2 = 0.9 g + g, w -= lr v
    np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.9 * 0.2, rtol=1e-6)
    np.testing.assert_allclose(updates["Dense_1"]["kernel"], -0.5 * 0.9 * 1.9 * 0.2, rtol=1e-6)
    # the state logs the base rate of the last step (not a group's scaled one)
    assert float(current_learning_rate(state)) == pytest.approx(0.9)


def test_muon_on_matrices_is_muon_on_the_kernels_alone():
    updates, _ = _updates(build_optimizer("matrices -> contrib.muon ; rest x0.1 -> adamw", 0.02))
    kernels = {k: {"kernel": v["kernel"]} for k, v in PARAMS.items()}
    muon = optax.contrib.muon(0.02)
    ref, _ = muon.update(
        {k: {"kernel": GRADS[k]["kernel"]} for k in PARAMS}, muon.init(kernels), kernels
    )
    for layer in PARAMS:
        np.testing.assert_allclose(updates[layer]["kernel"], ref[layer]["kernel"], rtol=1e-6)
    adam_first_step = -0.002  # Adam's first update is -lr * sign(g)
    np.testing.assert_allclose(updates["Dense_0"]["bias"], adam_first_step, rtol=1e-4)


def test_python_api_takes_transformations_and_specs():
    tx = param_groups([("*/kernel", optax.sgd(1.0), 0.1), ("rest", "sgd")], 0.3)
    updates, _ = _updates(tx)
    np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * 0.2, rtol=1e-6)
    np.testing.assert_allclose(updates["Dense_1"]["bias"], -0.3 * 0.2, rtol=1e-6)


def test_parse_groups():
    assert parse_groups("matrices -> contrib.muon(ns_steps=3) ; rest x0.1 -> adamw | l2(1e-4)") == [
        ("matrices", "contrib.muon(ns_steps=3)", 1.0),
        ("rest", "adamw | l2(1e-4)", 0.1),
    ]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("matrices -> sgd", "'Dense_0/bias' .* is in no parameter group"),
        ("Dense_9/* -> sgd ; rest -> sgd", "'Dense_9/\\*' matches no parameter; paths look like"),
        ("rest -> sgd ; matrices -> sgd", "must be last"),
        ("matrices -> sgd ; matrices -> adam ; rest -> sgd", "repeat"),
        ("matrices y2 -> sgd ; rest -> sgd", "written xSCALE"),
        ("matrices x0 -> sgd ; rest -> sgd", "must be a number > 0"),
        ("matrices -> sgd(lr=0.1) ; rest -> sgd", "rate multiplier instead"),
        ("matrices -> ; rest -> sgd", "cannot parse parameter group"),
        ("matrices -> nope ; rest -> sgd", "unknown optimizer or transform 'nope'"),
    ],
)
def test_bad_groups(spec, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_optimizer(spec, 0.1).init(PARAMS)
    assert e.value.param == "optimizer"


def test_fused_refuses_groups_clearly():
    with pytest.raises(ConfigError, match="parameter groups cannot be fused"):
        fused(build_optimizer("matrices -> sgd ; rest -> adam", 0.1)).init(PARAMS)


def test_groups_inside_freeze_train_only_the_trainable_part():
    from jtricks.training.transfer import freeze

    tx = freeze(build_optimizer("matrices -> sgd ; rest -> sgd", 1.0), frozen=["Dense_0/*"])
    updates, _ = _updates(tx)
    assert float(jnp.abs(updates["Dense_0"]["kernel"]).max()) == 0.0
    np.testing.assert_allclose(updates["Dense_1"]["kernel"], -0.2)


def test_cli_trains_groups_and_validates_on_the_eval_params(tmp_path, capsys):
    """Schedule-free AdamW on the matrices, Adam at half the rate on the rest, from the CLI;
    with --eval-params train the same run validates on the training iterate instead."""
    import json

    from jtricks.cli import main

    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(60, 6)).astype(np.float32),
        "y": rng.integers(0, 3, 60),
        "x_test": rng.normal(size=(20, 6)).astype(np.float32),
        "y_test": rng.integers(0, 3, 20),
    }
    np.savez(tmp_path / "data.npz", **arrays)
    spec = "matrices -> contrib.schedule_free_adamw ; rest x0.5 -> adam"
    summaries = {}
    for source in ("auto", "train"):
        out = tmp_path / source
        args = [
            "train",
            "--dataset",
            f"npz:{tmp_path / 'data.npz'}",
            "--model",
            "mlp(features=(4,))",
        ]
        args += ["--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--optimizer", spec]
        args += ["--eval-params", source, "--out", str(out), "--no-progress"]
        assert main(args) == 0, capsys.readouterr().err
        summaries[source] = json.loads((out / "summary.json").read_text())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["lr"] == pytest.approx(0.01)  # the base rate
        summaries[source]["train_loss"] = records[-1]["train_loss"]
    assert summaries["auto"]["val_loss"] != summaries["train"]["val_loss"]
    assert summaries["auto"]["train_loss"] == summaries["train"]["train_loss"]  # same training
