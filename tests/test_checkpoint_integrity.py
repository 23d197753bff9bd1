"""A checkpoint cannot lie: every byte of it is covered by a complete manifest, its
metadata is checked, a damaged newest checkpoint falls back to an intact one (one
warning) and nothing damaged restores; a resumed run's config is the one it started
with (`jtricks.run.resume`)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jtricks.cli import main
from jtricks.nn import MLP
from jtricks.training import create_train_state
from jtricks.training.checkpoint import (
    RUN_META,
    CheckpointError,
    list_checkpoints,
    restore,
    restore_latest,
    save,
    verify,
    write_manifest,
)

MODEL = MLP(num_classes=3, features=(4,))
TX = optax.adam(1e-2)


def _state(seed: int):
    return create_train_state(MODEL, TX, np.ones((1, 5), np.float32), jax.random.key(seed))


def _leaves(state) -> list[np.ndarray]:
    out = []
    for a in jax.tree.leaves(state):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        out.append(np.asarray(a))
    return out


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """``checkpoints/`` with epoch 1 (state of seed 1) and epoch 2 (seed 2), and the
    intact states, as host copies."""
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    states = {}
    for epoch in (1, 2):
        state = _state(epoch)
        states[epoch] = jax.tree.map(np.array, _leaves(state))
        meta = {"epoch": epoch, "step": epoch * 10, "history": [{"epoch": epoch}]}
        save(root, f"epoch-{epoch:06d}", state, meta)
    return root, states


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_anywhere_never_restores_changed_weights(two_checkpoints, tmp_path):
    """Every file of the newest checkpoint, a byte flipped at its start, middle and end in
    turn: the restore is bit-identical to the intact newest state (a byte nothing reads)
    or to the intact previous one (the damaged checkpoint named in one warning)."""
    root, states = two_checkpoints
    newest = list_checkpoints(root)[-1]
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert Path("manifest.json") in files and Path("meta/metadata") in files
    outcomes = set()
    for rel in files:
        size = (newest / rel).stat().st_size
        for at in sorted({0, size // 2, size - 1}):
            trial = tmp_path / f"{str(rel).replace('/', '_')}-{at}"
            shutil.copytree(root, trial)
            _flip(trial / newest.name / rel, at)
            warnings: list[str] = []
            state, meta = restore_latest(trial, _state(0), log=warnings.append, required=RUN_META)
            got = _leaves(state)
            if all(np.array_equal(x, y) for x, y in zip(got, states[2], strict=True)):
                outcomes.add("newest")
                assert meta["epoch"] == 2
            else:
                assert all(np.array_equal(x, y) for x, y in zip(got, states[1], strict=True))
                assert meta["epoch"] == 1 and len(warnings) == 1
                assert "skipped 1 damaged checkpoint(s), restored epoch-000001" in warnings[0]
                assert str(rel.name) in warnings[0] or "manifest" in warnings[0]
                outcomes.add("previous")
            shutil.rmtree(trial)
    assert "previous" in outcomes  # the data files are covered


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({}, "manifest .* is damaged"),
        ([], "manifest .* is damaged"),
        ({"meta/metadata": "abc"}, "manifest .* is damaged"),
        ({"meta/metadata": {"size": 1}}, "manifest .* is damaged"),
        ({"../x": {"size": 1, "sha256": "0" * 64}}, "manifest .* is damaged"),
    ],
)
def test_an_incomplete_or_malformed_manifest_is_damage(
    two_checkpoints, tmp_path, manifest, message
):
    root, _ = two_checkpoints
    trial = tmp_path / "c"
    shutil.copytree(list_checkpoints(root)[-1], trial)
    (trial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        verify(trial)


def test_a_file_the_manifest_does_not_list_is_damage(two_checkpoints, tmp_path):
    root, _ = two_checkpoints
    trial = tmp_path / "c"
    shutil.copytree(list_checkpoints(root)[-1], trial)
    manifest = json.loads((trial / "manifest.json").read_text())
    dropped = next(k for k in manifest if k.startswith("state/"))
    del manifest[dropped]
    (trial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"file {trial / dropped} is not in its manifest"):
        verify(trial)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "cannot read its metadata .*: JSONDecodeError"),
        (b"[1, 2]", "metadata .* is damaged"),
        (b'{"epoch": 1, "step": "ten", "history": []}', "metadata .* is damaged"),
        (b'{"epoch": 1, "step": 10}', "metadata .* is damaged"),
        (pickle.dumps({"epoch": 1}), "cannot read its metadata"),
    ],
)
def test_damaged_metadata_with_a_manifest_to_match_is_refused(
    two_checkpoints, tmp_path, content, message
):
    """Metadata rewritten and the manifest rewritten to match it (so the checksums pass):
    still one `CheckpointError`, before any array is restored."""
    root, _ = two_checkpoints
    trial = tmp_path / "c"
    shutil.copytree(list_checkpoints(root)[-1], trial)
    (trial / "meta" / "metadata").write_bytes(content)
    write_manifest(trial)
    verify(trial)  # the checksums match
    with pytest.raises(CheckpointError, match=message):
        restore(trial, _state(0), required=RUN_META)


TINY = [
    "--dataset",
    "synthetic(num_train=120, num_test=30, shape=(8,), num_classes=3)",
    "--model",
    "mlp(features=(8,))",
    "--epochs",
    "3",
    "--checkpoint-every",
    "1",
    "--keep-checkpoints",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    (out / "summary.json").unlink()
    return out


def test_an_edited_config_is_refused_naming_the_field(unfinished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["batch_size"] = 50
    (run / "config.json").write_text(json.dumps(saved))
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "argument --resume" in err and "was edited after the run started" in err
    assert "batch_size: 100 -> 50" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing rewritten


def test_checkpoints_that_is_a_file_is_one_line_and_nothing_is_rewritten(
    unfinished, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a folder of checkpoints" in err
    assert (run / "metrics.jsonl").read_text() == before


def test_a_damaged_newest_checkpoint_is_one_warning_and_the_run_completes(
    unfinished, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    newest = list_checkpoints(run / "checkpoints")[-1]
    (newest / "manifest.json").write_text("{}")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 1 damaged checkpoint(s), restored epoch-000002" in err[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_a_closed_checkpointer_leaves_no_temporary_folder(tmp_path):
    """What a failed save left (``.tmp-*``, in checkpoints/ and best/) is gone once the
    writers are closed; committed checkpoints stay."""
    from jtricks.training import Checkpointer

    ckpt = Checkpointer(tmp_path / "checkpoints", every=1)
    ckpt.on_epoch_end({"epoch": 1, "step": 1, "val_loss": 1.0}, _state(1))
    for leftover in ("checkpoints/.tmp-epoch-000002", "checkpoints/best/.tmp-epoch-000002"):
        (tmp_path / leftover / "state").mkdir(parents=True)
    ckpt.close()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "epoch-000001"]
    assert not list((tmp_path / "checkpoints" / "best").glob(".tmp-*"))


def test_a_normal_restore_is_quiet(two_checkpoints, caplog):
    """No absl warning about the state item's ``_CHECKPOINT_METADATA`` (written one level
    up, for the whole checkpoint) on a restore of an intact checkpoint."""
    root, states = two_checkpoints
    with caplog.at_level("WARNING"):
        state, _ = restore(list_checkpoints(root)[-1], _state(0), required=RUN_META)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(state), states[2], strict=True))
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
