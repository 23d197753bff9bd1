"""Training algorithms for the benchmark: an optax optimizer built from a trial's
hyper-parameters.

Every algorithm receives the trial's point of the search space (``learning_rate``,
``one_minus_b1``, ``weight_decay``, ``warmup_fraction``; ``label_smoothing`` goes to the
loss) and the step budget ``T``. The hyper-parameters may be traced JAX scalars: all the
trials of one algorithm on one workload then share one compiled program.

The learning rate follows AlgoPerf's baseline schedule, a linear warm-up from 0 over
``W = max(1, warmup_fraction T)`` steps, then a cosine decay to 0 at ``T``:

``eta_t = lr t / W`` for ``t <= W``, ``eta_t = lr (1 + cos(pi (t - W) / (T - W))) / 2`` after

(`optax.warmup_cosine_decay_schedule` for fixed values; `warmup_cosine` here also takes a
traced warm-up length). Schedule-free AdamW warms up and then stays constant, as its
authors run it.

The algorithms: ``nadamw`` (the baseline), ``adamw``, ``heavy_ball`` and ``nesterov``
(SGD with momentum ``b1`` and L2 weight decay), ``lion``, ``schedule_free_adamw`` and
``muon`` (optax and optax.contrib); any other optimizer spec that
`jtricks.optim.build_optimizer` knows (``"optax.adabelief"``, ``"contrib.prodigy"``,
...) runs on the same schedule with its other hyper-parameters at their defaults.

References:
  Dahl et al., "Benchmarking Neural Network Training Algorithms" (AlgoPerf, 2023),
  https://arxiv.org/abs/2306.07179; Dozat, "Incorporating Nesterov Momentum into Adam"
  (2016); Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019); Chen et
  al., "Symbolic Discovery of Optimization Algorithms" (Lion, 2023); Defazio et al.,
  "The Road Less Scheduled" (2024); Jordan et al., "Muon" (2024).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import optax

from jtricks.errors import ConfigError

Hparams = Mapping[str, Any]

BASELINE = "nadamw"


def _get(hp: Hparams, name: str, default: float) -> Any:
    return hp[name] if name in hp else default


def warmup_cosine(hp: Hparams, total_steps: int) -> optax.Schedule:
    """AlgoPerf's warm-up then cosine schedule (module docstring), traceable in every
    hyper-parameter."""
    lr = hp["learning_rate"]
    warmup = jnp.clip(
        jnp.round(_get(hp, "warmup_fraction", 0.05) * total_steps), 1, total_steps - 1
    )

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        decay = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip((t - warmup) / (total_steps - warmup), 0, 1)))
        return lr * jnp.where(t <= warmup, t / warmup, decay)

    return schedule


def _warmup_only(hp: Hparams, total_steps: int) -> optax.Schedule:
    warmup = jnp.clip(jnp.round(_get(hp, "warmup_fraction", 0.05) * total_steps), 1, total_steps)
    return lambda count: hp["learning_rate"] * jnp.minimum(1.0, count / warmup)


def _b1(hp: Hparams) -> Any:
    return 1.0 - _get(hp, "one_minus_b1", 0.1)


def _momentum(nesterov: bool) -> Callable[[Hparams, int], optax.GradientTransformation]:
    def make(hp: Hparams, total_steps: int) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(_get(hp, "weight_decay", 0.0)),
            optax.sgd(warmup_cosine(hp, total_steps), momentum=_b1(hp), nesterov=nesterov),
        )

    return make


ALGORITHMS: dict[str, Callable[[Hparams, int], optax.GradientTransformation]] = {
    "nadamw": lambda hp, T: optax.nadamw(
        warmup_cosine(hp, T), b1=_b1(hp), weight_decay=_get(hp, "weight_decay", 0.0)
    ),
    "adamw": lambda hp, T: optax.adamw(
        warmup_cosine(hp, T), b1=_b1(hp), weight_decay=_get(hp, "weight_decay", 0.0)
    ),
    "heavy_ball": _momentum(nesterov=False),
    "nesterov": _momentum(nesterov=True),
    "lion": lambda hp, T: optax.lion(
        warmup_cosine(hp, T), b1=_b1(hp), weight_decay=_get(hp, "weight_decay", 0.0)
    ),
    "schedule_free_adamw": lambda hp, T: optax.contrib.schedule_free_adamw(
        _warmup_only(hp, T), b1=_b1(hp), weight_decay=_get(hp, "weight_decay", 0.0)
    ),
    "muon": lambda hp, T: optax.contrib.muon(
        warmup_cosine(hp, T), beta=_b1(hp), weight_decay=_get(hp, "weight_decay", 0.0)
    ),
}

DEFAULT_HPARAMS = {
    "learning_rate": 1e-3,
    "one_minus_b1": 0.1,
    "weight_decay": 1e-4,
    "warmup_fraction": 0.05,
    "label_smoothing": 0.0,
}
"""The self-tuning ruleset's point for the Adam family, never tuned."""

