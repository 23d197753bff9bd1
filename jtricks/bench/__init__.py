"""Optimizer benchmark suite: `jtricks bench` and `jtricks bench compare`."""

from jtricks.bench.problems import OPTIMIZERS, SUITES, Problem, suite_problems
from jtricks.bench.report import compare, markdown, plot
from jtricks.bench.runner import SCHEMA, jsonable, run_suite, score
from jtricks.bench.scoring import performance_profile, performance_ratios, profile_score

__all__ = [
    "OPTIMIZERS",
    "SCHEMA",
    "SUITES",
    "Problem",
    "compare",
    "jsonable",
    "markdown",
    "performance_profile",
    "performance_ratios",
    "plot",
    "profile_score",
    "run_suite",
    "score",
    "suite_problems",
]
