"""Hyper-parameter search (trick T21): a space from one line (`parse_space`) and the
samplers that draw its trials (`make_sampler`: grid, quasi-random, Optuna's TPE)."""

from jtricks.search.space import (
    SAMPLERS,
    Choice,
    Sampler,
    make_sampler,
    parse_space,
    trial_config,
)

__all__ = ["SAMPLERS", "Choice", "Sampler", "make_sampler", "parse_space", "trial_config"]
