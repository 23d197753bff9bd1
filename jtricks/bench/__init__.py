"""Optimizer benchmark: `jtricks bench` (protocol v2, AlgoPerf's rules: `run_algoperf`;
protocol v1, the learning-rate grid: `run_suite`), targets and `jtricks bench compare`."""

from jtricks.bench.algoperf import run_algoperf
from jtricks.bench.algorithms import ALGORITHMS, build_algorithm
from jtricks.bench.problems import OPTIMIZERS, SUITES, Problem, suite_problems
from jtricks.bench.report import compare, markdown, plot
from jtricks.bench.runner import SCHEMA, jsonable, run_suite, score
from jtricks.bench.scoring import performance_profile, performance_ratios, profile_score
from jtricks.bench.targets import load_targets, set_targets
from jtricks.bench.workloads import Workload, suite_workloads

__all__ = [
    "ALGORITHMS",
    "OPTIMIZERS",
    "SCHEMA",
    "SUITES",
    "Problem",
    "Workload",
    "build_algorithm",
    "compare",
    "jsonable",
    "load_targets",
    "markdown",
    "performance_profile",
    "performance_ratios",
    "plot",
    "profile_score",
    "run_algoperf",
    "run_suite",
    "score",
    "set_targets",
    "suite_problems",
    "suite_workloads",
]
