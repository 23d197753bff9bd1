"""Transfer learning keeps BatchNorm: `load_pretrained` brings the matched layers'
``batch_stats``; `freeze` + `freeze_batch_stats` keep a loaded backbone bit-identical;
``jtricks train --pretrained --finetune`` freezes the backbone's statistics, says what it
loaded, and resumes exactly."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jtricks.cli import main
from jtricks.errors import ConfigError
from jtricks.nn import build_model
from jtricks.training import create_train_state, evaluate, fit
from jtricks.training.checkpoint import list_checkpoints, save
from jtricks.training.ensemble import create_ensemble
from jtricks.training.transfer import (
    describe_loaded,
    freeze,
    freeze_batch_stats,
    load_pretrained,
)

BN_MLP = "mlp(features=(8, 8), norm='batch')"


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    """A BatchNorm MLP trained long enough that its running statistics are far from
    (mean 0, variance 1), saved as a run folder's checkpoint."""
    x, y = tiny_data.x_train * 3.0 + 2.0, tiny_data.y_train
    state = create_train_state(build_model(BN_MLP, 4), optax.adam(1e-2), x, jax.random.key(0))
    state, _ = fit(state, (x, y), batch_size=20, epochs=3, data_key=jax.random.key(1))
    folder = tmp_path_factory.mktemp("pretrained")
    save(folder / "checkpoints", "epoch-000003", state, {"epoch": 3})
    return state, folder, (x, y)


def test_a_same_architecture_reload_brings_batch_stats_and_evaluates_identically(pretrained):
    src, folder, (x, y) = pretrained
    assert np.abs(np.asarray(src.batch_stats["Norm_0"]["mean"])).max() > 0.5
    fresh = create_train_state(build_model(BN_MLP, 4), optax.sgd(0.1), x, jax.random.key(7))
    new, info = load_pretrained(fresh, folder)
    assert info["kept"] == [] and info["stats_kept"] == []
    assert sorted(info["stats_loaded"]) == [
        "Norm_0/mean",
        "Norm_0/var",
        "Norm_1/mean",
        "Norm_1/var",
    ]
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, src.batch_stats)
    assert evaluate(new, (x, y)) == evaluate(src, (x, y))
    without = fresh.replace(params=new.params)  # what the loader did before: fresh statistics
    assert evaluate(without, (x, y))["loss"] != evaluate(src, (x, y))["loss"]
    assert describe_loaded(info) == (
        "pretrained: parameters of 5 layer(s) loaded (Dense_0, Dense_1, Norm_0, Norm_1, head)"
        ", batch_stats of 2 (Norm_0, Norm_1); no new layer"
    )


def test_a_new_head_keeps_its_initialisation_and_is_named_new(pretrained):
    src, folder, (x, _) = pretrained
    other = create_train_state(build_model(BN_MLP, 7), optax.sgd(0.1), x, jax.random.key(7))
    new, info = load_pretrained(other, folder)
    assert sorted(info["kept"]) == ["head/bias", "head/kernel"]
    np.testing.assert_array_equal(new.params["head"]["kernel"], other.params["head"]["kernel"])
    np.testing.assert_array_equal(
        new.batch_stats["Norm_1"]["var"], src.batch_stats["Norm_1"]["var"]
    )
    line = describe_loaded(info)
    assert line.endswith("; new: head") and "batch_stats of 2 (Norm_0, Norm_1)" in line


def test_a_layer_loads_whole_or_keeps_its_initialisation(pretrained):
    """Another input width: the first layer's kernel has another shape and its bias the
    same; the layer stays fresh as a whole (not a saved bias beside a random kernel), and
    the layers after it load."""
    src, folder, (x, _) = pretrained
    wider = np.concatenate([x, x[:, :4]], axis=1)  # 20 features against the saved 16
    fresh = create_train_state(build_model(BN_MLP, 4), optax.sgd(0.1), wider, jax.random.key(7))
    new, info = load_pretrained(fresh, folder)
    assert sorted(info["kept"]) == ["Dense_0/bias", "Dense_0/kernel"]
    jax.tree.map(np.testing.assert_array_equal, new.params["Dense_0"], fresh.params["Dense_0"])
    assert not np.array_equal(new.params["Dense_0"]["bias"], src.params["Dense_0"]["bias"])
    for layer in ("Norm_0", "Dense_1", "head"):
        jax.tree.map(np.testing.assert_array_equal, new.params[layer], src.params[layer])
    assert describe_loaded(info).endswith("; new: Dense_0")


