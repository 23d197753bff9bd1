"""Arrays in memory as a run's dataset (`jtricks.data.in_memory`, ``train(dataset=arrays)``):
the same run as the same arrays in an ``npz`` file, named by their contents, loaded and
resumed in a process that is given them again, and bounded."""

from __future__ import annotations

import threading
from collections import OrderedDict

import jax
import numpy as np
import pytest

import jtricks
from jtricks.cli import main
from jtricks.data import Dataset, in_memory, load_dataset
from jtricks.data import memory as memory_module
from jtricks.errors import ConfigError, Interrupted

RUN = dict(model="mlp(features=(8,))", epochs=2, batch_size=25)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(260, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return {"x": x[:200], "y": y[:200], "x_test": x[200:], "y_test": y[200:]}


@pytest.fixture
def new_process(monkeypatch):
    """This process as a new one: it holds no dataset in memory."""
    monkeypatch.setattr(memory_module, "_held", OrderedDict())


def _params_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_arrays_train_as_the_same_arrays_in_a_file(arrays, tmp_path):
    np.savez(tmp_path / "d.npz", **arrays)
    from_file = jtricks.train(dataset=f"npz:{tmp_path / 'd.npz'}", **RUN)
    from_memory = jtricks.train(dataset=arrays, **RUN)
    assert from_memory.test == from_file.test
    _params_equal(from_memory.state.params, from_file.state.params)
    x, y, x_test, y_test = (arrays[k] for k in ("x", "y", "x_test", "y_test"))
    spec = in_memory(arrays)
    keras = {"x_train": x, "y_train": y, "x_test": x_test, "y_test": y_test}
    assert spec == in_memory((x, y, x_test, y_test)) == in_memory(keras)
    assert spec.startswith("memory:") and len(spec) == len("memory:") + 16
    changed = dict(arrays, x_test=x_test.copy())
    changed["x_test"][0, 0] += 1
    assert in_memory(changed) != spec  # other contents, another name
    data = Dataset("mine", x, y.astype(np.int32), x_test, y_test.astype(np.int32), 2)
    loaded = load_dataset(in_memory(data))
    assert loaded.digest() == data.digest() and in_memory(data) == spec  # the same contents


def test_a_run_folder_on_arrays_loads_in_a_new_process_without_them(arrays, tmp_path, new_process):
    result = jtricks.train(dataset=arrays, out=tmp_path / "run", **RUN)
    memory_module._held.clear()  # a new session: load_run reads the folder alone
    run = jtricks.load_run(tmp_path / "run")
    assert run.config.dataset == in_memory(dict(arrays))  # a copy: the contents name them
    np.testing.assert_array_equal(run.predict(arrays["x_test"]), result.predict(arrays["x_test"]))


class StopAfterEpochs:
    """A reporter that sets ``event`` at the end of epoch ``count``."""

    def __init__(self, event, count):
        self.event, self.count = event, count

    def start(self, **kw):
        pass

    def part_end(self, **kw):
        pass

    def epoch_end(self, record, *, done):
        if record["epoch"] == self.count:
            self.event.set()

    def close(self):
        pass


def test_an_interrupted_run_on_arrays_resumes_exactly_in_a_new_process(
    arrays, tmp_path, new_process
):
    kw = dict(RUN, epochs=3, checkpoint_every=1)
    whole = jtricks.train(dataset=arrays, **kw)
    stop = threading.Event()
    with pytest.raises(Interrupted):
        jtricks.train(
            dataset=arrays, out=tmp_path / "run", stop=stop, reporter=StopAfterEpochs(stop, 1), **kw
        )
    memory_module._held.clear()
    with pytest.raises(ConfigError, match="give it the same arrays first"):
        jtricks.train(resume=tmp_path / "run")
    in_memory(arrays)
    resumed = jtricks.train(resume=tmp_path / "run")
    _params_equal(resumed.state.params, whole.state.params)


def test_the_last_held_datasets_are_kept(arrays, new_process):
    x_test, y_test = arrays["x_test"], arrays["y_test"]
    specs = [
        in_memory(dict(arrays, x_test=x_test[: i + 1], y_test=y_test[: i + 1])) for i in range(9)
    ]
    assert len(set(specs)) == 9 and memory_module.HELD == 8
    with pytest.raises(ConfigError, match="it holds the last 8 given"):
        load_dataset(specs[0])
    assert len(load_dataset(specs[8]).y_test) == 9
    load_dataset(specs[1])  # used: now the newest, so the next one held drops specs[2]
    in_memory(arrays)
    load_dataset(specs[1])
    with pytest.raises(ConfigError):
        load_dataset(specs[2])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (5, "dataset must be a spec string, a jtricks.data.Dataset, a dict of arrays x, y, "),
        ((1, 2, 3), "or a tuple (x, y, x_test, y_test); got a tuple of 3"),
        (lambda: None, "got an object of type function"),
        ({"x": np.zeros((4, 2))}, "dataset in memory is a mapping that lacks array(s) ['y', 'x"),
        (
            {"x": np.zeros((4, 2)), "y": [0, 1, 0, 1], "x_test": np.zeros((2, 2)), "y_test": []},
            "dataset in memory: empty dataset",
        ),
    ],
)
def test_objects_that_are_no_dataset_are_refused_in_one_line(given, message, tmp_path):
    with pytest.raises(ConfigError, match="^" + "dataset") as e:
        jtricks.train(dataset=given, out=tmp_path / "run", **RUN)
    assert message in str(e.value) and e.value.param == "dataset"
    assert not (tmp_path / "run").exists()


def test_the_cli_names_what_a_memory_dataset_needs(tmp_path, capsys):
    assert main(["train", "--dataset", "memory:0123", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "names arrays held in memory" in err and "numpy.savez" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_bad_arrays_are_named_as_the_dataset_in_memory(arrays):
    x = arrays["x"].copy()
    x[3, 1] = np.nan
    with pytest.raises(ConfigError, match=r"^dataset in memory train split: features contain 1 "):
        in_memory(dict(arrays, x=x))
