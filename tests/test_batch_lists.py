"""Lists, tuples and re-iterable loaders of batches are training and validation data for
any number of epochs: the same parameters as a hand loop of the train step over the
batches in order; a shorter last batch left out of training and read by evaluation; a
one-shot iterator's error names what works, and what it names works."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jtricks.data.stream import is_batch_sequence
from jtricks.errors import ConfigError, StreamError
from jtricks.nn import build_model
from jtricks.training import create_train_state, evaluate, fit, make_train_step

RNG = np.random.default_rng(0)
X = RNG.normal(size=(230, 6)).astype(np.float32)
Y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(np.int32)
BATCHES = [(X[i : i + 32], Y[i : i + 32]) for i in range(0, 230, 32)]  # 7 of 32, then 6
MODEL = build_model("mlp(features=(8,))", 2)
TX = optax.adam(1e-2)


def fresh():
    return create_train_state(MODEL, TX, X[:1], jax.random.key(0))


class Loader:
    """A torch-style loader: ``iter()`` restarts it; ``len()`` its batches per pass."""

    def __init__(self, batches, sized=True):
        self.batches, self.sized = batches, sized

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        if not self.sized:
            raise TypeError("no len")
        return len(self.batches)


class TorchLoader(Loader):
    """A loader with `torch.utils.data.DataLoader`'s attributes (``drop_last=False``)."""

    def __init__(self, batches, batch_size, num_examples):
        super().__init__(batches)
        self.batch_size, self.drop_last, self.dataset = batch_size, False, range(num_examples)


def _equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_list_of_batches_trains_as_a_hand_loop_over_them_in_order():
    state, history = fit(fresh(), BATCHES, epochs=3)
    assert int(state.step) == 21 and len(history.records) == 3  # 7 full batches a pass
    step = jax.jit(make_train_step(task="classification"))
    hand = fresh()
    for _ in range(3):
        for batch in BATCHES[:7]:  # the shorter last batch is left out of training
            hand, _ = step(hand, batch)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
        state.params,
        hand.params,
    )
    same, _ = fit(fresh(), tuple(BATCHES[:7]), epochs=3)  # a tuple, without the short batch
    _equal(same.params, state.params)
    loader, _ = fit(fresh(), Loader(BATCHES[:7]), epochs=3)  # a re-iterable with len()
    _equal(loader.params, state.params)


def test_validation_on_a_list_reads_every_example_including_a_shorter_last_batch():
    _, history = fit(fresh(), BATCHES, epochs=1, val_data=BATCHES)
    # the state after one epoch, again, evaluated on the concatenated arrays
    state, _ = fit(fresh(), BATCHES, epochs=1)
    whole = evaluate(state, (X, Y))
    record = history.records[-1]
    np.testing.assert_allclose(record["val_loss"], whole["loss"], rtol=1e-5)
    np.testing.assert_allclose(record["val_accuracy"], whole["accuracy"], rtol=1e-6)
    listed = evaluate(state, BATCHES)
    np.testing.assert_allclose(listed["loss"], whole["loss"], rtol=1e-5)


def test_arrays_stay_arrays_and_lists_of_batches_are_told_apart():
    assert is_batch_sequence(BATCHES) and is_batch_sequence(tuple(BATCHES[:1]))
    assert not is_batch_sequence((X, Y))  # one pytree of arrays
    assert not is_batch_sequence([X, Y])
    assert not is_batch_sequence(((X, X), Y))  # two inputs and a target
    assert not is_batch_sequence([(X, Y), (X[:, :3], Y)])  # unlike batches: not a list of them
    state, _ = fit(fresh(), (X, Y), batch_size=32, epochs=1)
    assert int(state.step) == 230 // 32


def test_a_loaders_shorter_last_batch_is_left_out_of_training_as_a_lists_is():
    listed, history = fit(fresh(), BATCHES, epochs=3)
    torch_like, t_history = fit(fresh(), TorchLoader(BATCHES, 32, 230), epochs=3)
    _equal(torch_like.params, listed.params)  # its len() 8 less the short batch: 7 a pass
    assert [r["step"] for r in t_history.records] == [r["step"] for r in history.records]
    with pytest.warns(UserWarning, match=r"left out of training.*give steps_per_epoch=7"):
        fit(fresh(), Loader(BATCHES), epochs=2)  # an epoch of len() = 8 runs into the next pass
    told, _ = fit(fresh(), Loader(BATCHES), epochs=3, steps_per_epoch=7)
    _equal(told.params, listed.params)
    middle = Loader([BATCHES[0], (X[:10], Y[:10]), BATCHES[1]])
    with pytest.raises(StreamError, match="batch 2 of its pass holds 10 examples, the first 32"):
        fit(fresh(), middle, epochs=1)


def test_a_batch_in_the_middle_of_another_size_is_refused_by_index():
    ragged = [BATCHES[0], (X[:10], Y[:10]), BATCHES[1]]
    with pytest.raises(ConfigError, match="batch 1 of the list holds 10 examples, the first 32"):
        fit(fresh(), ragged, epochs=1)


def test_a_one_shot_iterator_error_names_what_works_and_it_works():
    with pytest.raises(
        ConfigError,
        match=r"give steps=<total steps> to read it once \(with steps_per_epoch=.*or the batches as a list",
    ) as e:
        fit(fresh(), iter(BATCHES[:7]), epochs=2)
    assert "steps_per_epoch" in str(e.value.param)
    once, _ = fit(fresh(), iter(BATCHES[:7]), steps=7)
    listed, _ = fit(fresh(), BATCHES[:7], epochs=1)
    _equal(once.params, listed.params)
    with pytest.raises(ConfigError, match=r"give steps_per_epoch=<batches per pass>"):
        fit(fresh(), Loader(BATCHES[:7], sized=False), epochs=2)
    unsized, _ = fit(fresh(), Loader(BATCHES[:7], sized=False), epochs=3, steps_per_epoch=7)
    three, _ = fit(fresh(), BATCHES, epochs=3)
    _equal(unsized.params, three.params)