def test_every_member_of_stacked_states_loads_and_the_ema_starts_from_the_loaded(pretrained):
    """Stacked states (an ensemble, a search's trials): the checkpoint goes to every member,
    each keeps its own new head; the optimizer state is each member's fresh one; an EMA
    starts from the loaded parameters, not from the random ones it was created with."""
    src, folder, (x, _) = pretrained
    keys = jax.random.split(jax.random.key(7), 3)
    model, tx = build_model(BN_MLP, 7), optax.adam(1e-2)
    states = create_ensemble(model, tx, x, keys, ema_decay=0.9)
    new, info = load_pretrained(states, folder)
    assert sorted(info["kept"]) == ["head/bias", "head/kernel"] and len(info["loaded"]) == 8
    for i in range(3):
        member = jax.tree.map(lambda a, i=i: a[i], new)
        one = create_train_state(model, tx, x, keys[i])
        np.testing.assert_array_equal(member.params["head"]["kernel"], one.params["head"]["kernel"])
        np.testing.assert_array_equal(
            member.params["Dense_1"]["kernel"], src.params["Dense_1"]["kernel"]
        )
        np.testing.assert_array_equal(
            member.batch_stats["Norm_0"]["mean"], src.batch_stats["Norm_0"]["mean"]
        )
        jax.tree.map(np.testing.assert_array_equal, member.ema_params, member.params)
        jax.tree.map(np.testing.assert_array_equal, member.ema_batch_stats, src.batch_stats)
        jax.tree.map(np.testing.assert_array_equal, member.opt_state, tx.init(member.params))
    single, _ = load_pretrained(create_train_state(model, tx, x, keys[0], ema_decay=0.9), folder)
    jax.tree.map(np.testing.assert_array_equal, single.ema_params, single.params)
    jax.tree.map(np.testing.assert_array_equal, single.ema_batch_stats, src.batch_stats)


def test_an_ensembles_checkpoint_loads_member_by_member_or_is_refused(pretrained, tmp_path):
    _, _, (x, _) = pretrained
    model, tx = build_model(BN_MLP, 4), optax.sgd(0.1)
    saved = create_ensemble(model, tx, x, jax.random.split(jax.random.key(1), 2))
    save(tmp_path / "checkpoints", "epoch-000001", saved, {"epoch": 1})
    into = create_ensemble(model, tx, x, jax.random.split(jax.random.key(2), 2))
    new, info = load_pretrained(into, tmp_path)
    assert info["kept"] == [] and np.shape(new.step) == (2,)
    jax.tree.map(np.testing.assert_array_equal, new.params, saved.params)
    for other in (
        create_train_state(model, tx, x, jax.random.key(0)),
        create_ensemble(model, tx, x, jax.random.split(jax.random.key(2), 3)),
    ):
        with pytest.raises(
            ConfigError, match="holds an ensemble of 2 members; it loads into --ensemble 2"
        ):
            load_pretrained(other, tmp_path)


def test_freeze_and_freeze_batch_stats_keep_the_loaded_backbone_bit_identical(pretrained):
    _, folder, (x, y) = pretrained
    backbone = ["Dense_0", "Norm_0", "Dense_1", "Norm_1"]
    tx = freeze(optax.adam(1e-2), trainable=["head/*"])
    state = create_train_state(build_model(BN_MLP, 4), tx, x, jax.random.key(3))
    state, _ = load_pretrained(state, folder)
    state = freeze_batch_stats(state, trainable=["head/*"])
    before = jax.tree.map(np.array, (state.params, state.batch_stats))
    tuned, _ = fit(state, (x, y), batch_size=20, epochs=2, data_key=jax.random.key(4))
    for layer in backbone:
        jax.tree.map(
            np.testing.assert_array_equal, tuned.params.get(layer, {}), before[0].get(layer, {})
        )
        jax.tree.map(
            np.testing.assert_array_equal,
            tuned.batch_stats.get(layer, {}),
            before[1].get(layer, {}),
        )
    assert not np.array_equal(tuned.params["head"]["kernel"], before[0]["head"]["kernel"])


