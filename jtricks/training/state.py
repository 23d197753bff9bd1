"""The training state: one immutable pytree per run."""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from flax.training import train_state

from jtricks.caches import cached, jitted
from jtricks.errors import ConfigError
from jtricks.optim.eval_params import optimizer_eval_params
from jtricks.optim.lookahead import refuse_optax_lookahead
from jtricks.training.arguments import check_key, check_model, optimizer_of
from jtricks.training.data_checks import as_arrays
from jtricks.training.model import linen_apply, nnx_state

EVAL_SOURCES = ("auto", "train", "ema")
"""Where evaluation parameters come from (see `TrainState.evaluation_state`)."""


class TrainState(train_state.TrainState):
    """Flax's `TrainState` (step, apply_fn, params, tx, opt_state) plus what a full run needs.

    New here:
      batch_stats: the model's mutable ``batch_stats`` collection (empty dict if none).
      key: the run's PRNG key for training noise. The dropout key of step ``t`` is
        ``fold_in(key, t)``, so it depends only on the key and the step count.

      ema_params: with ``ema_decay`` set, the exponential moving average (Polyak
        averaging) of the parameters, updated after every step by the train step:
        ``ema <- d ema + (1 - d) params`` (`optax.incremental_update`), starting from the
        initial parameters. ``None`` when off.
      ema_batch_stats: with an EMA and a model with floating-point statistics (BatchNorm's
        running mean and variance), their EMA with the same ``d``, updated by the same
        step from the same start; the state's other variables (an NNX module's RNG
        counts) follow the live ones. The averaged parameters are evaluated with it: the
        live statistics describe the live parameters' activations, not the average's
        (``jtricks train --model "cnn(norm='batch')" --ema 0.99 --epochs 15``, seeds
        0/1/2: the EMA's test accuracy 91.8/93.2/93.0% with the live statistics,
        94.7/93.4/95.5% with these). timm's ``ModelEmaV2`` averages a model's buffers
        alike. ``None`` otherwise.
      ema_decay: ``d`` (static), or ``None``.
      ema_debias: (static) the averages start from zero and are read divided by
        ``1 - d^t`` after ``t`` steps, Adam's bias correction (optax's ``ema(debias=True)``):
        ``sum_i (1 - d) d^(t-i) p_i / (1 - d^t)``, the steps' parameters only, where the
        plain average keeps ``d^t`` of the initial ones (58% after 540 steps at
        ``d = 0.999``). Before the first step the EMA reads as the live values.
      hparams: values of the task's hyper-parameters that override its fields inside the
        train and evaluation steps (``{"label_smoothing": 0.1}``: `jtricks.tasks.Task.using`),
        or ``None``. Arrays in the state, so stacked states (a search's trials) each train
        and evaluate with their own; not saved with checkpoints.
      frozen_stats: glob patterns over ``batch_stats`` paths (static; e.g.
        ``("backbone/*",)``) whose running statistics the train step keeps as they are,
        as Keras does for a frozen layer; set by
        `jtricks.training.transfer.freeze_batch_stats`. Empty: every statistic updates.

    ``step`` is an int32 array from the start, so the first and later calls of a
    jitted step see the same types and compile once.

    References:
      Polyak & Juditsky, "Acceleration of stochastic approximation by averaging" (1992).
    """

    batch_stats: Any = None
    key: jax.Array | None = None
    ema_params: Any = None
    ema_batch_stats: Any = None
    hparams: Any = None
    ema_decay: float | None = struct.field(pytree_node=False, default=None)
    ema_debias: bool = struct.field(pytree_node=False, default=False)
    frozen_stats: tuple[str, ...] = struct.field(pytree_node=False, default=())

    def with_ema_params(self) -> TrainState:
        """This state with its parameters, and BatchNorm statistics where it averages them
        (``ema_batch_stats``), replaced by their EMA (for evaluation)."""
        if self.ema_params is None:
            raise ValueError("this state keeps no EMA; create it with ema_decay=...")
        params, stats = self.ema_params, self.ema_batch_stats
        if self.ema_debias:
            params = self._debiased(params, self.params)
            stats = self._debiased(stats, self.batch_stats)
        return self.replace(params=params, batch_stats=self.batch_stats if stats is None else stats)

    def _debiased(self, average: Any, live: Any) -> Any:
        """A zero-started ``average`` divided by ``1 - d^step`` (its floating leaves; the
        ``live`` values before the first step, and for other leaves)."""
        if average is None:
            return None
        t = self.step.astype(jnp.float32)
        scale = 1.0 - jnp.asarray(self.ema_decay, jnp.float32) ** t

        def one(avg: Any, now: Any) -> Any:
            if not _averaged(avg):
                return now
            return jnp.where(t > 0, avg / jnp.maximum(scale, 1e-30).astype(avg.dtype), now)

        return jax.tree.map(one, average, live)

    def evaluation_state(self, source: str = "auto") -> TrainState:
        """This state with the parameters that evaluation should use: one hook for every
        trick that trains one sequence of parameters and evaluates another.

        ``source``:
          ``"auto"``: the parameters the optimizer state declares for evaluation when it
            declares them (schedule-free: ``(y - (1 - b1) z) / b1``, see
            `jtricks.optim.eval_params`), else the training parameters;
          ``"train"``: the training parameters as they are;
          ``"ema"``: the EMA of the parameters (the state must keep one).

        SWA needs no source: its callback makes the average the state's parameters at the
        end of training. The state is otherwise unchanged (BatchNorm statistics included,
        but for ``"ema"``'s averaged ones: `with_ema_params`).
        """
        check_eval_source(source, self)
        if source == "train":
            return self
        if source == "ema":
            return self.with_ema_params()
        return self.replace(params=optimizer_eval_params(self.opt_state, self.params))


