"""A whole epoch (or a stream's chunk) of training steps as one compiled loop of static length.

The loop is a `lax.scan` whose trip count XLA knows (``known_trip_count`` in the compiled
HLO): on an accelerator the device runs every step of it without a host round trip,
where a `lax.while_loop` with a traced bound must copy its predicate to the host after
each iteration. Steps past the call's count, or after a streak of non-finite steps, are
masked instead of skipped (`run_steps`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jtricks.data.batching import epoch_indices, sampled_indices
from jtricks.optim.fused import is_fused
from jtricks.training.data_checks import num_examples
from jtricks.training.distributed import constrain_state, is_sharded_mesh
from jtricks.training.fused_state import flat_train_state, tree_train_state
from jtricks.training.gradients import Batch
from jtricks.training.options import StepLog
from jtricks.training.state import TrainState
from jtricks.training.steps import EvalStep, Metrics, evaluate_batches, is_ensemble, select_tree
from jtricks.trees import tree_norm


@struct.dataclass
class ArrayFeed:
    """The batches of an in-memory epoch, as a program input: step ``j`` of the part takes
    batch ``offset + j`` of epoch ``epoch``'s shuffle (`epoch_indices` of
    ``fold_in(data_key, epoch)`` over ``N // batch_size`` batches), gathered on the device
    from ``data`` (a pytree of device arrays, leading axis N). With ``sampling`` (per-example
    probabilities, `jtricks.data.batching.class_balanced`) the batches are drawn with
    replacement instead (`sampled_indices`), from the same key."""

    data: Any
    data_key: jax.Array
    epoch: jax.Array
    offset: jax.Array
    batch_size: int = struct.field(pytree_node=False)
    sampling: Any = None

    def batch_at(self) -> Callable[[jax.Array], Batch]:
        n = num_examples(self.data)
        key = jax.random.fold_in(self.data_key, self.epoch)
        if self.sampling is None:
            idx = epoch_indices(key, n, self.batch_size, n // self.batch_size)
        else:
            idx = sampled_indices(key, self.sampling, self.batch_size, n // self.batch_size)

        def batch(j):
            row = jnp.minimum(self.offset + j, idx.shape[0] - 1)  # masked steps run past
            return jax.tree.map(lambda a: a[idx[row]], self.data)

        return batch


@struct.dataclass
class ChunkFeed:
    """A stream's chunk as a program input: step ``j`` takes ``chunk[j]`` (leaves
    ``(K, B, ...)``, fed by `jtricks.training.streaming.Feeder`)."""

    chunk: Any

    def batch_at(self) -> Callable[[jax.Array], Batch]:
        return lambda j: jax.tree.map(
            lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, False), self.chunk
        )


def make_part_program(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    eval_step: EvalStep | None = None,
    sharding: Any = None,
    eval_source: str = "auto",
    unroll: int = 1,
    log: StepLog | None = None,
):
    """Compile ``run_part(state, acc, feed, num_steps, max_streak, val=None, *, length,
    finish) -> (state, acc | metrics)``: the one program of `fit`'s engine.

    It runs the first ``num_steps`` (traced) steps of ``feed`` (an `ArrayFeed` or a
    `ChunkFeed`) in a `lax.scan` of static ``length >= num_steps`` steps (`run_steps`),
    adding their metrics into ``acc``; steps past ``num_steps`` are masked (they leave
    the state as it is; ``num_steps=None`` with ``max_streak=None``: every step runs,
    nothing masked). The loop's trip count is static, so XLA knows it
    (``known_trip_count``) and an accelerator runs the whole part without asking the
    host after each step. ``acc`` is the epoch's accumulator so far (`init_accumulator`),
    or the skipped-step streak carried in, which starts a fresh one. With ``finish`` the
    program also ends the epoch and returns its metrics (`epoch_metrics`: the means of
    the step metrics, ``param_norm``, and ``val_<metric>`` of ``val``, ``(batches,
    weights)`` from `pad_batches`, on ``state.evaluation_state(eval_source)``); with
    ``log`` (a `StepLog`) the records of the logged steps come back too, as
    ``acc["rows"]`` or ``metrics["step_rows"]``. The state is donated (its buffers
    reused in place); ``keep=True`` (static) also returns a copy of the state the call
    started from, ``(state, acc | metrics, start)``: made inside the program, it costs
    no dispatch of its own (`fit` keeps it to return on divergence).

    Its calls (static ``length`` and ``finish`` choose the program): a whole epoch is
    ``(streak, length=L, finish=True)``; an epoch in parts starts with ``(streak,
    length=0, finish=False)`` (the zeroed accumulator, no step run), adds each part with
    ``(acc, length=k, finish=False)`` and ends with ``(acc, feed=None, length=0,
    finish=True)``; a stream's chunks are parts of ``length=K``.

    Divergence: once ``acc``'s streak of consecutive skipped (non-finite) steps reaches
    ``max_streak`` every later step is masked, so the state, its step count and the
    ``steps_done`` metric agree with where training stopped. With a `jtricks.optim.fused`
    optimizer the parameters are `Flat` inside the loop and trees outside it. Stacked
    states (an ensemble, `is_ensemble`) run the same program with the step vmapped over
    members (all the same batches). With ``sharding`` (a `jax.sharding.NamedSharding`
    over a data axis) every batch is constrained to it, so the step runs data-parallel
    under GSPMD. ``unroll`` is `lax.scan`'s: steps per loop iteration.

    New here: Flax's and optax's examples step in a Python loop; this is the masked,
    static-length, resumable loop that `fit`, ensembles and streams share.
    """
    train_step = masked_step(train_step)
    ensemble_step = jax.vmap(train_step, in_axes=(0, None, None))

    def steps_of(feed):
        batch = feed.batch_at()

        def step_at(state, j, active=True):
            return dispatch_step(train_step, ensemble_step, sharding, state, batch(j), active)

        return step_at

    def part(state, acc, feed, num_steps, max_streak, val, length, finish):
        if not isinstance(acc, dict):  # the streak carried in: a fresh epoch
            shapes = step_metric_shapes(steps_of(feed), state)
            acc = init_accumulator(shapes, acc, private_of(log))
        if length:
            step_at = steps_of(feed)
            state, acc = run_steps(step_at, state, acc, num_steps, max_streak, length, unroll, log)
            state = keep_placement(state, sharding)
        if not finish:
            return state, acc
        acc = dict(acc)
        rows = acc.pop("rows", None)
        metrics = epoch_metrics(state, acc, val, eval_step, eval_source)
        return state, metrics if rows is None else {**metrics, "step_rows": rows}

    @partial(jax.jit, static_argnames=("length", "finish", "keep"), donate_argnums=0)
    def run_part(state, acc, feed, num_steps, max_streak, val=None, *, length, finish, keep=False):
        out = part(state, acc, feed, num_steps, max_streak, val, length, finish)
        return (*out, jax.tree.map(jnp.copy, state)) if keep else out

    return run_part


def make_epoch_fn(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    eval_step: EvalStep | None = None,
    **options: Any,
):
    """``run_epoch(state, data, data_key, epoch, offset, val=None, streak=0,
    max_streak=2**31 - 1, *, num_steps, length, batch_size) -> (state, metrics)``: one
    in-memory epoch, training and validation together, as one call of
    `make_part_program`'s program (see there for every argument). ``data`` is the
    training set as a pytree of device arrays with a common leading axis N; the call
    runs ``num_steps`` batches of epoch ``epoch``'s shuffle from batch ``offset``
    (`ArrayFeed`). Metrics also hold ``steps_done``, the final ``streak`` (a device
    array the next epoch can take without a host round trip), ``first_loss`` (the loss
    of the epoch's first step) and ``nonfinite`` (skipped steps, summed over members).
    `fit` uses ``length = N // batch_size`` for every epoch longer than half an epoch, so
    a short last epoch or a resumed one reuses the full epoch's program
    (`program_length`). ``options``: `make_part_program`'s ``sharding``, ``eval_source``,
    ``unroll`` and ``log``."""
    return epoch_fn(make_part_program(train_step, eval_step, **options))


def epoch_fn(program):
    """`make_epoch_fn`'s ``run_epoch`` of a part ``program`` (`make_part_program`);
    ``run_epoch.program`` is that jitted program (``.lower(...)`` it to read its HLO)."""

    def run_epoch(
        state,
        data,
        data_key,
        epoch,
        offset,
        val=None,
        streak=0,
        max_streak=2**31 - 1,
        *,
        num_steps,
        length: int,
        batch_size: int,
    ):
        feed = ArrayFeed(data, data_key, epoch, offset, batch_size)
        streak = jnp.asarray(streak, jnp.int32)
        return program(state, streak, feed, num_steps, max_streak, val, length=length, finish=True)

    run_epoch.program = program
    return run_epoch


def program_length(num_steps: int, steps_per_epoch: int, whole: bool = False) -> int:
    """The static step count of the program that runs ``num_steps`` steps of an epoch of
    ``steps_per_epoch``: the whole epoch's (the rest masked) when the call runs whole
    epochs anyway (``whole``: that program is compiled for them, and masking wastes at
    most one epoch's steps once, where compiling another program costs seconds) or when
    masking wastes at most half an epoch, so a short last epoch or a resumed one
    compiles nothing new; else ``num_steps`` itself (a short call, e.g. ``fit(steps=1)``
    in a Python loop)."""
    return steps_per_epoch if whole or 2 * num_steps > steps_per_epoch else num_steps


def dispatch_step(train_step, ensemble_step, sharding, state, batch, active=True):
    """One training step on ``batch``: data-parallel when ``sharding`` is given
    (each device takes its slice; on a mesh with an ``fsdp`` axis the new state is kept
    sharded, `jtricks.training.distributed.constrain_state`), vmapped over members for
    stacked states (every member takes the same batch); masked (the state kept) where
    ``active`` is false. Both steps come from `masked_step`."""
    if sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, sharding)
    new, metrics = (ensemble_step if is_ensemble(state) else train_step)(state, batch, active)
    if sharding is not None and is_sharded_mesh(sharding.mesh):  # the carry stays sharded
        new = constrain_state(new, sharding.mesh)
    return new, metrics


def keep_placement(state: TrainState, sharding: Any) -> TrainState:
    """A program's output state where `shard_spec` puts it on an ``fsdp`` mesh (inside the
    loop XLA may keep a small array split like its neighbours; the program hands it back
    as the rule says, so every program sees the same input shardings)."""
    if sharding is not None and is_sharded_mesh(sharding.mesh):
        return constrain_state(state, sharding.mesh)
    return state


def masked_step(train_step):
    """``(state, batch, active) -> (state, metrics)`` from a train step: jtricks' own
    steps mask through their non-finite guard (``takes_active``); any other step
    ``(state, batch)`` is masked by a select of its result (`keep_active`)."""
    if getattr(train_step, "takes_active", False):
        return train_step

    def step(state, batch, active):
        new, metrics = train_step(state, batch)
        return keep_active(active, new, state), metrics

    return step


def init_accumulator(shapes: Metrics, streak: Any = 0, private: tuple = ()) -> dict[str, Any]:
    """Zeroed epoch accumulator for step metrics of ``shapes``: the metric ``sums``
    (but of the ``private`` metrics of a `StepLog`), the ``nonfinite`` count, the
    skipped-step ``streak`` carried in, ``done`` steps and the epoch's ``first_loss``."""
    skip = ("nonfinite", *private)
    sums = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items() if k not in skip}
    acc = {
        "sums": sums,
        "streak": jnp.asarray(streak, jnp.int32),
        "done": jnp.int32(0),
        "first_loss": jnp.zeros(shapes["loss"].shape, jnp.float32),
    }
    if "nonfinite" in shapes:
        acc["nonfinite"] = jnp.int32(0)
    return acc


