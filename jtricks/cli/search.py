"""``jtricks search``: a hyper-parameter search (`jtricks.search.search`) with every
``jtricks train`` flag for what the space does not vary."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jtricks.cli.common import refuse_beside_resume
from jtricks.cli.train import add_config_flags, metrics_line, typed_settings
from jtricks.errors import ConfigError
from jtricks.rundir import default_out


def add_parser(sub: Any) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "search",
        help="search hyper-parameters, trials side by side in one program",
        description="Hyper-parameter search: trials drawn from --space train side by side "
        "(those differing only in learning rate, optimizer arguments and label smoothing as one "
        "vmapped program), are selected "
        "on the validation split, and the best one is evaluated once on the test split. "
        "Writes search.json, trials.jsonl, best.json, search.png and best/ (a run folder "
        "for jtricks train --pretrained or --resume) to --out.",
    )
    s.add_argument(
        "--space",
        default=None,
        help="the search space: 'lr=loguniform(1e-4, 1e-1), batch_size=choice(32, 64), "
        "label_smoothing=uniform(0, 0.2), weight_decay=loguniform(1e-6, 1e-2)' (train "
        "settings or optimizer arguments)",
    )
    s.add_argument(
        "--trials",
        type=int,
        default=None,
        help="number of trials (default 20; --method grid: every point of the grid)",
    )
    s.add_argument(
        "--method",
        default="random",
        help="grid, random (quasi-random Halton points) or tpe (Optuna; pip install "
        "'jtricks[search]') (default random)",
    )
    s.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="trials per program (default: as many as fit in device memory)",
    )
    s.add_argument(
        "--metric",
        default=None,
        help="the validation metric that ranks trials (default accuracy where the task "
        "reports it, else loss; loss-like metrics are minimised)",
    )
    s.add_argument("--grid-points", type=int, default=3, help="values per range for --method grid")
    add_config_flags(s)
    s.add_argument(
        "--out", default=None, help="search folder (default runs/search-<time>); new or empty"
    )
    s.add_argument(
        "--resume",
        default=None,
        metavar="SEARCH_DIR",
        help="continue the search in SEARCH_DIR: finished trials are kept",
    )
    s.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no line after each group of trials (as jtricks train and bench take it)",
    )
    return s


def run(args: argparse.Namespace, flags: dict[str, str]) -> int:
    """``jtricks search``: exit status 0, or 1 when every trial failed."""
    from jtricks.run import TrainConfig
    from jtricks.search.runner import SearchSettings, search

    given = typed_settings(args)
    if args.resume is not None:
        extra = [flags[name] for name in given] + (["--out"] if args.out else [])
        refuse_beside_resume("search's own search.json", extra + ["--space"] * bool(args.space))
        result = search(resume=args.resume, log=_log if args.progress else None)
    else:
        if args.space is None:
            raise ConfigError(
                "give the search space: --space 'lr=loguniform(1e-4, 1e-1)'", param="space"
            )
        settings = SearchSettings(
            args.space,
            args.trials,
            args.method,
            args.parallel,
            args.metric,
            args.grid_points,
        )
        out = args.out if args.out is not None else default_out("search")
        log = _log if args.progress else None
        result = search(TrainConfig(**given), settings, out=out, log=log)
    return report(result)


def _log(line: str) -> None:
    print(f"jtricks search: {line}", file=sys.stderr)


def report(result: Any) -> int:
    """Print the table of trials (best first), the best trial's test metrics and the
    folder; 1 when no trial finished."""
    from jtricks.search.outputs import table

    names = list(result.records[0]["values"]) if result.records else []
    print(table(result.records, names, result.metric))
    if result.best is None:
        print("jtricks search: every trial failed (non-finite)", file=sys.stderr)
        return 1
    print(
        f"best trial {result.best['trial']}: {result.best['values']}  "
        f"val_{result.metric} {result.best['score']:.4f}  {metrics_line(result.test)}  "
        f"search folder {result.out}"
    )
    return 0
