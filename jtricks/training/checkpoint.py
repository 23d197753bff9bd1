"""Checkpoints written by orbax, committed with a SHA-256 manifest, verified on restore.

Layout of a checkpoint directory (orbax's, so plain orbax can read it)::

    ckpt/epoch-000012/            one committed checkpoint (an orbax step)
        state/                    the TrainState arrays (orbax's StandardSave, no pickle)
        meta/metadata             epoch, step, history records, callback states (JsonSave)
        arrays/                   arrays a callback keeps beside the state, when one does
                                  (SWA's running average), by name (StandardSave)
        _CHECKPOINT_METADATA      orbax's bookkeeping (commit time)
        manifest.json             SHA-256 and size of every file of state/ and meta/
    ckpt/best/epoch-000009/       the best epoch so far (same layout)

orbax writes the items into a hidden ``.tmp-epoch-000012`` folder and commits it by a
rename (`ManifestRename`, an orbax ``TemporaryPath``), so a crash leaves the previous
checkpoints or a complete new one. New here: the manifest (`jtricks.training.manifest`),
written just before the rename and checked by `restore`, names a corrupt or truncated
file; `restore_latest` falls back to the newest intact checkpoint, the same one in every
process of a multi-process run (orbax restores whatever bytes it finds).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import path as ocp_path

from jtricks.errors import WriteError
from jtricks.moved import module_getattr
from jtricks.training.manifest import CheckpointError, verify, write_manifest
from jtricks.training.processes import all_agree
from jtricks.training.state import TrainState, stats_average_start
from jtricks.trees import key_data, leaf_path, wrap_keys

PREFIX = "epoch-"
TMP = ".tmp-"
INTERRUPTED = "interrupted"  # the state a stopped run reached (`Checkpointer.on_interrupt`)

__getattr__ = module_getattr(__name__)  # Checkpointer moved (jtricks.moved)


def _arrays(state: TrainState) -> dict[str, Any]:
    names = ("step", "params", "batch_stats", "opt_state", "key", "ema_params", "ema_batch_stats")
    return key_data({k: getattr(state, k) for k in names if getattr(state, k) is not None})


def _stored(arrays: Any) -> Any:
    """``arrays`` as a checkpoint holds them: every zero-size leaf as a 0-d zero of its
    dtype, since orbax refuses to write arrays of no size (GaLore keeps a ``(0, 0)``
    projector for each 1-D parameter); they hold no data, and `_sized` gives them back
    their shape from the target state."""
    return jax.tree.map(lambda a: np.zeros((), a.dtype) if np.size(a) == 0 else a, arrays)


def _sized(restored: Any, target: Any) -> Any:
    """``restored`` with each zero-size leaf of ``target`` (`_arrays`) back in its shape,
    dtype and placement."""

    def back(r: Any, t: Any) -> Any:
        if np.size(t) != 0:
            return r
        empty = np.zeros(np.shape(t), t.dtype)
        return jax.device_put(empty, t.sharding) if hasattr(t, "sharding") else empty

    return jax.tree.map(back, restored, target)


def items(state: TrainState, meta: dict[str, Any], arrays: Any = None) -> ocp.args.Composite:
    """The orbax items of one checkpoint: the state's arrays, the JSON metadata and, when
    given (a dict of named trees), the callbacks' ``arrays``."""
    stored = _stored(_arrays(state))
    found = {"state": ocp.args.StandardSave(stored), "meta": ocp.args.JsonSave(meta)}
    if arrays:
        found["arrays"] = ocp.args.StandardSave(arrays)
    return ocp.args.Composite(**found)


class ManifestRename(ocp_path.atomicity.AtomicRenameTemporaryPath):
    """orbax's atomic rename, from ``.tmp-NAME`` to ``NAME``, with the manifest written
    just before a checkpoint (not each of its items) is committed."""

    @classmethod
    async def validate(cls, temporary_path: Any) -> None:
        if not temporary_path.name.startswith(TMP):
            raise ocp_path.atomicity_types.ValidationError(f"{temporary_path} is not temporary")

    @classmethod
    async def validate_final(cls, final_path: Any) -> None:
        if final_path.name.startswith(TMP):
            raise ocp_path.atomicity_types.ValidationError(f"{final_path} is temporary")

    @classmethod
    def from_temporary(cls, temporary_path: Any, **kwargs: Any) -> ManifestRename:
        final = temporary_path.parent / temporary_path.name.removeprefix(TMP)
        return cls(temporary_path, final, file_options=kwargs.get("file_options"))

    @classmethod
    def from_final(cls, final_path: Any, **kwargs: Any) -> ManifestRename:
        return cls(
            final_path.parent / f"{TMP}{final_path.name}",
            final_path,
            checkpoint_metadata_store=kwargs.get("checkpoint_metadata_store"),
            file_options=kwargs.get("file_options"),
        )

    async def finalize(self) -> None:
        tmp = Path(self.get())
        if not tmp.parent.name.startswith(TMP):  # a whole checkpoint, not one of its items
            write_manifest(tmp)
        await super().finalize()