def step_metric_shapes(step_at, state) -> Metrics:
    """The shapes of one step's metrics, ``step_at(state, 0)`` traced abstractly (on flat
    parameters for a `jtricks.optim.fused` optimizer, as `run_steps` runs it)."""
    if is_fused(state.opt_state):
        per_member = jax.vmap if is_ensemble(state) else (lambda f: f)
        return jax.eval_shape(lambda s: step_at(per_member(flat_train_state)(s), 0)[1], state)
    return jax.eval_shape(step_at, state, 0)[1]


def run_steps(
    step_at,
    state,
    acc,
    num_steps,
    max_streak,
    length: int,
    unroll: int = 1,
    log: StepLog | None = None,
):
    """``step_at(state, j, active)`` for ``j = 0 .. num_steps - 1`` in one `lax.scan` of
    the static ``length >= num_steps``, adding each step's metrics into ``acc``
    (`init_accumulator`).

    A step is *active* while ``j < num_steps`` and fewer than ``max_streak`` consecutive
    steps were skipped as non-finite (in any member); an inactive step leaves the state
    as it was (`masked_step`) and its metrics are discarded. ``num_steps=None`` runs
    every step unmasked (``active`` is a constant, so the masking selects fold away). So
    the loop has a static trip count (no host round trip per step on an accelerator)
    and still stops where a while loop would. A `jtricks.optim.fused` optimizer sees
    flat parameters inside the loop, one copy each way.

    With ``log`` every step's metrics are also the scan's outputs, and ``acc["rows"]``
    holds those of the logged active steps (`StepLog`), compacted on the device into
    ``length // every + 1`` rows (``count`` of them real, with their ``step`` numbers):
    one small transfer when the program returns, no host round trip per step."""
    per_member = jax.vmap if is_ensemble(state) else (lambda f: f)
    fused = is_fused(state.opt_state)
    if fused:
        state = per_member(flat_train_state)(state)

    def body(carry, j):
        state, acc = carry
        active = jnp.bool_(True)
        if num_steps is not None:
            active = (j < num_steps) & (acc["streak"] < max_streak)
        number = jnp.ravel(state.step)[0] + 1  # the step's number once it ran
        state, m = step_at(state, j, active)
        row = (
            None if log is None else dict(m, step=number, logged=active & (number % log.every == 0))
        )
        flag = m.pop("nonfinite", None)
        acc = dict(acc)
        first = active & (acc["done"] == 0)
        acc["first_loss"] = jnp.where(first, m["loss"].astype(jnp.float32), acc["first_loss"])
        summed = {k: m[k] for k in acc["sums"]}
        acc["sums"] = jax.tree.map(
            lambda s, v: s + jnp.where(active, v.astype(jnp.float32), 0), acc["sums"], summed
        )
        if flag is not None:
            streak = jnp.where(jnp.any(flag > 0), acc["streak"] + 1, 0)
            acc["streak"] = jnp.where(active, streak, acc["streak"])
            acc["nonfinite"] = acc["nonfinite"] + jnp.where(
                active, jnp.sum(flag, dtype=jnp.int32), 0
            )
        acc["done"] = acc["done"] + active.astype(jnp.int32)
        return (state, acc), row

    steps = jnp.arange(length, dtype=jnp.int32)
    (state, acc), rows = jax.lax.scan(body, (state, acc), steps, unroll=unroll)
    if fused:
        state = per_member(tree_train_state)(state)
    if rows is not None:
        acc = {**acc, "rows": compact_rows(rows, length // log.every + 1)}
    return state, acc


def private_of(log: StepLog | None) -> tuple[str, ...]:
    """The metrics a `StepLog` keeps out of the epoch means (none without one)."""
    return () if log is None else log.private


def compact_rows(rows: dict[str, jax.Array], size: int) -> dict[str, jax.Array]:
    """The rows whose ``logged`` flag is set, first ``size`` of them (``count`` real; the
    rest repeat row 0), gathered on the device so only they travel to the host."""
    logged = rows.pop("logged")
    (idx,) = jnp.nonzero(logged, size=size, fill_value=0)
    out = {k: v[idx] for k, v in rows.items()}
    out["count"] = jnp.sum(logged.astype(jnp.int32))
    return out


def keep_active(active: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """``new`` where ``active``, else ``old``: the fields a step changes (step, parameters,
    optimizer state, BatchNorm statistics, EMAs), selected element-wise (`select_tree`).
    For a step without ``takes_active`` only: this second select over the state cost
    about 5% of a small CNN's step on a CPU, which jtricks' own steps avoid by masking
    inside their non-finite guard."""
    fields = ("step", "params", "opt_state", "batch_stats", "ema_params", "ema_batch_stats")
    picked = select_tree(
        active, [getattr(new, f) for f in fields], [getattr(old, f) for f in fields]
    )
    return new.replace(**dict(zip(fields, picked, strict=True)))


def epoch_metrics(state, acc, val, eval_step, eval_source) -> Metrics:
    """An epoch's metrics from its accumulator: the means of the step metrics,
    ``steps_done``, ``streak``, ``first_loss``, the ``nonfinite`` count, ``param_norm`` at
    the end, and ``val_<metric>`` (and ``val_ema_<metric>``) when ``val`` is given."""
    per_member = jax.vmap if is_ensemble(state) else (lambda f: f)
    done = acc["done"]
    metrics = {k: v / done for k, v in acc["sums"].items()}
    metrics.update(steps_done=done, streak=acc["streak"], first_loss=acc["first_loss"])
    if "nonfinite" in acc:
        metrics["nonfinite"] = acc["nonfinite"]
    if "param_norm" not in metrics:  # once, at the end of the epoch
        metrics["param_norm"] = per_member(tree_norm)(state.params)
    if val is not None and eval_step is not None:
        main = evaluate_batches(eval_step, state, *val, eval_source)
        metrics.update({f"val_{k}": v for k, v in main.items()})
        if state.ema_params is not None and eval_source != "ema":
            ema = evaluate_batches(eval_step, state, *val, "ema")
            metrics.update({f"val_ema_{k}": v for k, v in ema.items()})
    return metrics
