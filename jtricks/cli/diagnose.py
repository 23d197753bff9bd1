"""``jtricks diagnose``: the diagnostic checks on a model and dataset."""

from __future__ import annotations

import argparse
from typing import Any

from jtricks.errors import ConfigError
from jtricks.rundir import default_out

PARAMS = {"num": "lr_num"}
"""Argument names of `jtricks.diagnostics` whose flag has another name."""


HELP = "run the diagnostic checks on a model and dataset"
DESCRIPTION = (
    "Initial loss, gradient check, overfit one batch, signal propagation and the LR finder; "
    "prints a verdict table and writes diagnose.json and plots to --out. Exit status 1 when "
    "a check fails."
)
SETTINGS = (
    "dataset",
    "task",
    "model",
    "optimizer",
    "learning_rate",
    "batch_size",
    "preprocess",
    "target_scale",
    "seed",
    "overfit_steps",
    "lr_min",
    "lr_max",
    "lr_num",
    "lr_steps",
    "lr_method",
)
"""The flags passed to `jtricks.diagnostics.diagnose` as they are."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    d = sub.add_parser("diagnose", help=HELP, description=DESCRIPTION)
    d.add_argument("--dataset", default="mnist1d", help="dataset spec (training split only)")
    d.add_argument(
        "--task", default=None, help="task spec (default: the dataset's own), as jtricks train"
    )
    d.add_argument("--model", default="cnn", help="model spec")
    d.add_argument("--optimizer", default="adam", help="optimizer spec")
    d.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=1e-2)
    d.add_argument("--batch-size", type=int, default=100)
    d.add_argument("--preprocess", default="standardize")
    d.add_argument(
        "--target-scale",
        default="none",
        help="none, or standardize: a regression learns its targets standardized (as train)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overfit-steps", type=int, default=300)
    d.add_argument(
        "--signal-steps",
        default="0,100,500",
        help="comma-separated steps of an ordinary run at which to report signal propagation",
    )
    d.add_argument("--lr-min", type=float, default=1e-5)
    d.add_argument("--lr-max", type=float, default=1.0)
    d.add_argument("--lr-num", type=int, default=32, help="learning rates tried by the LR finder")
    d.add_argument(
        "--lr-steps",
        type=int,
        default=100,
        help="steps per learning rate (sweep) or of the one run (range)",
    )
    d.add_argument(
        "--lr-method",
        choices=("sweep", "range"),
        default="sweep",
        help="sweep: --lr-num rates trained side by side in one vmapped program; "
        "range: Smith's range test, one run with the rate rising from --lr-min to --lr-max",
    )
    d.add_argument(
        "--out",
        default=None,
        help="folder for diagnose.json and plots (default runs/diagnose-<time>)",
    )
    return d


def run(args: argparse.Namespace, flags: dict[str, str]) -> int:
    """``jtricks diagnose``: exit status 0 when every check passed, else 1."""
    from jtricks.diagnostics import diagnose, verdict_table

    try:
        signal_steps = [int(s) for s in args.signal_steps.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            "--signal-steps must be comma-separated integers such as 0,100,500; got "
            f"{args.signal_steps!r}",
            param="signal_steps",
        ) from None
    out = args.out if args.out is not None else default_out("diagnose")
    settings = {name: getattr(args, name) for name in SETTINGS}
    result = diagnose(**settings, signal_steps=signal_steps, out=out)
    print(verdict_table(result))
    verdict = "all checks passed" if result["passed"] else "some checks FAILED"
    print(f"\n{verdict}; plots and diagnose.json in {result['out']}")
    return 0 if result["passed"] else 1
