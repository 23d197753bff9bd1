"""Optimizer benchmark: `jtricks bench` (AlgoPerf's rules: `run_algoperf`), targets and
`jtricks bench compare`."""

from jtricks.bench.algoperf import SCHEMA, jsonable, run_algoperf
from jtricks.bench.algoperf_report import markdown, plot
from jtricks.bench.algorithms import ALGORITHMS, build_algorithm, labelled_algorithms
from jtricks.bench.report import compare
from jtricks.bench.scoring import performance_profile, performance_ratios, profile_score
from jtricks.bench.targets import load_targets, set_targets
from jtricks.bench.workloads import SUITES, Workload, suite_workloads

__all__ = [
    "ALGORITHMS",
    "SCHEMA",
    "SUITES",
    "Workload",
    "build_algorithm",
    "compare",
    "jsonable",
    "labelled_algorithms",
    "load_targets",
    "markdown",
    "performance_profile",
    "performance_ratios",
    "plot",
    "profile_score",
    "run_algoperf",
    "set_targets",
    "suite_workloads",
]
