"""Diagnostics that tell why training fails.

* `check_gradients`: central differences in float64 against `jax.grad`,
  coordinates sampled in every layer, a per-layer table and a verdict.
* `overfit_one_batch`: can the model and optimizer drive the loss on one
  small batch to ~0 (a language model's: to the `memorisation_floor` of its prefixes)?
  If not, something between data, model and update is broken.
* `initial_loss` : at initialisation the loss should be about an all-zero output's
  (``log C`` for a classifier).
* `signal_propagation`: per-layer activation mean / std and gradient norm,
  with flags for vanishing and exploding signals; `track_signal` records it at
  chosen steps of a real run.
* `lr_finder`: K learning rates over an exponential range, trained side by
  side from the same initialisation in one compiled program (`jax.vmap` over the
  optimizer's injected learning rate, `lax.scan` over steps); suggests the rate
  of steepest descent of the loss against log learning rate. `lr_range_test` is
  Smith's single run with a rising rate, at the cost of one run.
* `check_model`: all of the above on a model, an optimizer and data, with a verdict
  table (`diagnose`: the same on names, what ``jtricks diagnose`` runs).

Everything works on a `jtricks.training.TrainState`, so any Flax Linen model
with the ``(x, *, train)`` signature can be diagnosed. What is new relative to
jax / flax / optax: `jax.test_util.check_grads` checks whole functions with a
pass/fail assertion; here the check is per layer of a Flax model, with dropout
fixed and BatchNorm forced to its running averages (through
`flax.linen.intercept_methods`), and reports errors instead of raising.

References:
  Karpathy, "A Recipe for Training Neural Networks" (2019), http://karpathy.github.io/2019/04/25/recipe/;
  Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks" (2010);
  Smith, "Cyclical Learning Rates for Training Neural Networks" (2017), https://arxiv.org/abs/1506.01186
"""

from jtricks.diagnostics.gradcheck import GradCheckReport, check_gradients
from jtricks.diagnostics.initial_loss import InitialLossReport, initial_loss
from jtricks.diagnostics.lr_finder import (
    LRFinderResult,
    LRRangeTestResult,
    LRSweep,
    lr_finder,
    lr_range_test,
    make_lr_sweep,
    range_suggestion,
    smooth_losses,
    steepest_descent,
)
from jtricks.diagnostics.overfit import OverfitReport, memorisation_floor, overfit_one_batch
from jtricks.diagnostics.report import CheckSettings, check_model, diagnose, verdict_table
from jtricks.diagnostics.signal import SignalReport, signal_propagation, track_signal

__all__ = [
    "CheckSettings",
    "GradCheckReport",
    "InitialLossReport",
    "LRFinderResult",
    "LRRangeTestResult",
    "LRSweep",
    "OverfitReport",
    "SignalReport",
    "check_gradients",
    "check_model",
    "diagnose",
    "initial_loss",
    "lr_finder",
    "lr_range_test",
    "make_lr_sweep",
    "memorisation_floor",
    "overfit_one_batch",
    "range_suggestion",
    "signal_propagation",
    "smooth_losses",
    "steepest_descent",
    "track_signal",
    "verdict_table",
]
