"""Training core: `TrainState`, pure steps, and the `fit` loop."""

from jtricks.train.callbacks import EarlyStopping, ReduceLROnPlateau, StopTraining
from jtricks.train.fit import Callback, History, evaluate, fit
from jtricks.train.state import TrainState, create_train_state
from jtricks.train.steps import make_epoch_fn, make_eval_step, make_evaluate_fn, make_train_step

__all__ = [
    "Callback",
    "EarlyStopping",
    "History",
    "ReduceLROnPlateau",
    "StopTraining",
    "TrainState",
    "create_train_state",
    "evaluate",
    "fit",
    "make_epoch_fn",
    "make_eval_step",
    "make_evaluate_fn",
    "make_train_step",
]