def _final(run):
    ck = ocp.StandardCheckpointer()
    last = list_checkpoints(run / "checkpoints")[-1]
    arrays = ck.restore((last / "state").absolute())
    ck.close()
    return last.name, arrays


def test_cli_finetune_freezes_statistics_says_what_it_loaded_and_resumes_exactly(
    pretrained, tiny_data, tmp_path, capsys
):
    src, folder, _ = pretrained
    shutil.copytree(folder, tmp_path / "pre")
    (tmp_path / "pre" / "config.json").write_text("{}")
    args = [
        "train",
        "--dataset",
        "synthetic(num_train=200, num_test=60, shape=(16,), num_classes=4, noise=0.5)",
        "--model",
        BN_MLP,
        "--batch-size",
        "20",
        "--epochs",
        "4",
        "--checkpoint-every",
        "2",
        "--no-progress",
        "--pretrained",
        str(tmp_path / "pre"),
        "--finetune",
        "head",
    ]
    full = tmp_path / "full"
    assert main([*args, "--out", str(full)]) == 0
    err = capsys.readouterr().err
    assert "jtricks: pretrained: parameters of 5 layer(s) loaded" in err
    assert "batch_stats of 2 (Norm_0, Norm_1)" in err
    name, arrays = _final(full)
    assert name == "epoch-000004"
    for layer in ("Norm_0", "Norm_1"):  # the frozen backbone kept the pretrained statistics
        jax.tree.map(
            np.testing.assert_array_equal, arrays["batch_stats"][layer], src.batch_stats[layer]
        )
    jax.tree.map(np.testing.assert_array_equal, arrays["params"]["Dense_1"], src.params["Dense_1"])
    part = tmp_path / "part"  # the same run cut after epoch 2, resumed
    shutil.copytree(full, part)
    (part / "summary.json").unlink()
    for ck in list_checkpoints(part / "checkpoints"):
        if ck.name != "epoch-000002":
            shutil.rmtree(ck)
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    assert "pretrained:" not in capsys.readouterr().err  # a resume restores, loads nothing
    resumed = _final(part)[1]
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], arrays["params"])
    jax.tree.map(np.testing.assert_array_equal, resumed["batch_stats"], arrays["batch_stats"])
    summary = json.loads((part / "summary.json").read_text())
    assert (
        summary["test_accuracy"] == json.loads((full / "summary.json").read_text())["test_accuracy"]
    )


def test_cli_refuses_a_finetune_that_freezes_a_layer_the_checkpoint_lacks(
    pretrained, tmp_path, capsys
):
    """20 input features against the checkpoint's 16: ``--finetune head`` would freeze a
    random first layer; refused in one line, no run folder; ``all`` trains it."""
    _, folder, _ = pretrained
    shutil.copytree(folder, tmp_path / "pre")
    (tmp_path / "pre" / "config.json").write_text("{}")
    data = "synthetic(num_train=200, num_test=60, shape=(20,), num_classes=4, noise=0.5)"
    args = ["train", "--dataset", data, "--model", BN_MLP, "--batch-size", "20", "--epochs", "1"]
    args += ["--no-progress", "--pretrained", str(tmp_path / "pre")]
    for preset in ("head", "last:3"):
        out = tmp_path / preset.replace(":", "")
        assert main([*args, "--finetune", preset, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"finetune={preset!r} freezes Dense_0, which" in err and "Traceback" not in err
        assert not out.exists()
    assert main([*args, "--finetune", "all", "--out", str(tmp_path / "all")]) == 0
    assert "; new: Dense_0" in capsys.readouterr().err
