"""The integrity record of a checkpoint: a manifest of every data file's SHA-256 and
size, written just before orbax's commit rename (`jtricks.training.checkpoint`) and checked
by `verify` before anything is read, so a corrupt, truncated, missing or unlisted file is
named instead of restored (orbax restores whatever bytes it finds).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from jtricks.errors import ConfigError

BOOKKEEPING = {"manifest.json", "_CHECKPOINT_METADATA", "commit_success.txt"}
"""orbax's own files, rewritten after the commit: not in the manifest."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: corrupt, truncated, or not matching the model."""


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in BOOKKEEPING)


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


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 and size of every data file under ``folder`` (orbax's
    bookkeeping files excluded: it rewrites them after the commit)."""
    manifest = {
        str(p.relative_to(folder)): {"sha256": _digest(p), "size": p.stat().st_size}
        for p in _files(folder)
    }
    _write_json(folder / "manifest.json", manifest)


def verify(path: str | os.PathLike) -> None:
    """Check a checkpoint against its manifest, before any array is read.

    The manifest must be complete: a JSON object with an entry ``{"sha256", "size"}`` for
    every data file under the checkpoint (orbax's bookkeeping files aside), its metadata
    and state among them; a file it does not list, an empty or malformed manifest, and a
    listed file that is missing, truncated or altered all mean "damaged".

    Raises:
      CheckpointError: naming the checkpoint and the first problem found.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    on_disk = {str(p.relative_to(path)) for p in _files(path)}
    unlisted = sorted(on_disk - set(manifest))
    if unlisted:
        raise CheckpointError(
            f"checkpoint {path}: file {path / unlisted[0]} is not in its manifest "
            f"({len(unlisted)} unlisted)"
        )
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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The checked manifest of a checkpoint (see `verify`)."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}"
        raise CheckpointError(f"checkpoint {path}: cannot read {manifest_path}: {why}") from None

    def entry_ok(rel: Any, info: Any) -> bool:
        return (
            isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and info["size"] >= 0
            and isinstance(info.get("sha256"), str)
            and _SHA256.fullmatch(info["sha256"]) is not None
            and not Path(rel).is_absolute()
            and ".." not in Path(rel).parts
        )

    damaged = not isinstance(manifest, dict) or not all(entry_ok(k, v) for k, v in manifest.items())
    if not damaged:
        damaged = "meta/metadata" not in manifest or not any(
            k.startswith("state/") for k in manifest
        )
    if damaged:
        raise CheckpointError(
            f"checkpoint {path}: its manifest {manifest_path} is damaged (not a list of every "
            "file of the checkpoint with its SHA-256 and size)"
        )
    return manifest
