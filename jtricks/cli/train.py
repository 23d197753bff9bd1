"""``jtricks train``: its flags are derived from `TrainConfig`'s fields (each field's
flag, type, default and help are declared once, in `jtricks.run.config`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from jtricks.cli.common import refuse_beside_resume
from jtricks.errors import ConfigError
from jtricks.run import TrainConfig, recipe
from jtricks.run.config import flag_of
from jtricks.run.outputs import floor_entries
from jtricks.rundir import default_out


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field. Defaults are suppressed, so the parsed namespace
    holds exactly the fields the user typed (`typed_settings`)."""
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        group = parser
        if meta["exclusive"] is not None:
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            group = groups[meta["exclusive"]]
        kw: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS)
        if meta["parse"] is bool:
            kw["action"] = "store_false" if flag_of(field).startswith("--no-") else "store_true"
            kw["help"] = meta["help"]
        else:
            kw.update(type=meta["parse"], metavar=meta["metavar"])
            shown = "off" if field.default is None else repr(field.default)
            kw["help"] = f"{meta['help']} (default: {shown})"
        group.add_argument(flag_of(field), *meta["aliases"], **kw)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train",
        help="train a model and write a run folder",
        description="Train a model; writes config.json, metrics.jsonl, curves.png and "
        "summary.json to --out. The flags from --dataset to --chunk are the fields of jtricks.TrainConfig.",
    )
    t.add_argument(
        "--recipe",
        default=None,
        help="start from a named setting (jtricks.configs: default, tricks: BatchNorm + AdamW "
        "+ one-cycle + shift augmentation on the paper CNN; tricks_wide: the same on a wider "
        "residual CNN); flags you give override it",
    )
    add_config_flags(t)
    t.add_argument(
        "--out", default=None, help="run folder (default runs/train-<time>); must be new or empty"
    )
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest intact checkpoint, with its own "
        "config; with --epochs N or --steps N, train it on to that length, finished or not",
    )
    t.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process training: the address of process 0 (calls jax.distributed.initialize)",
    )
    t.add_argument("--num-processes", type=int, default=None, help="with --coordinator")
    t.add_argument("--process-id", type=int, default=None, help="with --coordinator: 0 .. N-1")
    t.add_argument(
        "--distributed-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --coordinator: give up with one line when the processes have not all "
        "joined after SECONDS, or when they wait that long for a process that stopped "
        "(default 60)",
    )
    t.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="print a line every N epochs (and the first and last)",
    )
    t.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar or epoch lines",
    )
    return t


def typed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `TrainConfig` fields the user typed, with their values (a typed flag wins over
    a recipe even at its default: ``--recipe tricks --tta 1`` turns TTA off)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }


def run(args: argparse.Namespace, flags: dict[str, str]) -> int:
    """``jtricks train``: exit status 0, or 1 when the run diverged."""
    import jtricks.run
    from jtricks.training.progress import RichReporter

    start_processes(args)
    given = typed_settings(args)
    if args.log_every < 1:
        raise ConfigError(f"--log-every must be >= 1; got {args.log_every}", param="log_every")
    reporter = RichReporter(every=args.log_every) if args.progress else None
    if args.resume is not None:
        length = {k: given.pop(k) for k in ("epochs", "steps") if k in given}  # train it on
        extra = [flags[name] for name in given] + (["--out"] if args.out else [])
        own = "run's own config.json (--epochs or --steps alone train it on to that length)"
        refuse_beside_resume(own, extra + ["--recipe"] * bool(args.recipe))
        stop = stop_signals()
        result = jtricks.run.train(resume=args.resume, reporter=reporter, stop=stop, **length)
    else:
        config = recipe(args.recipe, **given) if args.recipe else TrainConfig(**given)
        out = args.out if args.out is not None else default_out("train")
        result = jtricks.run.train(config, out=out, reporter=reporter, stop=stop_signals())
    report(result)
    return 1 if result.history.diverged else 0


def stop_signals():
    """SIGTERM and Ctrl-C as a flag the run polls while it trains (`StopSignals`, entered
    by `jtricks.run.train` around `fit`): the run saves where it is and stops (several
    processes agree on where: `AgreedStop`). Before and after training they keep
    Python's behaviour, so Ctrl-C during data loading ends the command at once."""
    from jtricks.training.preemption import StopSignals

    return StopSignals()


def start_processes(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when the three multi-process flags are given, or
    with no arguments when a launcher started several processes (SLURM, Open MPI, an
    indexed Kubernetes Job: `initialize_from_cluster`)."""
    multi = (args.coordinator, args.num_processes, args.process_id)
    from jtricks.cli.fatal import one_line_fatal

    if all(v is None for v in multi):
        from jtricks.training.processes import detect_cluster, initialize_from_cluster

        if detect_cluster() is not None:
            one_line_fatal()
        found = initialize_from_cluster()
        if found is not None:
            name, size, rank = found
            where = "" if size is None else f" (process {rank} of {size})"
            print(f"jtricks: {name} started this process{where}: jax.distributed", file=sys.stderr)
        return
    if any(v is None for v in multi):
        raise ConfigError(
            "--coordinator, --num-processes and --process-id go together; got "
            f"{args.coordinator!r}, {args.num_processes!r}, {args.process_id!r}",
            param="coordinator",
        )
    from jtricks.training.processes import check_join, initialize

    check_join(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)
    one_line_fatal()
    initialize(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)


def report(result: Any) -> None:
    """Print the run's outcome: warnings on stderr, then the test metrics (members, EMA,
    single view) and a last line with the run folder."""
    if result.history.stopped:
        print(f"stopped: {result.history.stopped}", file=sys.stderr)
    if result.history.diverged and result.out is not None:
        print(
            f"continue from the kept state with other settings: jtricks train --pretrained "
            f"{result.out} --lr <a lower rate> --out <new folder>",
            file=sys.stderr,
        )
    if result.warning:
        print(f"jtricks train: warning: {result.warning}", file=sys.stderr)
    test = result.test
    for name, values in test.items():  # an ensemble's members, metric by metric
        if name.startswith("member_") and name != "member_loss":
            print(f"member test_{name[7:]}  " + "  ".join(f"{a:.4f}" for a in values))
    if "ema_loss" in test:
        print(
            metrics_line({k[4:]: v for k, v in test.items() if k.startswith("ema_")}, "ema test_")
        )
    if "tta_views" in test:
        single = {k[12:]: v for k, v in test.items() if k.startswith("single_view_")}
        print(
            metrics_line(single, "single-view test_")
            + f"  (below: test-time augmentation, {test['tta_views']} views)"
        )
    line = metrics_line(test)
    if result.loss_floor is not None:
        gap = floor_entries(result.loss_floor, result.task, test)["test_loss_gap"]
        line += f"  loss_floor {result.loss_floor:.4f}  gap {gap:.4f}"
    print(f"{line}  wall {result.wall_s:.1f}s  run folder {result.out}")


def metrics_line(test: dict, prefix: str = "test_") -> str:
    """``test_loss ...  test_<metric> ...`` for the task's metrics (variants left out)."""
    from jtricks.run.outputs import VARIANTS

    return "  ".join(
        f"{prefix}{k} {v:.4f}"
        for k, v in test.items()
        if isinstance(v, float) and not k.startswith(VARIANTS)
    )