class EpochNames:
    """orbax ``NameFormat`` for ``epoch-NNNNNN`` step folders (orbax's standard format
    puts an underscore after the prefix); folders still being written are skipped."""

    def build_name(self, step: int) -> str:
        return f"{PREFIX}{step:06d}"

    def find_all(self, base_path: Any) -> list[ocp_path.step.Metadata]:
        return [
            ocp_path.step.Metadata(step=int(p.name.removeprefix(PREFIX)), path=base_path / p.name)
            for p in list_checkpoints(Path(base_path))
        ]

    def find_step(self, base_path: Any, step: int) -> ocp_path.step.Metadata:
        for found in self.find_all(base_path):
            if found.step == step:
                return found
        raise ValueError(f"no checkpoint of epoch {step} in {base_path}")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Committed epoch checkpoints in ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"{PREFIX}\d{{6,}}")
    return sorted(p for p in root.iterdir() if p.is_dir() and pattern.fullmatch(p.name))


def save(
    directory: str | os.PathLike,
    name: str,
    state: TrainState,
    meta: dict[str, Any],
    arrays: Any = None,
) -> Path:
    """Write ``state``, ``meta`` (and the callbacks' named ``arrays``, `items`) as checkpoint
    ``directory/name``, atomically, and wait for it. A checkpoint already there is replaced
    only once the new one is complete.

    Returns the committed checkpoint's path.
    """
    root = Path(directory).absolute()
    final, aside = root / name, root / f"{TMP}old-{name}"
    quiet_writer_failures()
    try:
        root.mkdir(parents=True, exist_ok=True)
        check_space(root, state, arrays=arrays)
        for leftover in root.glob(f"{TMP}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():
            os.replace(final, aside)
        with ocp.Checkpointer(
            ocp.CompositeCheckpointHandler(), temporary_path_class=ManifestRename
        ) as ckptr:
            ckptr.save(final, args=items(state, meta, arrays))
        shutil.rmtree(aside, ignore_errors=True)
    except Exception as e:  # no space, no permission, or orbax's writer failing for them
        shutil.rmtree(root / f"{TMP}{name}", ignore_errors=True)
        if aside.exists() and not final.exists():
            os.replace(aside, final)  # the checkpoint that was there is untouched
        raise WriteError(f"checkpoint {final}", e) from None
    return final


def check_space(root: Path, state: TrainState, copies: int = 1, arrays: Any = None) -> None:
    """Refuse a save (of ``copies`` checkpoints of ``state`` and ``arrays`` at once) that
    cannot fit before orbax starts writing (ENOSPC in its writer threads otherwise surfaces
    as a storm of errors, and may leave a temporary folder a writer was still filling)."""
    leaves = jax.tree.leaves((_arrays(state), arrays))
    size = sum(int(getattr(a, "nbytes", 0)) for a in leaves)
    need = copies * size + 2**20
    root = next(p for p in (root, *root.parents) if p.exists())  # the folder may be new
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device (the checkpoint needs about {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free)",
        )


_QUIET = False


def quiet_writer_failures() -> None:
    """Keep a failed save to the one line jtricks raises: orbax's writer threads log their
    failure with its traceback at ERROR level (jtricks raises every orbax failure itself).
    The CLI also drops the ``RuntimeError: Event loop is closed`` tracebacks that
    tensorstore callbacks print when they arrive after orbax closed its event loop
    (`jtricks.cli.QuietThreadTracebacks`)."""
    global _QUIET
    if _QUIET:
        return
    _QUIET = True

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
            return not (record.levelno >= logging.ERROR and orbax)

    logging.getLogger("absl").addFilter(_Filter())


RUN_META = ("epoch", "step", "history")
"""The metadata keys a `Checkpointer`'s checkpoints hold and a resumed run needs."""

_META_TYPES = {"epoch": int, "step": int, "history": list, "callbacks": dict}


def read_meta(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's JSON metadata (for a `Checkpointer`'s: epoch, step, history, callback
    states), with the ``required`` keys (e.g. `RUN_META`) present.

    Raises:
      CheckpointError: metadata that is not a JSON object, lacks a required key, or holds a
        known key of the wrong type (damaged, or not what the caller saved).
    """
    where = Path(path) / "meta" / "metadata"
    try:
        meta = json.loads(where.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(
            f"checkpoint {path}: cannot read its metadata {where}: {type(e).__name__}"
        ) from None
    bad = not isinstance(meta, dict) or any(k not in meta for k in required)
    if not bad:
        bad = any(
            k in meta and (not isinstance(meta[k], t) or isinstance(meta[k], bool))
            for k, t in _META_TYPES.items()
        ) or not all(isinstance(r, dict) for r in meta.get("history", []))
    if bad:
        raise CheckpointError(
            f"checkpoint {path}: its metadata {where} is damaged (a JSON object with "
            f"{', '.join(required) or 'the saved keys'} expected)"
        )
    return meta


class _StateMetadataNotice(logging.Filter):
    """Drops orbax's warning that a checkpoint's ``state/`` item has no
    ``_CHECKPOINT_METADATA``: that file is written one level up, for the whole checkpoint,
    so its absence there is normal and every restore printed the warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Metadata file does not exist")
            and message.endswith(f"{os.sep}state{os.sep}_CHECKPOINT_METADATA")
        )