def stat_paths(batch_stats: Any) -> list[str]:
    """Every leaf's ``"layer/leaf"`` path in a ``batch_stats`` collection."""
    flat = jax.tree_util.tree_flatten_with_path(batch_stats)[0]
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]


def keep_frozen_stats(patterns: tuple[str, ...], new: Any, old: Any) -> Any:
    """``new`` batch statistics with those whose path matches a pattern taken from ``old``
    (decided while tracing: no select runs)."""
    if not patterns:
        return new
    paths = stat_paths(old)
    leaves_new, treedef = jax.tree.flatten(new)
    leaves_old = jax.tree.leaves(old)
    kept = [
        o if any(fnmatch.fnmatchcase(p, pattern) for pattern in patterns) else n
        for p, n, o in zip(paths, leaves_new, leaves_old, strict=True)
    ]
    return jax.tree.unflatten(treedef, kept)


def stats_average_start(batch_stats: Any, debias: bool = False) -> Any:
    """The start of an EMA of ``batch_stats`` (a copy; zeros for its floating leaves when
    ``debias``), or ``None`` when it holds no floating-point leaf to average (no BatchNorm:
    nothing to keep)."""
    if not any(_averaged(a) for a in jax.tree.leaves(batch_stats)):
        return None
    return average_start(batch_stats, debias)


def average_start(tree: Any, debias: bool) -> Any:
    """Where an EMA of ``tree`` starts: a copy, or (``debias``) zeros on its floating
    leaves (`TrainState.ema_debias`)."""
    return jax.tree.map(
        lambda a: jnp.zeros_like(a) if debias and _averaged(a) else jnp.copy(a), tree
    )


def average_stats(batch_stats: Any, average: Any, decay: float) -> Any:
    """``average`` moved towards ``batch_stats``, ``d avg + (1 - d) new`` on floating-point
    leaves (`optax.incremental_update`, as the parameters' EMA); other leaves (RNG counts
    and keys) are the new ones."""

    def one(new: jax.Array, avg: jax.Array) -> jax.Array:
        return optax.incremental_update(new, avg, 1.0 - decay) if _averaged(new) else new

    return jax.tree.map(one, batch_stats, average)


