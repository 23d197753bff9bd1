"""What ``--resume`` trusts: a run folder's ``config.json`` as the run started, and its
checkpoints as they were written.

A run records the SHA-256 of its config (`config_digest`) in ``config.json`` when it
starts, and every checkpoint keeps a copy of the config in its metadata. A resume reads
the config, checks the digest, and refuses an edited one, naming each field that differs
from the newest checkpoint's copy: a run continued with another batch size, model or
schedule is no longer the run its folder claims to be. New here: orbax keeps the arrays
exact; nothing in it ties them to the settings that produced them.

Each run also draws an id when its folder is created (`new_identity`, kept in
``config.json`` with the config's digest as its fingerprint) and every checkpoint
records it: `foreign_checker` tells a resume which checkpoints are another run's (another
id, or a config copy that differs, e.g. the same settings with another seed), so a
checkpoint copied in from elsewhere is skipped with a warning naming it, never restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jtricks.errors import ConfigError
from jtricks.run.config import TrainConfig
from jtricks.training.checkpoint import list_checkpoints


def config_digest(config: dict[str, Any]) -> str:
    """The SHA-256 of a config dict's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def load_run_config(
    run_dir: str | os.PathLike, *, param: str = "resume", finished: bool = False
) -> TrainConfig:
    """The config saved in a run folder, checked against the digest recorded when the run
    started: an unfinished run's for ``--resume`` (``param="resume"``; a finished one's
    too with ``finished``, to train it on), any run's for `jtricks.run.load_run`
    (``param="run"``).

    Raises:
      ConfigError (``param``): not a run folder, a finished run (to resume), a config
        that is not valid, or one edited since the run started (the changed fields named).
    """
    path, verb = Path(run_dir) / "config.json", "resume" if param == "resume" else "load"
    why = None
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        why = "it is a file, not a run folder"
    elif not path.is_file():
        why = f"{path} does not exist (not a jtricks run folder)"
    elif param == "resume" and not finished and (Path(run_dir) / "summary.json").exists():
        why = (
            "the run already finished (summary.json exists); to train it on, give the "
            f"longer length too (--epochs N or --steps N), or start a new run from its "
            f"final weights: --pretrained {run_dir}"
        )
    if why is not None:
        raise ConfigError(f"cannot {verb} {str(run_dir)!r}: {why}", param=param)
    try:
        saved = json.loads(path.read_text())
        config = TrainConfig.from_dict(saved["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"cannot {verb} {str(run_dir)!r}: {path} is not a valid run config: {e}", param=param
        ) from None
    recorded = saved.get("config_sha256")
    if recorded is not None and recorded != config_digest(saved["config"]):
        raise ConfigError(
            f"cannot {verb} {str(run_dir)!r}: {path} was edited after the run started "
            f"({_changes(Path(run_dir), saved['config'])}); the run is rebuilt as it "
            "started: undo the edit, or start a new run (--out) with the new settings",
            param=param,
        )
    return config


def check_same_data(record: Path, dataset: str, digest: str, hint: str = "") -> None:
    """Refuse to resume a run or search whose data changed since it started: ``digest``
    (`jtricks.run.data.data_digest` of the data loaded now) against the ``data_sha256``
    recorded in ``record`` (its ``config.json`` or ``search.json``; folders written
    before there was one are not checked). ``hint`` ends the message.

    Raises:
      ConfigError (``param="resume"``).
    """
    try:
        recorded = json.loads(record.read_text()).get("data_sha256")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(recorded, str) and recorded != digest:
        raise ConfigError(
            f"cannot resume {str(record.parent)!r}: the data of dataset {dataset!r} differ "
            f"from those it started with (SHA-256 {recorded[:12]}... then, {digest[:12]}... "
            f"now), so it would go on with other data: restore the data, or start anew{hint}",
            param="resume",
        )


def _changes(run_dir: Path, config: dict[str, Any]) -> str:
    """``"batch_size: 100 -> 50, ..."`` against the newest checkpoint's copy of the config,
    or a sentence saying the digest differs when no copy can be read."""
    for checkpoint in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            meta = json.loads((checkpoint / "meta" / "metadata").read_text())
            started = meta["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(started, dict):
            continue
        changed = [
            f"{k}: {started.get(k)!r} -> {config.get(k)!r}"
            for k in sorted(set(started) | set(config))
            if json.dumps(started.get(k)) != json.dumps(config.get(k))
        ]
        if changed:
            return ", ".join(changed)
    return "its SHA-256 no longer matches the one recorded at the start"


def new_identity(settings: dict[str, Any]) -> dict[str, str]:
    """A new run's identity: a random ``id`` and the ``fingerprint`` of its config (the
    digest of its settings: model, data, seed and every other option)."""
    return {"id": secrets.token_hex(8), "fingerprint": config_digest(_plain(settings))}


def run_identity(run_dir: str | os.PathLike) -> dict[str, str] | None:
    """The identity recorded in a run folder's ``config.json`` (``None`` for a folder
    written before runs had one, or none readable)."""
    try:
        run = json.loads((Path(run_dir) / "config.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) and isinstance(run.get("id"), str) else None


LENGTHS = ("epochs", "steps")
"""The settings a run changes when it is trained on past its end (`jtricks.run.extend`):
its earlier checkpoints, with the shorter length, are still its own."""


def foreign_checker(
    identity: dict[str, str] | None, settings: dict[str, Any]
) -> Callable[[dict], str | None]:
    """``why(meta)``: why a checkpoint's metadata shows another run's checkpoint (another
    run id, or a copy of the config that differs from this run's, but in its length:
    `LENGTHS`), else ``None``. A setting the copy lacks (added to jtricks after the run
    started) differs only when this run's is not its default."""
    plain = {k: v for k, v in _plain(settings).items() if k not in LENGTHS}
    defaults = _plain(TrainConfig().to_dict())

    def why(meta: dict) -> str | None:
        run = meta.get("run")
        if identity is not None and isinstance(run, dict) and run.get("id") != identity["id"]:
            return f"written by run {run.get('id')}; this run is {identity['id']}"
        started = meta.get("config")
        if isinstance(started, dict):
            started = {**{k: v for k, v in defaults.items() if k in plain}, **_plain(started)}
            started = {k: v for k, v in started.items() if k not in LENGTHS}
        if isinstance(started, dict) and started != plain:
            changed = [
                k for k in sorted(set(started) | set(plain)) if started.get(k) != plain.get(k)
            ]
            return "its settings differ: " + ", ".join(
                f"{k}: {started.get(k)!r} there, {plain.get(k)!r} here" for k in changed[:4]
            )
        return None

    return why


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as JSON gives them back (tuples become lists)."""
    return json.loads(json.dumps(settings))


__all__ = [
    "LENGTHS",
    "check_same_data",
    "config_digest",
    "foreign_checker",
    "load_run_config",
    "new_identity",
    "run_identity",
]
