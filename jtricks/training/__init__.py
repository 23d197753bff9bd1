"""Training core: `TrainState`, pure steps, and the `fit` loop."""

from jtricks.training.callbacks import (
    EarlyStopping,
    MemberEarlyStopping,
    ReduceLROnPlateau,
    StopTraining,
)
from jtricks.training.checkpointer import Checkpointer
from jtricks.training.class_report import ClassReport, class_report
from jtricks.training.compiled import clear_caches
from jtricks.training.epoch import make_epoch_fn
from jtricks.training.fit import Callback, History, evaluate, fit
from jtricks.training.model import nnx_module
from jtricks.training.options import FitOptions
from jtricks.training.predict import predict
from jtricks.training.state import TrainState, create_train_state
from jtricks.training.steps import make_eval_step, make_evaluate_fn, make_train_step
from jtricks.training.tta import evaluate_tta, tta_log_probs, tta_predict

__all__ = [
    "Callback",
    "Checkpointer",
    "ClassReport",
    "EarlyStopping",
    "FitOptions",
    "History",
    "MemberEarlyStopping",
    "ReduceLROnPlateau",
    "StopTraining",
    "TrainState",
    "class_report",
    "clear_caches",
    "create_train_state",
    "evaluate",
    "evaluate_tta",
    "fit",
    "make_epoch_fn",
    "make_eval_step",
    "make_evaluate_fn",
    "make_train_step",
    "nnx_module",
    "predict",
    "tta_log_probs",
    "tta_predict",
]
