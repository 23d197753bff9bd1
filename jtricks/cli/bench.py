"""``jtricks bench``: the AlgoPerf-style optimizer benchmark, ``bench targets`` (set a
suite's targets) and ``bench compare`` of result files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jtricks.errors import ConfigError
from jtricks.rundir import check_writable, create_run_dir, default_out, write_json, write_text
from jtricks.spec import split_top_level

ACTIONS = ("compare", "targets")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "bench",
        help="benchmark optimizers (AlgoPerf protocol), set targets, or compare result files",
        description="jtricks bench [--suite quick|full] [--ruleset external|self-tuning] tunes "
        "and times algorithms on the suite's workloads and writes results.json, results.md, "
        "profile.png, speedup.png and lr_sensitivity.png to --out; jtricks bench targets "
        "--suite S --out FILE sets a suite's targets; jtricks bench compare A.json B.json ... "
        "prints side-by-side tables.",
    )
    b.add_argument("action", nargs="*", metavar="compare FILE... | targets", help="an action")
    b.add_argument("--suite", default="quick", help="quick (for a CPU) or full (for a GPU)")
    b.add_argument("--ruleset", default="external", help="external (tuned) or self-tuning")
    b.add_argument("--algorithms", default=None, help="comma-separated, e.g. nadamw,adamw,lion")
    b.add_argument("--workloads", default=None, help="comma-separated subset of the suite's")
    b.add_argument("--trials", type=int, default=None, help="trials per study (suite default)")
    b.add_argument("--studies", type=int, default=None, help="studies (suite default)")
    b.add_argument("--search-space", default=None, help="JSON file: {name: {low, high, scale}}")
    b.add_argument("--targets", default=None, help="JSON target file (default: the suite's)")
    b.add_argument("--data-dir", default=None, help="cifar-10-batches-py folder: adds CIFAR-10")
    b.add_argument("--seed", type=int, default=0, help="seed of the trial points and run seeds")
    b.add_argument("--reruns", type=int, default=None, help="targets: reruns of the best point")
    b.add_argument("--out", default=None, help="results folder (default runs/bench-<suite>-<time>)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    return b


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [x for x in split_top_level(value, ",") if x]


def _space(path: str | None):
    from jtricks.bench.search import search_space

    if path is None:
        return None  # each algorithm's own (`jtricks.bench.search.space_for`)
    try:
        spec = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}", param="search_space") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})", param="search_space") from None
    return search_space(spec)


def check_v2(args: argparse.Namespace, *, need_targets: bool = True) -> dict[str, Any]:
    """Every setting of a v2 run checked and resolved before anything is created."""
    from jtricks.bench.algoperf import ALGORITHMS, check_ruleset
    from jtricks.bench.algorithms import check_algorithm
    from jtricks.bench.targets import load_targets
    from jtricks.bench.workloads import select

    check_ruleset(args.ruleset)
    workloads = select(args.suite, _split(args.workloads), args.data_dir)
    algorithms = [check_algorithm(a) for a in _split(args.algorithms) or ALGORITHMS[args.suite]]
    for name in ("trials", "studies", "reruns"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1; got {value}", param=name)
    return {
        "workloads": workloads,
        "algorithms": algorithms,
        "space": _space(args.search_space),
        "targets": load_targets(args.targets, args.suite, workloads) if need_targets else None,
    }


def run(args: argparse.Namespace, flags: dict[str, str]) -> int:
    """``jtricks bench``: run a protocol, set targets or compare files; exit status 0."""
    if args.action:
        return _action(args)
    from jtricks.bench.algoperf import run_algoperf
    from jtricks.bench.algoperf_report import markdown, plot

    settings = check_v2(args)
    run_dir = create_run_dir(
        args.out if args.out is not None else default_out(f"bench-{args.suite}")
    )
    with _Bar(args.progress) as bar:
        results = run_algoperf(
            settings["workloads"],
            settings["targets"],
            suite=args.suite,
            ruleset=args.ruleset,
            algorithms=settings["algorithms"],
            num_trials=args.trials,
            num_studies=args.studies,
            space=settings["space"],
            seed=args.seed,
            progress=bar.update,
        )
    return _write(run_dir, results, markdown, plot)


def _write(run_dir: Path, results: dict, markdown, plot) -> int:
    from jtricks.bench.algoperf import jsonable

    write_json(run_dir / "results.json", jsonable(results))
    md = markdown(results)
    write_text(run_dir / "results.md", md)
    plot(results, run_dir)
    print(md)
    figures = "profile.png, speedup.png, lr_sensitivity.png"
    print(f"results.json, results.md, {figures} in {run_dir}")
    return 0


def _action(args: argparse.Namespace) -> int:
    from jtricks.bench import compare

    action = args.action[0]
    if action not in ACTIONS:
        raise ConfigError(
            f"unknown bench action {action!r}; use `jtricks bench [--suite ...]`, "
            "`jtricks bench targets --suite S --out FILE` or `jtricks bench compare A.json B.json`",
            param="action",
        )
    if action == "compare":
        print(compare(args.action[1:]))
        return 0
    return _set_targets(args)


def _set_targets(args: argparse.Namespace) -> int:
    """``jtricks bench targets``: tune the target-setting algorithms, write the file."""
    from jtricks.bench.targets import RERUNS, TARGET_TRIALS, set_targets

    if args.out is None:
        raise ConfigError("bench targets needs --out FILE.json", param="out")
    if Path(args.out).is_dir():
        raise ConfigError(
            f"bench targets writes one file; --out {args.out} is a folder", param="out"
        )
    check_writable(Path(args.out).parent, "out")  # before the tuning, not after it
    settings = check_v2(args, need_targets=False)
    with _Bar(args.progress) as bar:
        targets = set_targets(
            settings["workloads"],
            settings["space"],
            num_trials=args.trials or TARGET_TRIALS[args.suite],
            reruns=args.reruns or RERUNS,
            seed=args.seed,
            progress=lambda: bar.update("setting targets"),
        )
    from jtricks.rundir import environment

    targets["suite"] = args.suite
    targets["command"] = " ".join(["jtricks bench targets", *_typed(args)])
    targets["environment"] = environment()
    write_json(Path(args.out), targets)
    print(json.dumps(targets["workloads"], indent=1))
    return 0


def _typed(args: argparse.Namespace) -> list[str]:
    """The settings of a targets run, as flags (for the file's record)."""
    names = ("suite", "workloads", "trials", "reruns", "search_space", "seed")
    return [
        f"--{n.replace('_', '-')} {getattr(args, n)}" for n in names if getattr(args, n) is not None
    ]


class _Bar:
    """A one-line rich status of the trial running now (nothing without progress)."""

    def __init__(self, on: bool) -> None:
        self.on, self.status = on, None

    def __enter__(self) -> _Bar:
        if self.on:
            from rich.console import Console

            self.status = Console(stderr=True).status("bench")
            self.status.start()
        return self

    def update(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)

    def __exit__(self, *exc: Any) -> None:
        if self.status is not None:
            self.status.stop()
