"""The checkpointing callback on orbax's CheckpointManager: keep-last-N, the lazily written
best epoch, replacement of later epochs, and a layout that plain orbax reads back."""

from __future__ import annotations

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jtricks.nn import MLP
from jtricks.training import Checkpointer, create_train_state
from jtricks.training.checkpoint import (
    CheckpointError,
    EpochNames,
    best_checkpoint,
    list_checkpoints,
    read_meta,
    restore,
    restore_latest,
    verify,
)


@pytest.fixture(scope="module")
def states():
    """Epoch ``e``'s state: the initial parameters plus ``e``, so each one is recognisable."""
    state = create_train_state(
        MLP(num_classes=2, features=(3,)), optax.sgd(0.1), np.zeros((1, 4)), jax.random.key(0)
    )
    return {
        e: state.replace(params=jax.tree.map(lambda p, e=e: p + e, state.params)) for e in range(6)
    }


def _run(ckpt: Checkpointer, states, losses: dict[int, float]) -> None:
    for epoch, loss in losses.items():
        ckpt.on_epoch_end({"epoch": epoch, "step": 10 * epoch, "val_loss": loss}, states[epoch])
    ckpt.on_train_end(states[max(losses)])


def _plain_orbax(path):
    """Read a checkpoint with orbax alone (no jtricks code on this path)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(
            path.absolute(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
    return out["state"], out["meta"]


def _kernel(tree) -> np.ndarray:
    return np.asarray(tree["params"]["head"]["kernel"])


def test_keeps_the_last_n_and_the_best_in_an_orbax_layout(tmp_path, states, caplog):
    ckpt = Checkpointer(tmp_path, every=2, keep=2)
    _run(ckpt, states, {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 4.0})
    # saved at 2 and 4 (every 2) and 5 (the end); orbax kept the newest two
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000004", "epoch-000005"]
    # the best (epoch 4, val 0.5) replaced epoch 2's; orbax kept one
    assert [p.name for p in list_checkpoints(tmp_path / "best")] == ["epoch-000004"]
    assert best_checkpoint(tmp_path) == tmp_path / "best" / "epoch-000004"
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    # a folder of checkpoints restores its newest: best/ its one, the run's folder epoch 5
    for folder, epoch in [(tmp_path / "best", 4), (tmp_path, 5)]:
        with caplog.at_level("WARNING"):
            restored, meta = restore(folder, states[0])
        assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]
        assert meta["epoch"] == epoch
        np.testing.assert_array_equal(
            _kernel({"params": restored.params}), _kernel({"params": states[epoch].params})
        )
    for path, epoch in [(tmp_path / "epoch-000005", 5), (tmp_path / "best" / "epoch-000004", 4)]:
        verify(path)
        arrays, meta = _plain_orbax(path)
        want = _kernel({"params": states[epoch].params})
        np.testing.assert_array_equal(_kernel(arrays), want)
        assert meta == read_meta(path)
        assert meta["epoch"] == epoch and meta["step"] == 10 * epoch
        assert [r["epoch"] for r in meta["history"]] == list(range(1, epoch + 1))
    # orbax's own manager lists the same steps through jtricks' name format
    options = ocp.CheckpointManagerOptions(step_name_format=EpochNames(), read_only=True)
    with ocp.CheckpointManager(tmp_path.absolute(), options=options) as manager:
        assert list(manager.all_steps()) == [4, 5]


def test_relative_paths_restore_as_absolute_ones(tmp_path, states, monkeypatch):
    """``jtricks train --resume runs/a``: orbax reads no array metadata from a relative
    path, which once made every checkpoint "not match the model"."""
    _run(Checkpointer(tmp_path / "runs" / "a", background=False), states, {1: 1.0, 2: 0.5})
    monkeypatch.chdir(tmp_path)
    for restored, _ in [
        restore_latest("runs/a", states[0]),
        restore("runs/a/epoch-000002", states[0]),
        restore("runs/a/best", states[0]),
    ]:
        np.testing.assert_array_equal(
            _kernel({"params": restored.params}), _kernel({"params": states[2].params})
        )


def test_the_manifest_names_an_altered_metadata_file(tmp_path, states):
    _run(Checkpointer(tmp_path, background=False), states, {1: 1.0})
    meta = tmp_path / "epoch-000001" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"epoch": 1', '"epoch": 7'))
    with pytest.raises(CheckpointError, match=f"file {meta} is corrupt"):
        verify(tmp_path / "epoch-000001")


def test_saving_an_epoch_replaces_the_later_ones_of_an_abandoned_run(tmp_path, states):
    _run(Checkpointer(tmp_path, keep=5, background=False), states, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    # a resumed run that continues from epoch 2 rewrites epochs 3 and 4
    again = Checkpointer(tmp_path, keep=5, background=False)
    again.records = [{"epoch": e, "step": 10 * e, "val_loss": 1.0} for e in (1, 2)]
    _run(again, states, {3: 0.5})
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch-000001",
        "epoch-000002",
        "epoch-000003",
    ]
    assert [p.name for p in list_checkpoints(tmp_path / "best")] == ["epoch-000003"]
    np.testing.assert_array_equal(
        _kernel(_plain_orbax(tmp_path / "epoch-000003")[0]), _kernel({"params": states[3].params})
    )


def test_an_exception_in_fit_waits_for_the_checkpoint_in_flight(tmp_path):
    """A callback that raises after the background write of epoch 2 began: fit waits for
    that write and releases orbax's threads before the error propagates."""
    from jtricks.training import fit

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 2, 40)
    state = create_train_state(
        MLP(num_classes=2, features=(3,)), optax.sgd(0.1), x, jax.random.key(0)
    )

    class Boom:
        def on_epoch_end(self, record, state):
            if record["epoch"] == 2:
                raise RuntimeError("boom")

    ckpt = Checkpointer(tmp_path, every=1, keep=5, monitor=None, background=True)
    with pytest.raises(RuntimeError, match="boom"):
        fit(state, (x, y), batch_size=10, epochs=4, callbacks=[ckpt, Boom()])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000001", "epoch-000002"]
    assert not ckpt._managers  # closed: no orbax thread keeps the process alive
