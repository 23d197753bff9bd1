"""What a search writes into its folder: ``search.json`` (its settings), ``trials.jsonl``
(one record per finished trial), ``best.json``, ``search.png`` and ``best/``, the best
trial as a run folder of its own (config, metrics, checkpoint) that ``jtricks train
--pretrained`` and ``--resume`` take."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jtricks.plotting import save_figure, subplots
from jtricks.run.config import TrainConfig
from jtricks.run.outputs import RawModel
from jtricks.run.resume import config_digest, new_identity
from jtricks.rundir import environment, write_json, write_jsonl
from jtricks.training import TrainState
from jtricks.training.checkpointer import Checkpointer


@dataclass
class SearchResult(RawModel):
    """A finished search: every trial's record, the best one, its test metrics, and the
    best trial's model: ``state`` (the parameters it was tested with), ``scaler`` and
    ``task``, so that ``predict(raw_x)``, ``inputs`` and ``predict_combined`` work as a
    run's (`jtricks.run.outputs.RawModel`) with no folder and no second training."""

    records: list[dict[str, Any]]
    metric: str
    best: dict[str, Any] | None
    test: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    best_config: TrainConfig | None = None
    state: Any = field(default=None, repr=False)
    scaler: Any = field(default=None, repr=False)
    task: Any = field(default=None, repr=False)
    tta: Any = field(default=None, repr=False)
    classes: tuple[str, ...] | None = None

    @property
    def config(self) -> TrainConfig | None:
        """The best trial's config (what `RawModel` reads its ``eval_params`` from)."""
        return self.best_config


LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "perplexity")
"""Metrics a search minimises; it maximises every other one."""


def better(metric: str, a: float | None, b: float | None) -> bool:
    """Whether score ``a`` beats ``b`` (``None``: a failed trial, beaten by any score)."""
    if a is None:
        return False
    if b is None:
        return True
    return a < b if metric in LOWER_IS_BETTER else a > b


def read_trials(path: Path) -> list[dict[str, Any]]:
    """The finished trials' records of ``trials.jsonl`` (a line cut by a kill is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def append_trial(path: Path, record: dict[str, Any]) -> None:
    """Append one finished trial to ``trials.jsonl`` and flush it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def table(records: list[dict[str, Any]], names: list[str], metric: str) -> str:
    """The trials as a text table, best first (failed ones last)."""
    ranked = sorted(
        records,
        key=lambda r: (
            r["score"] is None,
            0.0 if r["score"] is None else r["score"] * (1 if metric in LOWER_IS_BETTER else -1),
        ),
    )
    head = ["trial", *names, f"val_{metric}", "status"]
    rows = [
        [str(r["trial"]), *(_cell(r["values"][n]) for n in names), _cell(r["score"]), r["status"]]
        for r in ranked
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join(
        "  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *rows]
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_search(records: list[dict[str, Any]], space: dict[str, Any], metric: str, path: Path):
    """``search.png``: the validation metric against each hyper-parameter (log axis for a
    log-scaled range), one point per finished trial."""
    done = [r for r in records if r["score"] is not None and math.isfinite(r["score"])]
    fig, axes = subplots(1, len(space), figsize=(4 * len(space), 3.5), squeeze=False)
    for ax, (name, dim) in zip(axes[0], space.items(), strict=True):
        xs = [r["values"][name] for r in done]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
            labels = [str(v) for v in dim.values]
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(xs, [r["score"] for r in done], s=18)
        ax.set(xlabel=name, ylabel=f"val_{metric}", xscale=getattr(dim, "scale", "linear"))
    save_figure(fig, path, axes=tuple(axes[0]))


def member_records(history_records: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """Member ``i``'s epoch records (its own validation metrics) from a group's records."""
    records = []
    for r in history_records:
        own = {"epoch": r["epoch"], "step": r["step"]}
        for key, value in r.items():
            if key.startswith("val_member_"):
                own["val_" + key[len("val_member_") :]] = float(value[i])
        records.append(own)
    return records


def write_best_run(
    folder: Path, config: TrainConfig, state: TrainState, records: list, recorded: dict
) -> None:
    """``folder`` as a run folder of ``config`` (config.json with what it ``recorded`` of
    the data, `RunData.recorded`; metrics.jsonl; a checkpoint of ``state`` at the last
    epoch), written beside and renamed over the old one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    settings = json.loads(json.dumps(config.to_dict()))
    identity = new_identity(settings)
    write_json(
        tmp / "config.json",
        {
            "config": settings,
            "config_sha256": config_digest(settings),
            **recorded,
            "run": identity,
            "environment": environment(),
        },
    )
    write_jsonl(tmp / "metrics.jsonl", records)
    ckpt = Checkpointer(
        tmp / "checkpoints",
        every=config.checkpoint_every,
        keep=1,
        meta_fn=lambda record, s: {"callbacks": {}, "config": settings, "run": identity},
        background=False,
    )
    ckpt.records = list(records[:-1])  # the state is the last epoch's: saved as that one
    ckpt.on_epoch_end(records[-1], state)
    ckpt.on_train_end(state)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def write_stopped_summary(folder: Path, kept_epoch: int, test: dict[str, float]) -> None:
    """``summary.json`` of a best trial that stopped early, as `jtricks train` writes one
    for such a run: the test metrics of the kept state, its epoch's validation metrics and
    step, ``restored_epoch``. The folder is then a finished run (``--pretrained`` and
    `jtricks.load_run` take it; ``--resume`` says it finished)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    kept = next(r for r in rows if r["epoch"] == kept_epoch)
    write_json(
        folder / "summary.json",
        {
            **{f"test_{k}": v for k, v in test.items()},
            **{k: v for k, v in kept.items() if k.startswith("val_")},
            "steps": kept["step"],
            "epochs": rows[-1]["epoch"],
            "stopped": f"val_loss stopped improving; kept epoch {kept_epoch}'s state",
            "restored_epoch": kept_epoch,
        },
    )