DEFAULT_LEARNING_RATES = {
    "heavy_ball": 0.1,
    "nesterov": 0.1,
    "lion": 1e-4,
    "schedule_free_adamw": 2.5e-3,
    "muon": 0.02,
}
"""Each algorithm's usual learning rate where it is not Adam's 1e-3 (optax's defaults
for schedule-free AdamW; the authors' for Lion and Muon)."""


def defaults_for(name: str) -> dict[str, float]:
    """Algorithm ``name``'s self-tuning point: `DEFAULT_HPARAMS` with its usual rate."""
    rate = DEFAULT_LEARNING_RATES.get(name, DEFAULT_HPARAMS["learning_rate"])
    return {**DEFAULT_HPARAMS, "learning_rate": rate}


def check_algorithm(name: Any) -> Any:
    """``name`` if it is one of `ALGORITHMS` or an optimizer spec `build_optimizer` accepts
    (a callable ``learning_rate -> GradientTransformation`` among them).

    Raises:
      ConfigError: naming the algorithm and listing the built-in ones.
    """
    from jtricks.optim import build_optimizer

    if isinstance(name, str) and name in ALGORITHMS:
        return name
    try:
        build_optimizer(name)
    except ConfigError as e:
        raise ConfigError(
            f"unknown algorithm {name!r}: not one of {', '.join(ALGORITHMS)} and not an "
            f"optimizer spec ({e})",
            param="algorithms",
        ) from None
    return name


def build_algorithm(name: str, hp: Hparams, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of algorithm ``name`` for hyper-parameters ``hp`` and ``total_steps``."""
    from jtricks.optim import build_optimizer

    if name in ALGORITHMS:
        return ALGORITHMS[name](hp, total_steps)
    return build_optimizer(name, warmup_cosine(hp, total_steps))


def eval_params(name: str, params: Any, opt_state: Any) -> Any:
    """The parameters to evaluate: schedule-free AdamW evaluates its averaged point
    (`optax.contrib.schedule_free_eval_params`), every other algorithm its iterate."""
    if name == "schedule_free_adamw":
        return optax.contrib.schedule_free_eval_params(opt_state, params)
    return params


def labelled_algorithms(algorithms: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """``{label: spec}`` for the results (JSON keys): a dict as given; a string labels itself;
    a callable by its ``__name__``.

    Raises:
      ConfigError: a lambda (no name: give a dict ``{label: callable}``), a repeated
        label, or an empty list.
    """
    if isinstance(algorithms, Mapping):
        items = list(algorithms.items())
    elif isinstance(algorithms, str):
        items = [(algorithms, algorithms)]
    else:
        items = []
        for spec in algorithms:
            if isinstance(spec, str):
                items.append((spec, spec))
                continue
            name = getattr(spec, "__name__", None)
            if not callable(spec) or not name or name == "<lambda>":
                raise ConfigError(
                    f"algorithm {spec!r} has no name for the results; pass a dict "
                    "{label: spec} (e.g. {'nesterov': lambda lr: optax.sgd(lr, 0.9, nesterov=True)})",
                    param="algorithms",
                )
            items.append((name, spec))
    labels = [label for label, _ in items]
    if not items or any(not isinstance(label, str) or not label for label in labels):
        raise ConfigError(
            f"algorithms must be non-empty, with non-empty string labels; got {labels!r}",
            param="algorithms",
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"algorithm labels repeat: {repeated}", param="algorithms")
    return dict(items)