def _averaged(a: Any) -> bool:
    return jnp.issubdtype(a.dtype if hasattr(a, "dtype") else jnp.result_type(a), jnp.floating)


def check_eval_source(source: Any, state: TrainState | None = None) -> str:
    """``source`` if it is one of `EVAL_SOURCES` (and ``"ema"`` only for a state with an
    EMA); otherwise a `ConfigError` naming ``eval_params``."""
    if not isinstance(source, str) or source not in EVAL_SOURCES:
        raise ConfigError(
            f"eval_params must be one of {', '.join(EVAL_SOURCES)}; got {source!r}",
            param="eval_params",
        )
    if source == "ema" and state is not None and state.ema_params is None:
        raise ConfigError(
            "eval_params='ema' needs an EMA of the parameters: create the state with "
            "ema_decay=... (--ema on the CLI)",
            param="eval_params",
        )
    return source


def device_copy(tree: Any) -> Any:
    """A copy of every device array in ``tree`` (what a donating jitted call may then
    consume without touching the copy), made by one compiled program per structure
    rather than one dispatch per array."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array)]
    for i, copy in zip(arrays, _copy_arrays([leaves[i] for i in arrays]), strict=True):
        leaves[i] = copy
    return jax.tree.unflatten(treedef, leaves)


@jitted
def _copy_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
    return [jnp.copy(a) for a in arrays]


QUICK_INIT = {"xla_backend_optimization_level": 1}
"""How the initialisation program is compiled: it runs once, and most of it is the
random draws' Threefry hashing, whose code generation at XLA's default level (2) took
2.1 s of a cold `jtricks train` on the 2-core CPU, 0.8 s at level 1, with the same
parameters bit for bit (`tests/test_models.py` compares them). A level of your own in
``XLA_FLAGS`` (``--xla_backend_optimization_level=N``) wins."""


def init_compiler_options() -> dict[str, Any]:
    """`QUICK_INIT`, unless ``XLA_FLAGS`` sets the optimisation level itself."""
    return {} if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "") else QUICK_INIT


@cached(maxsize=64)
def _compiled_init(apply_fn: Any) -> Any:
    """``apply_fn.init`` under `jax.jit`, one per model (Linen modules compare by value):
    one compiled program initialises the whole model, where op-by-op initialisation
    compiles and dispatches every initialiser's operations one at a time (dozens of small
    programs, each a noticeable start-up cost on a GPU), compiled for a quick start
    (`init_compiler_options`)."""
    return jax.jit(apply_fn.init, compiler_options=init_compiler_options())


TRANSIENT = ("intermediates", "perturbations")
"""Linen collections that ``init`` fills and training does without (``sow``, ``perturb``)."""


def check_collections(variables: Any) -> None:
    """A `ConfigError` naming a Linen model's variable collections that a `TrainState`
    would drop (it carries ``params`` and ``batch_stats``), which the model's first
    training step would then fail to find."""
    extra = sorted(set(variables) - {"params", "batch_stats", *TRANSIENT})
    if extra:
        raise ConfigError(
            f"the model keeps variables in collection(s) {', '.join(map(repr, extra))}, "
            "which a TrainState does not carry: it keeps 'params' (trained) and "
            "'batch_stats' (updated in training mode, checkpointed); keep such state in "
            "'batch_stats', or write the model in NNX (every variable is kept)",
            param="model",
        )


def init_variables(apply_fn: Any, key: jax.Array, sample: Any) -> Any:
    """A Linen model's variables from ``apply_fn.init(key, sample)``, compiled
    (`_compiled_init`); op by op for a model that cannot be (an attribute that is not
    hashable, or an ``init`` that reads the sample's values in Python).

    Raises:
      ConfigError: the model cannot take inputs like ``sample`` (e.g. token embeddings
        given real-valued features); the model's own error is chained.
    """
    try:
        init = _compiled_init(apply_fn)
    except TypeError:  # an unhashable model
        init = apply_fn.init
    try:
        try:
            check_fits(jax.eval_shape(init, key, sample))
            return init(key, sample)
        except jax.errors.JAXTypeError:  # e.g. a Python `if` on a traced value
            return apply_fn.init(key, sample)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        shapes = jax.tree.map(lambda a: f"{jnp.shape(a)[1:]} {jnp.result_type(a)}", sample)
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"the model cannot be initialised on examples of shape and dtype {shapes}: "
            f"{type(e).__name__}: {first}{_init_hint(apply_fn, sample, first)}",
            param="model",
        ) from e


def _init_hint(model: Any, sample: Any, error: str) -> str:
    """What a model that failed to initialise on ``sample`` likely needs: token ids for an
    embedding, sequences for a 1-D model given images."""
    leaves, name = jax.tree.leaves(sample), type(getattr(model, "module", model)).__name__
    if "integer" in error and not all(
        jnp.issubdtype(jnp.result_type(a), jnp.integer) for a in leaves
    ):
        return (
            " (the model embeds integer token ids and these inputs are real-valued: "
            "train it on token data, such as the tokens(...) or text:PATH datasets)"
        )
    if name.endswith("1D") and any(jnp.ndim(a) > 3 for a in leaves):
        return (
            f" ({name} is a 1-D model: it takes (L,) or (L, C) per example; "
            "for images (H, W, C) use resnet20, resnet18, inception, densenet or a model "
            "of your own)"
        )
    return ""


TRAINING_COPIES = 4
"""Copies of the parameters training holds at once at the least: the parameters, their
gradient and two optimizer moments (Adam's); the bound `check_fits` applies."""


def device_memory() -> int | None:
    """Bytes this process's first device may hold: its allocator's limit (GPU, TPU), else the host's
    physical memory (CPU); ``None`` when neither is known."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(variables: Any) -> None:
    """Refuse, before anything is allocated, a model whose variables (shapes from
    `jax.eval_shape`) times `TRAINING_COPIES` exceed `device_memory`."""
    need = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(variables))
    limit = device_memory()
    if limit is not None and need * TRAINING_COPIES > limit:
        count = sum(a.size for a in jax.tree.leaves(variables))
        raise ConfigError(
            f"the model has {count:,} parameters and statistics ({need / 2**30:,.1f} GiB); "
            f"training holds at least {TRAINING_COPIES} copies, more than the "
            f"{limit / 2**30:,.1f} GiB of {jax.local_devices()[0].platform} memory: make it smaller",
            param="model",
        )


def check_live(state: Any, where: str = "state") -> None:
    """Refuse a state whose arrays an earlier `fit` consumed: `fit` donates the state it
    is given to the compiled epoch (its buffers are reused in place), so that object is
    spent once `fit` returns; JAX would otherwise fail deep inside with "Array has been
    deleted"."""
    if any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree.leaves(state)):
        raise ConfigError(
            f"{where}: its arrays were consumed by an earlier fit, which donates the state "
            "it is given (its buffers are updated in place); use the state that fit "
            "returned, or give fit a copy to keep this one: "
            "fit(jtricks.training.state.device_copy(state), ...)",
            param="state",
        )


def unalias(tree: Any) -> Any:
    """``tree`` with every array that appears in it more than once replaced, after its
    first appearance, by a copy.

    An optimizer state may hold the very arrays of the parameters (`optax.contrib.prodigy`
    keeps the initial parameters, ``params0``, as they are), and a jitted step that
    donates the state would then donate one buffer twice ("Attempt to donate the same
    buffer twice"). `fit` and `create_train_state` call this; it copies nothing when
    nothing is shared.
    """
    seen: set[int] = set()

    def fix(x):
        if isinstance(x, jax.Array):
            if id(x) in seen:
                return jnp.copy(x)
            seen.add(id(x))
        return x

    return jax.tree.map(fix, tree)


def is_ensemble(state: TrainState) -> bool:
    """Whether ``state`` stacks several members on a leading axis (`create_ensemble`)."""
    return jnp.ndim(state.step) == 1


def evaluation_states(state: TrainState, source: str = "auto") -> TrainState:
    """``state.evaluation_state(source)``; for stacked states, member by member."""
    if is_ensemble(state):
        return jax.vmap(lambda s: s.evaluation_state(source))(state)
    return state.evaluation_state(source)


def first_member(state: TrainState) -> TrainState:
    """Member 0 of stacked (ensemble) states; a single state itself."""
    return jax.tree.map(lambda a: a[0], state) if is_ensemble(state) else state


def create_train_state(
    model: nn.Module | nnx.Module,
    tx: optax.GradientTransformation | str,
    sample_x: Any,
    key: jax.Array,
    *,
    ema_decay: float | None = None,
    ema_debias: bool = False,
    train_arg: str | None = "auto",
) -> TrainState:
    """Initialise a model and optimizer into a `TrainState`.

    Args:
      model: a Linen module ``__call__(inputs, ...)``, or an initialised Flax NNX module
        (its parameters become ``params``, every other variable it holds, BatchNorm
        statistics and RNG streams included, ``batch_stats``; see
        `jtricks.training.model.NNXApply`; ``sample_x`` and the init half of ``key`` are
        then unused, and dropout draws from the module's own ``rngs``).
      tx: any optax transformation, or an optimizer spec string
        (`jtricks.optim.build_optimizer`: ``"adamw(lr=1e-3, weight_decay=0.01)"``).
      sample_x: an example of the model's input: an array, or the pytree (e.g. a dict batch)
        a model reads; only shapes and dtypes matter, and only the first example is used.
      key: PRNG key, split as ``init_key, dropout_key = jax.random.split(key)``.
      ema_decay: keep an EMA of the parameters with this decay in ``[0, 1)`` (off if ``None``).
      ema_debias: start it from zero with Adam's bias correction (`TrainState.ema_debias`).
      train_arg: the keyword of ``model.__call__`` that switches training mode:
        ``"auto"`` finds ``train``, ``training``, ``is_training`` or ``deterministic``
        (passed negated) in its signature; ``None`` for a model without one
        (`jtricks.training.model.LinenApply`).

    Example:
      >>> state = create_train_state(MLP(10), optax.adam(1e-3), x[:1], jax.random.key(0))
    """
    check_model(model)
    tx = optimizer_of(tx)
    init_key, dropout_key = jax.random.split(check_key("key", key))
    if isinstance(model, nnx.Module):  # already initialised: its own keys made its state
        apply_fn, params, batch_stats = nnx_state(model)
    else:
        apply_fn = linen_apply(model, train_arg)
        sample = jax.tree.map(lambda a: jnp.asarray(a)[:1], as_arrays(sample_x, "sample_x"))
        variables = init_variables(apply_fn, init_key, sample)
        check_collections(variables)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
    if ema_decay is not None:
        from jtricks.errors import check_range

        check_range("ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False)
    state = TrainState(
        ema_params=average_start(params, ema_debias) if ema_decay is not None else None,
        ema_batch_stats=(
            stats_average_start(batch_stats, ema_debias) if ema_decay is not None else None
        ),
        ema_decay=None if ema_decay is None else float(ema_decay),
        ema_debias=bool(ema_debias) and ema_decay is not None,
        step=jnp.zeros((), jnp.int32),
        apply_fn=apply_fn,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=batch_stats,
        key=dropout_key,
    )
    refuse_optax_lookahead(state.opt_state)
    return unalias(state)
