"""Checkpoints through orbax, committed atomically, verified on restore.

Layout of a checkpoint directory::

    ckpt/epoch-000012/            one committed checkpoint
        state/                    the TrainState arrays, written by orbax (no pickle)
        meta.json                 epoch, step, history records, callback states
        manifest.json             SHA-256 and size of every file above
    ckpt/best/                    a copy of the best checkpoint (same layout)

New here (orbax writes the arrays): a checkpoint is first written to a hidden
``.tmp-*`` directory, its manifest last, and only then renamed into place, so a
crash at any moment leaves either the previous checkpoints or a complete new
one; leftovers are removed by the next save. `restore` checks the manifest, so
a corrupt or truncated file is reported by name, and `restore_latest` falls
back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jtricks.errors import ConfigError, WriteError
from jtricks.training.state import TrainState
from jtricks.training.state import device_copy as _device_copy
from jtricks.trees import leaf_path

PREFIX = "epoch-"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: corrupt, truncated, or not matching the model."""


def _is_key(a: Any) -> bool:
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _key_data(tree: Any) -> Any:
    """PRNG key leaves (the run key, an NNX module's RNG streams) as their raw uint32 data."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _wrap_keys(tree: Any, like: Any) -> Any:
    """Undo `_key_data` where ``like`` (the target state) holds a key."""
    return jax.tree.map(
        lambda a, t: jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)) if _is_key(t) else a,
        tree,
        like,
    )


def _arrays(state: TrainState) -> dict[str, Any]:
    return _key_data(
        {
            "step": state.step,
            "params": state.params,
            "batch_stats": state.batch_stats,
            "opt_state": state.opt_state,
            "key": state.key,
            **({"ema_params": state.ema_params} if state.ema_params is not None else {}),
        }
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: Path, final: Path) -> None:
    """Atomically move a complete checkpoint into place (replacing ``final`` if it exists)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save(directory: str | os.PathLike, name: str, state: TrainState, meta: dict[str, Any]) -> Path:
    """Write ``state`` and ``meta`` as checkpoint ``directory/name``, atomically.

    Returns the committed checkpoint's path.
    """
    import orbax.checkpoint as ocp

    root = Path(directory).absolute()
    tmp = root / f".tmp-{name}"
    _quiet_writer_failures()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _check_space(root, state)
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(tmp / "state", _arrays(state))
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        _write_json(tmp / "meta.json", meta)
        manifest = {
            str(p.relative_to(tmp)): {"sha256": _digest(p), "size": p.stat().st_size}
            for p in _files(tmp)
        }
        _write_json(tmp / "manifest.json", manifest)
        final = root / name
        _commit(tmp, final)
    except Exception as e:  # no space, no permission, or orbax's writer failing for them
        shutil.rmtree(tmp, ignore_errors=True)  # the newest committed checkpoint is untouched
        raise WriteError(f"checkpoint {root / name}", e) from None
    return final


def _check_space(root: Path, state: TrainState) -> None:
    """Refuse a save that cannot fit before orbax starts writing (ENOSPC in its writer
    threads otherwise surfaces as a storm of errors)."""
    need = sum(int(getattr(a, "nbytes", 0)) for a in jax.tree.leaves(_arrays(state))) + 2**20
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device (the checkpoint needs about {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free)",
        )


_QUIET = False


