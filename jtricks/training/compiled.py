"""The programs `fit` and `evaluate` share, built once per task and options.

`jtricks.training.options.StepOptions` is everything the compiled programs of a run
depend on besides the model, the optimizer and the shapes: one frozen, hashable object,
the key of the caches below. Every `fit` call with equal options reuses the same step
functions and the same part program (`part_program`), so JAX's own jit cache compiles
each epoch, part or chunk program once per model, optimizer and shapes. `clear_caches`
forgets them all (e.g. between the studies of a long benchmark, or to free the memory of
programs a notebook no longer needs).
"""

from __future__ import annotations

from jtricks.caches import cached, clear_caches
from jtricks.training.data_checks import check_options
from jtricks.training.epoch import epoch_fn, make_part_program
from jtricks.training.options import StepOptions
from jtricks.training.steps import make_eval_step, make_evaluate_fn, make_train_step

DEFAULT = StepOptions()


@cached
def compiled_steps(options: StepOptions = DEFAULT):
    """The ``(train_step, eval_step)`` pair of a run's options; cached, so the programs
    compiled from them are shared by every `fit` call."""
    train_step = make_train_step(
        task=options.task,
        norms=options.norms,
        update_norm=options.update_norm or options.log_every is not None,
        augment=options.augment,
        mix=options.mix,
        num_classes=options.num_classes,
        accumulate=options.accumulate,
        precision=options.precision,
    )
    return train_step, make_eval_step(task=options.task)


@cached
def part_program(options: StepOptions = DEFAULT):
    """The run's one jitted part program (`jtricks.training.epoch.make_part_program`):
    whole in-memory epochs, parts of long ones, stream chunks and the epoch's end all
    are calls of it; cached, so repeated `fit` calls compile once per model, optimizer
    and shapes."""
    train_step, eval_step = compiled_steps(options)
    return make_part_program(
        train_step,
        eval_step,
        options.sharding,
        options.eval_source,
        options.unroll,
        options.step_log,
    )


@cached
def compiled_functions(options: StepOptions = DEFAULT):
    """``(run_epoch, evaluate)``: `part_program` as a whole-epoch function
    (`jtricks.training.epoch.epoch_fn`, the signature of `make_epoch_fn`) and the
    jitted evaluation of `compiled_steps`' eval step."""
    return epoch_fn(part_program(options)), make_evaluate_fn(compiled_steps(options)[1])


__all__ = [
    "StepOptions",
    "check_options",
    "clear_caches",
    "compiled_functions",
    "compiled_steps",
    "part_program",
]
