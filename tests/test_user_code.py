"""A user's own code by import path from the CLI: ``--model module:factory(args)`` (Linen
and NNX) trains, and every way user code can fail (for models and optimizers alike) is
one line with exit status 2 and no run folder (`jtricks.imports`)."""

from __future__ import annotations

import json
import math

import pytest

from jtricks.cli import main

USER_CODE = """
import flax.linen as nn
import jax.numpy as jnp
import optax
from flax import nnx


class Net(nn.Module):
    num_classes: int = 10
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class SowNet(nn.Module):  # sow's 'intermediates' are filled by init, not carried
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(8)(x))
        self.sow("intermediates", "hidden", x)
        return nn.Dense(self.num_classes)(x)


class Counter(nn.Module):  # running state outside 'batch_stats'
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        seen = self.variable("counters", "seen", lambda: jnp.zeros((), jnp.int32))
        if train:
            seen.value += x.shape[0]
        return nn.Dense(self.num_classes)(x)


class NNXNet(nnx.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, width, rngs=rngs)
        self.norm = nnx.BatchNorm(width, rngs=rngs)
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def not_a_model(num_classes):
    return "a string"


def raises(num_classes):
    raise RuntimeError("the factory broke")


def scaled(lr=1e-3):  # computes with its rate: the CLI's schedule must reach it as a number
    return optax.chain(optax.scale_by_adam(), optax.scale(-lr))


def arrays(n=90):  # a dataset of the user's: plain arrays, as their own reader gives them
    import numpy as np

    rng = np.random.default_rng(5)
    x = rng.normal(size=(n + 30, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}  # or x, y


def no_test_split():
    return {key: value for key, value in arrays().items() if not key.endswith("_test")}
"""

TINY = ["--dataset", "synthetic(num_train=120, num_test=40, shape=(8,), num_classes=3)"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(USER_CODE)
    (tmp_path / "raising_module.py").write_text("raise RuntimeError('broken at import')\n")
    (tmp_path / "syntax_module.py").write_text("def make(:\n")
    (tmp_path / "exiting_module.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)  # found from the working directory, as `python -m` would
    return tmp_path


@pytest.mark.parametrize(
    ("model", "optimizer", "num_params", "lr"),
    [
        # 8 features -> 8 -> 3 classes: 8*8 + 8 + 8*3 + 3
        ("user_models:Net(width=8)", "adam", 99, 1e-2),
        ("user_models:SowNet", "adam", 99, 1e-2),
        # 8 -> 16 (+ BatchNorm scale and bias) -> 3: 8*16 + 16 + 2*16 + 16*3 + 3
        ("user_models:NNXNet", "user_models:scaled(lr=3e-3)", 227, 3e-3),
    ],
    ids=["linen", "linen-sow", "nnx-and-own-optimizer"],
)
def test_a_users_model_trains_from_the_cli(user_dir, model, optimizer, num_params, lr):
    out = user_dir / "run"
    argv = ["train", *TINY, "--model", model, "--optimizer", optimizer, "--epochs", "3"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_params"] == num_params  # the user's model, counted by hand
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == pytest.approx(lr)
    assert records[-1]["train_loss"] < records[0]["initial_loss"]  # it trained
    assert model in (out / "config.json").read_text()


def test_an_nnx_users_model_trains_an_ensemble_and_a_search(user_dir, capsys):
    """Members and trials of an NNX model each get their own initialisation (the members
    were identical copies of the one built module; a search was an AssertionError)."""
    import jtricks
    from jtricks.search import SearchSettings, search

    settings = dict(dataset=TINY[1], model="user_models:NNXNet", epochs=2)
    result = jtricks.train(**settings, ensemble=2)
    assert result.test["member_loss"][0] != result.test["member_loss"][1]
    config = jtricks.TrainConfig(**settings)
    found = search(config, SearchSettings("lr=choice(0.01, 0.01)", 2, "grid", 2, "loss"))
    first, second = (r["score"] for r in found.records)  # one rate: the inits differ
    assert first != second and math.isfinite(first)


def test_a_users_dataset_trains_as_the_same_arrays_in_an_npz_file(user_dir, capsys):
    """``--dataset module:factory(args)``: the user's arrays train exactly as the same
    arrays written to an ``npz:`` file (a second path), with the factory's arguments; both
    read the training split under its ``x_train``, ``y_train`` names."""
    import sys

    import numpy as np

    sys.path.insert(0, str(user_dir))
    try:
        import user_models
    finally:
        sys.path.remove(str(user_dir))
    np.savez(user_dir / "same.npz", **user_models.arrays(n=60))
    summaries = []
    for spec in ("user_models:arrays(n=60)", f"npz:{user_dir / 'same.npz'}"):
        out = user_dir / f"run{len(summaries)}"
        argv = ["train", "--dataset", spec, "--model", "mlp(features=(8,))", "--epochs", "2"]
        assert main([*argv, "--batch-size", "10", "--no-progress", "--out", str(out)]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    mine, npz = summaries
    assert mine["test_loss"] == npz["test_loss"] and mine["steps"] == 2 * 54 // 10
    capsys.readouterr()


@pytest.mark.parametrize(
    ("flag", "spec", "message"),
    [
        ("--dataset", "user_models:not_a_model(3)", "returned str; return a jtricks.data.Dataset"),
        ("--dataset", "user_models:no_test_split", "a mapping that lacks array(s) ['x_test', 'y_"),
        ("--dataset", "user_models:arrays(m=3)", "unexpected keyword argument 'm'"),
        ("--model", "user_models:Missing", "user_models has no 'Missing'"),
        ("--model", "user_models:not_a_model", "returned str, not a Flax Linen or NNX module"),
        ("--model", "user_models:raises", "failed: RuntimeError: the factory broke"),
        ("--model", "user_models:Net(depth=3)", "unexpected keyword argument 'depth'"),
        ("--model", "nowhere:Net", "cannot import module 'nowhere'"),
        ("--model", "user_models:Counter", "collection(s) 'counters', which a TrainState does"),
        ("--model", "raising_module:Net", "RuntimeError: broken at import"),
        ("--optimizer", "raising_module:make", "RuntimeError: broken at import"),
        ("--optimizer", "syntax_module:make", "SyntaxError"),
        ("--optimizer", "exiting_module:make", "it called sys.exit(0)"),
        ("--optimizer", "user_models:raises", "failed: RuntimeError: the factory broke"),
    ],
)
def test_user_code_that_fails_is_one_line(user_dir, capsys, flag, spec, message):
    out = user_dir / "bad"
    status = main(["train", *TINY, flag, spec, "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
