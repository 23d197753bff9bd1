"""Optimizers, gradient transforms and schedules in optax's protocol.

* `alias`: named optimizers (`sgd`, `momentum`, `adagrad`, `normalized_sgd`, `rmsprop`,
  `adam`, `adamw`, `adadelta`), each a chain ending in a learning-rate scale.
* `transforms`: the building blocks (momentum forms, clipping variants, penalties).
* `schedules`: learning-rate schedules.
* `fused`: `fused(tx)` runs an element-wise chain over one flat buffer per dtype group.
* `pipeline`: `build_optimizer` from a spec such as ``"adam(lr=1e-3) | clip_global_norm(1.0) | l2(1e-4)"``,
  and `param_groups` (a rule and a rate multiplier per group of parameters, `groups`).
* `sweep`: `sweepable(factory)`, optimizers equal up to their injected numbers, so a
  hyper-parameter sweep compiles once (`build_optimizer` does the same for its specs).
* `eval_params`: the evaluation parameters an optimizer state declares (schedule-free).
* `lookahead`: `lookahead(tx, sync_period, alpha)`, slow weights in the optimizer state.
"""

from jtricks.optim.alias import (
    adadelta,
    adagrad,
    adam,
    adamw,
    momentum,
    normalized_sgd,
    rmsprop,
    sgd,
)
from jtricks.optim.eval_params import optimizer_eval_params, register_eval_params
from jtricks.optim.fused import (
    Flat,
    FusedState,
    Layout,
    flatten_params,
    fused,
    unflatten_params,
)
from jtricks.optim.lookahead import LookaheadState, lookahead
from jtricks.optim.pipeline import (
    OPTIMIZERS,
    TRANSFORMS,
    build_optimizer,
    current_learning_rate,
    param_groups,
    set_learning_rate,
)
from jtricks.optim.schedules import SCHEDULE_NAMES, build_schedule
from jtricks.optim.sweep import Keyed, sweepable
from jtricks.optim.transforms import (
    clip_by_value,
    clip_global_norm,
    clip_global_norm_unit,
    clip_per_leaf_norm,
    decoupled_weight_decay,
    elastic_net,
    l1,
    l1_prox,
    l2,
    masked,
    momentum_chain,
    normalize_by_global_norm,
    scale_by_adagrad,
    scale_by_damped_momentum,
    scale_by_plateau,
    weights_mask,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULE_NAMES",
    "TRANSFORMS",
    "Flat",
    "FusedState",
    "Keyed",
    "Layout",
    "LookaheadState",
    "adadelta",
    "adagrad",
    "adam",
    "adamw",
    "build_optimizer",
    "build_schedule",
    "clip_by_value",
    "clip_global_norm",
    "clip_global_norm_unit",
    "clip_per_leaf_norm",
    "current_learning_rate",
    "decoupled_weight_decay",
    "elastic_net",
    "flatten_params",
    "fused",
    "l1",
    "l1_prox",
    "l2",
    "lookahead",
    "masked",
    "momentum",
    "momentum_chain",
    "normalize_by_global_norm",
    "normalized_sgd",
    "optimizer_eval_params",
    "param_groups",
    "register_eval_params",
    "rmsprop",
    "scale_by_adagrad",
    "scale_by_damped_momentum",
    "scale_by_plateau",
    "set_learning_rate",
    "sgd",
    "sweepable",
    "unflatten_params",
    "weights_mask",
]