logging.getLogger("absl").addFilter(_StateMetadataNotice())


def restore(
    path: str | os.PathLike,
    target: TrainState,
    *,
    required: tuple[str, ...] = (),
    foreign: Callable[[dict], str | None] | None = None,
    arrays_like: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Restore a checkpoint into the structure of ``target`` (a freshly created state).

    ``path`` is a checkpoint (``.../epoch-NNNNNN``) or a folder of them (a run's
    ``checkpoints/`` or its ``checkpoints/best/``), which restores the newest one there.
    With ``arrays_like`` (named trees with the shapes, dtypes and placement of the
    callbacks' saved ``arrays``), a checkpoint that holds them returns them in the
    metadata's ``"arrays"``.

    Raises:
      CheckpointError: if a file is corrupt or truncated (named), ``foreign(meta)`` says
        why it is another run's, or the arrays do not match the model and optimizer of
        ``target`` (the first differing leaf is named).
    """
    path = Path(path).absolute()
    inside = [] if (path / "manifest.json").exists() else list_checkpoints(path)
    path = inside[-1] if inside else path  # a folder of checkpoints: its newest
    return _read(path, target, _check(path, target, required, foreign), arrays_like)


def _read(
    path: Path, target: TrainState, checked: tuple[dict, TrainState], arrays_like: Any
) -> tuple[TrainState, dict]:
    """`_load` of a checkpoint `_check` passed, into ``target``."""
    meta, held = checked
    state, meta = _load(path, held, meta, arrays_like)
    if target.ema_batch_stats is not None and state.ema_batch_stats is None:
        state = state.replace(ema_batch_stats=stats_average_start(state.batch_stats))
    return state, meta


def _check(
    path: Path, target: TrainState, required: tuple[str, ...], foreign: Callable | None
) -> tuple[dict[str, Any], TrainState]:
    """The checkpoint's metadata once its files, its run and its array layout are checked
    (`restore`'s errors), before anything is read into memory, and ``target`` as the
    checkpoint holds it: without ``ema_batch_stats`` for one written before the EMA
    averaged statistics (that average then restarts from the restored statistics)."""
    verify(path)
    meta = read_meta(path, required)
    if foreign is not None and (why := foreign(meta)):
        raise CheckpointError(f"{path.name} is another run's checkpoint ({why})")
    with _orbax(path) as ckptr:
        saved = ckptr.metadata((path / "state").absolute())  # orbax: no tree for a relative one
        saved_tree = getattr(saved, "item_metadata", saved)
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        if saved_tree is None:
            raise CheckpointError(f"checkpoint {path}: orbax finds no array metadata in state/")
        if "ema_batch_stats" not in saved_tree:
            target = target.replace(ema_batch_stats=None)
        _check_match(saved_tree, jax.tree.map(_placed_like, _stored(_arrays(target))), path)
    return meta, target


def _load(
    path: Path, target: TrainState, meta: dict[str, Any], arrays_like: Any = None
) -> tuple[TrainState, dict]:
    """Read a checked checkpoint's arrays into the structure of ``target`` (and the
    callbacks' arrays into that of ``arrays_like``, when it and the checkpoint have them)."""
    with _orbax(path) as ckptr:
        raw = _arrays(target)
        abstract = jax.tree.map(_placed_like, _stored(raw))
        arrays = _sized(ckptr.restore((path / "state").absolute(), abstract), raw)
        if arrays_like and (path / "arrays").is_dir():
            like = jax.tree.map(_placed_like, arrays_like)
            meta = {**meta, "arrays": ckptr.restore((path / "arrays").absolute(), like)}
    batch_stats = wrap_keys(arrays["batch_stats"], target.batch_stats)
    state = target.replace(
        step=arrays["step"],
        params=arrays["params"],
        batch_stats=batch_stats,
        opt_state=arrays["opt_state"],
        key=wrap_keys(arrays["key"], target.key),
        ema_params=arrays.get("ema_params"),
        ema_batch_stats=wrap_keys(arrays.get("ema_batch_stats"), target.ema_batch_stats),
    )
    return state, meta


@contextlib.contextmanager
def _orbax(path: Path) -> Iterator[ocp.StandardCheckpointer]:
    """An orbax checkpointer for reading ``path``, closed after; what orbax or tensorstore
    raise on damaged data becomes a `CheckpointError` naming the checkpoint."""
    ckptr = ocp.StandardCheckpointer()
    try:
        yield ckptr
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path}: cannot restore arrays: {type(e).__name__}: {e}"
        ) from None
    finally:
        ckptr.close()


def _placed_like(a: Any) -> jax.ShapeDtypeStruct:
    """What to restore a leaf as: ``a``'s shape, dtype and devices (its sharding; a host
    array: the first local device), whatever devices and mesh the checkpoint was saved
    from, so a checkpoint of 8 devices restores onto 1 or 4 (orbax reshards)."""
    sharding = getattr(a, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    dtype = a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype
    return jax.ShapeDtypeStruct(np.shape(a), dtype, sharding=sharding)


def _check_match(saved: Any, abstract: Any, path: Path) -> None:
    saved_leaves = {leaf_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    want = {leaf_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    missing = sorted(set(want) - set(saved_leaves))
    extra = sorted(set(saved_leaves) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the model/optimizer: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for k, w in want.items():
        shape = tuple(getattr(saved_leaves[k], "shape", ()) or ())
        if shape != tuple(w.shape):
            raise CheckpointError(
                f"checkpoint {path} does not match the model: {k} has shape {shape}, the model expects {tuple(w.shape)}"
            )


def best_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The best checkpoint a `Checkpointer` kept in ``directory`` (``best/epoch-*``), if any."""
    found = list_checkpoints(Path(directory) / "best")
    return found[-1] if found else None


def newest_last(directory: str | os.PathLike) -> list[Path]:
    """The epoch checkpoints and the interrupted one (``interrupted/epoch-NNNNNN``: a
    state inside epoch NNNNNN), oldest first: an interrupted checkpoint comes after the
    epochs before its own and before its epoch's own checkpoint."""
    regular = [(int(p.name.removeprefix(PREFIX)), 1, p) for p in list_checkpoints(directory)]
    cut = [
        (int(p.name.removeprefix(PREFIX)), 0, p)
        for p in list_checkpoints(Path(directory) / INTERRUPTED)
    ]
    return [p for *_, p in sorted(regular + cut)]


def restore_latest(
    directory: str | os.PathLike,
    target: TrainState,
    *,
    log=None,
    required: tuple[str, ...] = (),
    foreign: Callable[[dict], str | None] | None = None,
    arrays_like: dict[str, Any] | None = None,
) -> tuple[TrainState, dict] | None:
    """Restore the newest intact checkpoint (`newest_last`: an interrupted run's state
    counts), falling back past damaged ones and another run's (``foreign`` and
    ``arrays_like`` as `restore` takes them), each named with its problem in one warning
    once a checkpoint restores.
    The processes of a multi-process run restore the same one: the newest that every
    process finds intact (`all_agree`).

    Returns ``None`` if there is no checkpoint at all.

    Raises:
      CheckpointError: if ``directory`` is not a folder, checkpoints exist but none can be
        restored, or they do not match the model.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder of checkpoints")
    errors = []
    for path in reversed(newest_last(directory)):
        try:
            checked, problem = _check(path, target, required, foreign), None
        except CheckpointError as e:
            if "does not match" in str(e):
                raise
            checked, problem = None, str(e)
        if not all_agree(problem is None):  # every process restores the same checkpoint
            errors.append(problem or f"{path.name} is damaged in another process's view")
            continue
        try:
            restored = _read(path, target, checked, arrays_like)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            what = "damaged" if all("another run's" not in e for e in errors) else "unusable"
            log(
                f"jtricks: warning: skipped {len(errors)} {what} checkpoint(s), restored "
                f"{path.name}: " + "; ".join(errors)
            )
        return restored
    if errors:
        raise CheckpointError(f"no intact checkpoint in {directory}: " + "; ".join(errors))
    return None
