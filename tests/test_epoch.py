"""The compiled epoch loop (`jtricks.training.epoch`): every loop in the compiled program
has a trip count XLA knows (``known_trip_count``), so an accelerator never asks the host
after each step; masked steps leave the state and metrics exactly as a shorter loop would."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.nn import build_model
from jtricks.optim.fused import fused
from jtricks.training import create_train_state, fit
from jtricks.training.compiled import (
    StepOptions,
    clear_caches,
    compiled_functions,
    part_program,
)
from jtricks.training.ensemble import create_ensemble
from jtricks.training.epoch import ChunkFeed, program_length
from jtricks.training.steps import pad_batches

MODEL = build_model("mlp(features=(8,))", 3)
BN_MODEL = build_model("mlp(features=(8,), norm='batch')", 3)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 5)).astype(np.float32), rng.integers(0, 3, 60)


def _whiles(compiled_text: str) -> list[tuple[str, str | None]]:
    """``(op name, known trip count or None)`` of every while loop in an HLO module."""
    out = []
    for line in compiled_text.splitlines():
        if re.search(r"\bwhile\(", line):
            name = re.search(r'op_name="([^"]*)"', line)
            count = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            out.append((name.group(1) if name else line[:80], count and count.group(1)))
    return out


def _epoch_hlo(state, data, options=None, length=6, batch_size=10, val=None) -> str:
    from jtricks.training.epoch import ArrayFeed

    program = part_program(options or StepOptions())
    x, y = (jnp.asarray(a) for a in data)
    feed = ArrayFeed((x, y), jax.random.key(1), np.int32(0), np.int32(0), batch_size)
    args = (state, np.int32(0), feed, np.int32(4), np.int32(20), val)
    return program.lower(*args, length=length, finish=True).compile().as_text()


def _check_static(text: str, steps: str) -> None:
    loops = _whiles(text)
    assert loops, "the program has no loop at all"
    unknown = [name for name, n in loops if n is None]
    assert not unknown, f"loops without a known trip count: {unknown}"
    assert steps in [n for _, n in loops], f"no loop of {steps} steps in {loops}"


@pytest.mark.parametrize("kind", ["plain", "ensemble", "accumulate", "fused", "mixup", "ema_bn"])
def test_the_epoch_loop_has_a_static_trip_count(data, kind):
    x, _ = data
    tx = fused(optax.adam(1e-2)) if kind == "fused" else optax.adam(1e-2)
    options = StepOptions(accumulate=2 if kind == "accumulate" else 1)
    if kind == "mixup":  # its Beta draw: no rejection loop (`jtricks.data.augment.beta`)
        options = StepOptions(mix=("mixup", 0.2), num_classes=3)
    if kind == "ensemble":
        state = create_ensemble(MODEL, tx, x, jax.random.split(jax.random.key(0), 2))
    elif kind == "ema_bn":  # BatchNorm statistics averaged beside the parameters
        state = create_train_state(BN_MODEL, tx, x, jax.random.key(0), ema_decay=0.9)
    else:
        state = create_train_state(MODEL, tx, x, jax.random.key(0))
    _check_static(_epoch_hlo(state, data, options), "6")


def test_validation_inside_the_epoch_is_a_static_loop_too(data):
    state = create_train_state(MODEL, optax.adam(1e-2), data[0], jax.random.key(0))
    text = _epoch_hlo(state, data, val=pad_batches(data, 25))
    _check_static(text, "3")  # 60 validation examples in 3 padded batches of 25


def test_a_streamed_chunk_has_a_static_trip_count(data):
    x, y = data
    state = create_train_state(MODEL, optax.adam(1e-2), x, jax.random.key(0))
    program = part_program(StepOptions())
    chunk = ChunkFeed((jnp.asarray(x[:40]).reshape(4, 10, 5), jnp.asarray(y[:40]).reshape(4, 10)))
    _, acc = program(state, np.int32(0), chunk, np.int32(0), np.int32(20), length=0, finish=False)
    state = create_train_state(MODEL, optax.adam(1e-2), x, jax.random.key(0))  # donated
    lowered = program.lower(state, acc, chunk, np.int32(3), np.int32(20), length=4, finish=False)
    _check_static(lowered.compile().as_text(), "4")


def test_program_length_reuses_the_epoch_program_for_long_partial_epochs():
    assert program_length(36, 36) == 36
    assert program_length(24, 36) == 36  # the demo's last epoch: 12 masked steps
    assert program_length(19, 36) == 36
    assert program_length(18, 36) == 18  # half an epoch or less: its own length
    assert program_length(1, 36) == 1
    assert program_length(4, 36, whole=True) == 36  # a call that runs whole epochs too


@pytest.mark.parametrize("ema", [False, True])
def test_masked_steps_change_nothing(data, ema):
    """A partial epoch run masked inside the full epoch's program equals the same steps
    run by a program of exactly their length: parameters, step and metrics (and a
    BatchNorm model's averaged parameters and statistics)."""
    x, y = data
    tx = optax.adam(1e-2)
    run_epoch, _ = compiled_functions(StepOptions())
    outs = []
    for length in (4, 6):  # 4 steps of an epoch of 6: exact, then masked
        model, decay = (BN_MODEL, 0.9) if ema else (MODEL, None)
        state = create_train_state(model, tx, x, jax.random.key(0), ema_decay=decay)
        out = run_epoch(
            state, (jnp.asarray(x), jnp.asarray(y)), jax.random.key(1), np.int32(0),
            np.int32(1), None, np.int32(0), np.int32(20), num_steps=np.int32(4),
            length=length, batch_size=10,
        )  # fmt: skip
        outs.append(jax.device_get(out))
    (a, ma), (b, mb) = outs
    assert int(a.step) == int(b.step) == 4
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    for name in ("ema_params", "ema_batch_stats", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, getattr(a, name), getattr(b, name))
    assert int(ma["steps_done"]) == int(mb["steps_done"]) == 4
    for k in ("loss", "accuracy", "grad_norm", "first_loss"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-6)


def test_clear_caches_forgets_the_programs(data):
    x, y = data
    state = create_train_state(MODEL, optax.adam(1e-2), x, jax.random.key(0))
    fit(state, (x, y), batch_size=10, steps=2)
    before = part_program(StepOptions())
    assert before._cache_size() >= 1
    clear_caches()
    assert part_program(StepOptions()) is not before
    assert part_program(StepOptions())._cache_size() == 0


def test_a_short_last_epoch_reuses_the_epoch_program(data, caplog):
    """6 steps per epoch: 10 steps are a full epoch and 4 masked in its program (one XLA
    compilation of the epoch); a later call of 1 step compiles its own length; a call of
    whole epochs runs its short first and last parts (1 and 2 steps) masked in the
    epoch's program, compiling nothing."""
    x, y = data
    clear_caches()
    state = create_train_state(MODEL, optax.adam(1e-2), x, jax.random.key(0))

    def epoch_compiles() -> int:
        lines = [r.getMessage() for r in caplog.records]
        return sum("XLA compilation of jit(run_part)" in m for m in lines)

    with caplog.at_level("WARNING"), jax.log_compiles(True):
        state, hist = fit(state, (x, y), batch_size=10, steps=10)
        assert [r["step"] for r in hist.records] == [6, 10] and epoch_compiles() == 1
        state, hist = fit(state, (x, y), batch_size=10, steps=1)
        assert hist.records[-1]["step"] == 11 and epoch_compiles() == 2
        state, hist = fit(state, (x, y), batch_size=10, steps=15)
        assert [r["step"] for r in hist.records] == [12, 18, 24, 26] and epoch_compiles() == 2


def test_a_users_own_step_is_masked_by_a_select(data):
    """`make_epoch_fn` with a step of the plain ``(state, batch)`` signature: steps past
    the count leave its state as a program of exactly that length does."""
    from jtricks.training.epoch import make_epoch_fn

    x, y = data

    def plain_step(state, batch):  # SGD on the mean cross-entropy, no guard, no mask
        xb, yb = batch

        def loss(p):
            logits = MODEL.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        value, grads = jax.value_and_grad(loss)(state.params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        return state.replace(step=state.step + 1, params=params), {"loss": value}

    run_epoch = make_epoch_fn(plain_step)
    got = []
    for length in (3, 6):
        state = create_train_state(MODEL, optax.sgd(0.1), x, jax.random.key(0))
        out, metrics = run_epoch(
            state, (jnp.asarray(x), jnp.asarray(y)), jax.random.key(1), np.int32(0),
            np.int32(2), None, np.int32(0), np.int32(20), num_steps=np.int32(3),
            length=length, batch_size=10,
        )  # fmt: skip
        got.append((int(out.step), jax.device_get(out.params), float(metrics["loss"])))
    (s3, p3, l3), (s6, p6, l6) = got
    assert s3 == s6 == 3 and l3 == pytest.approx(l6, rel=1e-6)
    jax.tree.map(np.testing.assert_array_equal, p3, p6)


@pytest.mark.parametrize("where", ["host", "device", "mixed"])
def test_pad_batches_cuts_and_pads_by_hand(where):
    """Evaluation batches: ``ceil(N / B)`` batches of B, the last zero-padded, weights 1
    on real examples; host, device (one compiled program) and mixed leaves alike, checked
    against a hand-written NumPy cut."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 2, 3)).astype(np.float32), rng.integers(0, 5, 7).astype(np.int32)
    put = {"host": (x, y), "device": (jnp.asarray(x), jnp.asarray(y))}
    data = put.get(where, (jnp.asarray(x), y))
    (xb, yb), w = pad_batches(data, 3)
    expect_x = np.concatenate([x, np.zeros((2, 2, 3), np.float32)]).reshape(3, 3, 2, 3)
    expect_y = np.concatenate([y, [0, 0]]).reshape(3, 3)
    np.testing.assert_array_equal(np.asarray(xb), expect_x)
    np.testing.assert_array_equal(np.asarray(yb), expect_y)
    np.testing.assert_array_equal(np.asarray(w), [[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    assert (xb.dtype, yb.dtype, w.dtype) == (np.float32, np.int32, np.float32)
    assert all(isinstance(a, jax.Array) for a in (xb, yb, w))
    (whole,), w1 = pad_batches((x[:2],), 5)  # fewer examples than a batch: one batch of N
    assert whole.shape == (1, 2, 2, 3) and np.asarray(w1).tolist() == [[1, 1]]
