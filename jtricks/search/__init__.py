"""Hyper-parameter search (trick T21): a space from one line (`parse_space`), the
samplers that draw its trials (`make_sampler`: grid, quasi-random, Optuna's TPE), and
`search`, which trains them side by side, selects on the validation split and tests the
best trial once."""

from jtricks.search.runner import SearchResult, SearchSettings, search
from jtricks.search.space import (
    SAMPLERS,
    Choice,
    Integers,
    Sampler,
    make_sampler,
    parse_space,
    trial_config,
)

__all__ = [
    "SAMPLERS",
    "Choice",
    "Integers",
    "Sampler",
    "SearchResult",
    "SearchSettings",
    "make_sampler",
    "parse_space",
    "search",
    "trial_config",
]