def _quiet_writer_failures() -> None:
    """Keep a failed save to the one line `save` raises: orbax's writer threads log their
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


def verify(path: str | os.PathLike) -> None:
    """Check every file of a checkpoint against its manifest.

    Raises:
      CheckpointError: naming the first missing, truncated or altered file.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {manifest_path}: {e}") from None
    for rel, info in manifest.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {f} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(
                f"checkpoint {path}: file {f} is truncated ({f.stat().st_size} of {info['size']} bytes)"
            )
        if _digest(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {f} is corrupt (checksum mismatch)")


def restore(path: str | os.PathLike, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restore a checkpoint into the structure of ``target`` (a freshly created state).

    Raises:
      CheckpointError: if a file is corrupt or truncated (named), or the arrays do not match
        the model and optimizer of ``target`` (the first differing leaf is named).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    verify(path)
    meta = json.loads((path / "meta.json").read_text())
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), _arrays(target)
    )
    ckptr = ocp.StandardCheckpointer()
    try:
        saved = ckptr.metadata(path / "state")
        saved_tree = getattr(saved, "item_metadata", saved)
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        _check_match(saved_tree, abstract, path)
        arrays = ckptr.restore(path / "state", abstract)
    except CheckpointError:
        raise
    except Exception as e:  # orbax / tensorstore errors on damaged data
        raise CheckpointError(
            f"checkpoint {path}: cannot restore arrays: {type(e).__name__}: {e}"
        ) from None
    finally:
        ckptr.close()
    batch_stats = _wrap_keys(arrays["batch_stats"], target.batch_stats)
    state = target.replace(
        step=arrays["step"],
        params=arrays["params"],
        batch_stats=batch_stats,
        opt_state=arrays["opt_state"],
        key=jax.random.wrap_key_data(arrays["key"], impl=jax.random.key_impl(target.key)),
        ema_params=arrays.get("ema_params"),
    )
    return state, meta


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


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Committed epoch checkpoints in ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def restore_latest(
    directory: str | os.PathLike, target: TrainState, *, log=None
) -> tuple[TrainState, dict] | None:
    """Restore the newest intact checkpoint, falling back past damaged ones (each reported).

    Returns ``None`` if there is no checkpoint at all.

    Raises:
      CheckpointError: if checkpoints exist but none can be restored, or they do not match the model.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    candidates = list_checkpoints(directory)
    errors = []
    for path in reversed(candidates):
        try:
            return restore(path, target)
        except CheckpointError as e:
            if "does not match" in str(e):
                raise
            errors.append(str(e))
            log(f"jtricks: warning: {e}; falling back to the previous checkpoint")
    if errors:
        raise CheckpointError(
            "no intact checkpoint in " + str(directory) + ": " + "; ".join(errors)
        )
    return None


class Checkpointer:
    """Fit callback: save every ``every`` epochs (and at the end), keep the last ``keep``,
    and keep a copy of the best epoch by ``monitor`` in ``directory/best``.

    The best state is held on device when it improves and written just before the next
    periodic checkpoint (and at the end), so a run whose validation loss improves every
    epoch does not pay a disk write per epoch; ``best`` on disk always matches the newest
    periodic checkpoint's view of the run, which is what a resume continues from.

    ``meta_fn(record, state)`` may add JSON-able data (e.g. callback states) to each
    checkpoint's ``meta.json``; the fit history so far is always included.

    With ``background=True`` (the default) a checkpoint is written by one worker thread
    while training goes on: the callback takes a device copy of the state (the next epoch
    donates its buffers) and returns; the next checkpoint first waits for it, so at most one
    is in flight. Writes stay in order and atomic (a temporary folder
    renamed into place), so a crash loses at most the checkpoint being written and resume
    falls back to the previous one; `on_train_end` waits for every write, and a failed
    write is raised at the next checkpoint or at the end. ``background=False`` writes
    before returning.

    When `fit` stops a diverging run it passes the state it kept (the last that evaluated
    finite) with the record marked ``diverged``; that state is written as the newest
    checkpoint and as ``best``, so ``--pretrained RUN`` continues from it.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int = 1,
        keep: int = 3,
        monitor: str | None = "val_loss",
        mode: str = "min",
        meta_fn=None,
        background: bool = True,
    ) -> None:
        if every < 1 or keep < 1:
            raise ConfigError(
                f"every and keep must be >= 1; got every={every}, keep={keep}", param="checkpoint"
            )
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max'; got {mode!r}", param="mode")
        self.directory = Path(directory)
        self.every, self.keep, self.monitor, self.mode, self.meta_fn = (
            every,
            keep,
            monitor,
            mode,
            meta_fn,
        )
        self.records: list[dict[str, Any]] = []
        self.best: float | None = None
        self._last_saved_epoch: int | None = None
        self._pending_best: tuple[TrainState, dict[str, Any]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1) if background else None
        self._futures: list[Future] = []

    def _submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the writer thread (in order), or now without one."""
        self._check_writes(wait=False)
        if self._executor is None:
            fn(*args)
        else:
            self._futures.append(self._executor.submit(fn, *args))

    def _check_writes(self, *, wait: bool) -> None:
        """Re-raise the error of a finished write (waiting for all of them with ``wait``)."""
        for f in list(self._futures):
            if wait or f.done():
                self._futures.remove(f)
                f.result()

    def wait(self) -> None:
        """Block until every checkpoint handed to the writer thread is on disk."""
        self._check_writes(wait=True)

    def _meta(self, record: dict[str, Any], state: TrainState) -> dict[str, Any]:
        meta = {
            "epoch": record["epoch"],
            "step": record["step"],
            "history": list(self.records),
            "best": self.best,
        }
        if self.meta_fn is not None:
            meta.update(self.meta_fn(record, state))
        return meta

    def on_epoch_end(self, record: dict[str, Any], state: TrainState) -> None:
        self.records.append(record)
        if record.get("diverged"):  # `fit` passes the kept state: it is the run's final word
            self._pending_best = (_device_copy(state), self._meta(record, state))
            self._save(record, state)
            return
        value = record.get(self.monitor) if self.monitor else None
        improved = (
            value is not None
            and np.isfinite(value)
            and (
                self.best is None
                or (value < self.best if self.mode == "min" else value > self.best)
            )
        )
        if improved:
            self.best = float(value)
            # a device copy (the next epoch donates ``state``); written with the next checkpoint
            self._pending_best = (
                _device_copy(state),
                self._meta(record, state),
            )
        if record["epoch"] % self.every == 0:
            self._save(record, state)

    def on_train_end(self, state: TrainState) -> None:
        if self.records and self._last_saved_epoch != self.records[-1]["epoch"]:
            self._save(self.records[-1], state)
        self._flush_best()
        self.wait()

    def _flush_best(self) -> None:
        if self._pending_best is not None:
            self._submit(save, self.directory, "best", *self._pending_best)
            self._pending_best = None

    def _save(self, record: dict[str, Any], state: TrainState) -> None:
        self.wait()  # at most one checkpoint in flight: bounded memory, and the one before is on disk
        self._flush_best()  # the best so far goes to disk with every checkpoint, not at every improvement
        if self._executor is not None:  # the next epoch donates ``state``: write a device copy
            state = _device_copy(state)
        self._submit(
            self._write, f"{PREFIX}{record['epoch']:06d}", state, self._meta(record, state)
        )
        self._last_saved_epoch = record["epoch"]

    def _write(self, name: str, state: TrainState, meta: dict[str, Any]) -> None:
        save(self.directory, name, state, meta)
        for old in list_checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
