"""``jtricks bench``: the optimizer benchmark suite, and ``bench compare`` of result files."""

from __future__ import annotations

import argparse
from typing import Any

from jtricks.errors import ConfigError, unknown_name
from jtricks.rundir import create_run_dir, default_out, write_json, write_text
from jtricks.spec import split_top_level


def add_parser(sub: Any) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "bench",
        help="benchmark optimizers: problems x optimizers x seeds, or compare result files",
        description="jtricks bench [--suite quick|full] runs the suite and writes results.json, "
        "results.md, curves.png and profile.png to --out; "
        "jtricks bench compare A.json B.json ... prints side-by-side tables with speedups.",
    )
    b.add_argument("compare", nargs="*", metavar="compare FILE", help="compare FILE FILE ...")
    b.add_argument("--suite", default="quick", help="quick (for a CPU) or full (for a GPU)")
    b.add_argument("--optimizers", default=None, help="comma-separated subset, e.g. sgd,adam")
    b.add_argument(
        "--problems", default=None, help="comma-separated subset of the suite's problems"
    )
    b.add_argument("--seeds", type=int, default=None, help="seeds per optimizer (suite default)")
    b.add_argument("--out", default=None, help="results folder (default runs/bench-<suite>-<time>)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    return b


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [x for x in split_top_level(value, ",") if x]


def check_args(args: argparse.Namespace) -> None:
    """Every name and number of a suite run, checked before anything is created."""
    from jtricks.bench.problems import SUITES, suite_problems
    from jtricks.optim import build_optimizer

    if args.suite not in SUITES:
        raise unknown_name("suite", args.suite, SUITES)
    names = {p.name for p in suite_problems(args.suite)}
    for name in _split(args.problems) or []:
        if name not in names:
            raise unknown_name("problem", name, names, param="problems")
    for spec in _split(args.optimizers) or []:
        try:
            build_optimizer(spec)  # any spec: jtricks' names, optax.*, contrib.*, module:factory
        except ConfigError as e:
            raise ConfigError(str(e), param="optimizers") from None
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1; got {args.seeds}", param="seeds")


def run(args: argparse.Namespace, flags: dict[str, str]) -> int:
    """``jtricks bench``: run the suite (or compare files); exit status 0."""
    from jtricks.bench import compare, markdown, plot, run_suite
    from jtricks.bench.runner import jsonable

    if args.compare:
        if args.compare[0] != "compare":
            raise ConfigError(
                f"unknown bench action {args.compare[0]!r}; use `jtricks bench [--suite ...]` or "
                "`jtricks bench compare A.json B.json`",
                param="compare",
            )
        print(compare(args.compare[1:]))
        return 0
    check_args(args)
    run_dir = create_run_dir(
        args.out if args.out is not None else default_out(f"bench-{args.suite}")
    )
    results = run_suite(
        args.suite,
        optimizers=_split(args.optimizers),
        problems=_split(args.problems),
        seeds=args.seeds,
        progress=args.progress,
    )
    write_json(run_dir / "results.json", jsonable(results))
    md = markdown(results)
    write_text(run_dir / "results.md", md)
    plot(results, run_dir)
    print(md)
    print(f"results.json, results.md, curves.png and profile.png in {run_dir}")
    return 0
