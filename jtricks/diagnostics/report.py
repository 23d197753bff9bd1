"""`check_model`: every check on a model, an optimizer and data; `diagnose`: the same on
a model and dataset given by name (``jtricks diagnose``)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from jtricks.diagnostics.common import diagnostic_batch, text_table
from jtricks.diagnostics.gradcheck import check_gradients
from jtricks.diagnostics.initial_loss import initial_loss
from jtricks.diagnostics.lr_finder import lr_finder, lr_range_test
from jtricks.diagnostics.overfit import overfit_one_batch, plot_overfit
from jtricks.diagnostics.signal import plot_signal, track_signal
from jtricks.errors import ConfigError, check_int, check_range
from jtricks.tasks import Task
from jtricks.training.data_checks import check_data, num_examples
from jtricks.training.state import create_train_state


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """How much each check of `check_model` runs; checked when built (`ConfigError`).

    Attributes:
      batch_size: the batch of the signal run and the LR finder.
      overfit_batch, overfit_steps, overfit_epsilon: `overfit_one_batch` on the first
        ``overfit_batch`` examples.
      signal_steps: the steps of an ordinary run at which `track_signal` reports.
      lr_min, lr_max, lr_num, lr_steps, lr_method: ``"sweep"`` is `lr_finder` (``lr_num``
        rates, ``lr_steps`` steps each), ``"range"`` `lr_range_test` (one run of
        ``lr_steps`` steps, the rate rising from ``lr_min`` to ``lr_max``).
    """

    batch_size: int = 100
    overfit_batch: int = 32
    overfit_steps: int = 300
    overfit_epsilon: float = 0.01
    signal_steps: Sequence[int] = (0, 100, 500)
    lr_min: float = 1e-5
    lr_max: float = 1.0
    lr_num: int = 32
    lr_steps: int = 100
    lr_method: str = "sweep"

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, low=1)
        check_int("overfit_batch", self.overfit_batch, low=1)
        check_int("overfit_steps", self.overfit_steps, low=1)
        check_range("overfit_epsilon", self.overfit_epsilon, low=0.0, low_inclusive=False)
        for step in self.signal_steps:
            check_int("signal_steps", step, low=0)
        if not self.signal_steps:
            raise ConfigError(
                "signal_steps must list at least one step, e.g. (0, 100)", param="signal_steps"
            )
        _check_finder(self.lr_min, self.lr_max, self.lr_num, self.lr_steps, self.lr_method)


def diagnose(
    *,
    dataset: str = "mnist1d",
    model: str = "cnn",
    optimizer: str = "adam",
    learning_rate: float = 1e-2,
    preprocess: str = "standardize",
    target_scale: str = "none",
    seed: int = 0,
    out: Any = None,
    task: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """`check_model` on a model, optimizer and dataset given by name: what ``jtricks
    diagnose`` runs. The data is the dataset's training split, standardised on itself
    (token ids as they are; the test split is not touched), the loss its task's (with
    ``target_scale="standardize"``, a regression's on standardized targets, as
    ``jtricks train --target-scale`` trains; ``task`` reads the targets for another task,
    as ``jtricks train --task`` does). ``settings`` are `CheckSettings`' fields."""
    from jtricks.optim import build_optimizer

    checked = CheckSettings(**settings)  # before anything is loaded or written
    task, net, x, y = _problem(dataset, model, preprocess, target_scale, task)
    names = dict(dataset=dataset, task=task.name, model=model, optimizer=optimizer)
    return check_model(
        net,
        lambda lr: build_optimizer(optimizer, lr),
        (x, y),
        task=task,
        learning_rate=learning_rate,
        settings=checked,
        seed=seed,
        out=out,
        names=names,
    )


def check_model(
    model: nn.Module,
    make_tx: Callable[[float], optax.GradientTransformation],
    data: Any,
    *,
    task: Task | str | None = None,
    loss_fn: Callable | None = None,
    learning_rate: float = 1e-2,
    settings: CheckSettings | None = None,
    seed: int = 0,
    out: Any = None,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run every check on a model, an optimizer and training data (any Flax model, any
    ``make_tx(learning_rate)``, ``data`` an ``(x, y)`` pair or any batch pytree in memory,
    the loss ``task``'s or ``loss_fn``'s as in `fit`).

    Checks, in order: `initial_loss` (on up to 1000 examples: against an all-zero
    output's loss, ``log C`` for a classifier), `check_gradients` (8 examples),
    `overfit_one_batch`, `track_signal` of an ordinary run of ``make_tx(learning_rate)``,
    and the LR finder; ``settings`` (`CheckSettings`) say how much each runs. With
    ``out``, writes ``diagnose.json`` (``names`` among its settings), ``lr_finder.png``,
    ``signal.png`` and ``overfit.png`` there (the folder must be new or empty).

    Returns:
      ``{"checks": [{"check", "passed", "detail"}, ...], "passed": bool, "reports": {...}}``.
    """
    from jtricks.rundir import create_run_dir, refused_cleanly

    settings = settings or CheckSettings()
    check_int("seed", seed, low=0, high=2**63 - 1)
    task, data = diagnostic_batch(data, None, task, loss_fn)
    n = num_examples(data)
    check_int("batch_size", settings.batch_size, high=n)
    check_int("overfit_batch", settings.overfit_batch, high=n)
    key, tx = jax.random.key(seed), make_tx(learning_rate)
    state = create_train_state(model, tx, task.inputs(data), key)
    check_data(state, task, data, "training data")  # as fit checks it: before any folder
    with contextlib.ExitStack() as stack, refused_cleanly(out):
        run_dir = create_run_dir(out, stack) if out is not None else None
        result, written = _run_checks(model, make_tx, data, key, state, task, settings)
        result["checks"][-1]["detail"] += f"; given {learning_rate:g})"  # the LR check's
        if run_dir is not None:
            about = {**(names or {}), "seed": seed, "learning_rate": learning_rate}
            _write(run_dir, result, {**about, **dataclasses.asdict(settings)}, *written)
    return result


def _run_checks(model, make_tx, data, key, state, task, settings):
    """`check_model`'s checks in order: ``(result, (finder, signals, overfit))``."""
    tx = state.tx
    head = lambda k: jax.tree.map(lambda a: a[:k], data)  # noqa: E731
    checks, reports = [], {}
    _model_checks(state, head, task, checks, reports)
    over = _overfit_check(
        model, tx, head(settings.overfit_batch), key, task, settings, checks, reports
    )
    _, signals = track_signal(
        create_train_state(model, tx, task.inputs(data), key),
        data,
        at_steps=settings.signal_steps,
        batch_size=settings.batch_size,
        task=task,
    )
    checks.extend(_signal_check(rep) for rep in signals)
    reports["signal"] = [dataclasses.asdict(r) for r in signals]
    finder, check, reports["lr_finder"] = _find_lr(model, make_tx, data, key, task, settings)
    checks.append(check)
    result = {"checks": checks, "passed": all(c["passed"] for c in checks), "reports": reports}
    return result, (finder, signals, over)


def _problem(dataset: str, model: str, preprocess: str, target_scale: str, task_spec: Any):
    """``(task, model, x, y)``: the dataset's task or ``task_spec`` (learning standardized
    targets for ``target_scale="standardize"``), the model built for it, and its training
    split (inputs standardised on themselves; token ids as they are)."""
    from jtricks.data import Scaler, load_dataset
    from jtricks.data.datasets import for_task
    from jtricks.nn import build_model
    from jtricks.tasks import Regression, build_task

    if target_scale not in ("none", "standardize"):
        raise ConfigError(
            f"target_scale must be none or standardize; got {target_scale!r}",
            param="target_scale",
        )
    data = load_dataset(dataset)
    task = build_task(task_spec or data.task)
    data = for_task(data, task.name)  # e.g. whole-number counts as a regression's targets
    x, y = data.x_train, data.y_train
    if not np.issubdtype(x.dtype, np.integer):
        x = Scaler.fit(preprocess, x)(x)
    if target_scale == "standardize":
        if not isinstance(task, Regression):
            raise ConfigError(
                f"target_scale='standardize' standardizes regression targets; the "
                f"dataset's task is {task.name}",
                param="target_scale",
            )
        task = task.standardized(y)
    return task, build_model(model, data.num_classes), x, y


def _check_finder(lr_min, lr_max, lr_num, lr_steps, lr_method) -> None:
    check_range("lr_min", lr_min, low=0.0, low_inclusive=False)
    check_range("lr_max", lr_max, low=lr_min, low_inclusive=False)
    check_int("lr_num", lr_num, low=2)
    check_int("lr_steps", lr_steps, low=2 if lr_method == "range" else 1)
    if lr_method not in ("sweep", "range"):
        raise ConfigError(
            f"lr_method must be 'sweep' or 'range'; got {lr_method!r}", param="lr_method"
        )


def _model_checks(state, head, task, checks: list, reports: dict) -> None:
    """The initial loss and the gradient check, appended to ``checks`` and ``reports``."""
    init = initial_loss(state, head(1000), task=task)
    detail = f"{init.loss:.3f} vs {init.expected:.3f} of zero outputs (ratio {init.ratio:.2f})"
    checks.append({"check": "initial loss", "passed": init.passed, "detail": detail})
    reports["initial_loss"] = dataclasses.asdict(init)
    grad = check_gradients(state, head(8), task=task)
    worst = max(grad.rows, key=lambda r: r["max_rel_error"])
    detail = (
        f"max rel error {worst['max_rel_error']:.1e} ({worst['layer']}), tol {grad.tolerance:g}"
    )
    checks.append({"check": "gradient check", "passed": grad.passed, "detail": detail})
    reports["gradient_check"] = dataclasses.asdict(grad)


def _overfit_check(net, tx, batch, key, task, settings, checks: list, reports: dict):
    """Overfit one batch, appended to ``checks`` and ``reports``; returns its report."""
    steps, epsilon = settings.overfit_steps, settings.overfit_epsilon
    over = overfit_one_batch(net, tx, batch, key=key, steps=steps, epsilon=epsilon, task=task)
    detail = _overfit_detail(over) + ("" if over.passed else _scale_hint(task, batch))
    checks.append({"check": "overfit one batch", "passed": over.passed, "detail": detail})
    reports["overfit"] = {**dataclasses.asdict(over), "losses": over.losses.tolist()}
    return over


def _overfit_detail(over) -> str:
    goal = f"floor {over.floor:.3g} + epsilon {over.epsilon:g}" if over.floor else ""
    if over.passed:
        aim = f"{over.floor + over.epsilon:.3g} ({goal})" if goal else f"{over.epsilon:g}"
        if over.steps_to_epsilon is None:  # dropout's noise kept the training loss up
            return (
                f"evaluation-mode loss {over.eval_loss:.3g} < {aim} after {len(over.losses)} steps"
            )
        return f"loss < {aim} at step {over.steps_to_epsilon}"
    goal = goal or f"epsilon {over.epsilon:g}"
    return (
        f"final loss {over.final_loss:.3g} (evaluation mode {over.eval_loss:.3g}) after "
        f"{len(over.losses)} steps ({goal})"
    )


def _scale_hint(task: Task, batch: Any) -> str:
    """For a regression whose targets lie far from the model's start at 0 (a mean or a
    spread above 10, unstandardized), what `jtricks.tasks.Regression.standardized` is
    for; else ``""``."""
    from jtricks.tasks import Regression

    if not isinstance(task, Regression) or task.scale is not None:
        return ""
    t = np.asarray(task.targets(batch), np.float64).reshape(len(task.targets(batch)), -1)
    mean, std = np.abs(t.mean(0)).max(), t.std(0).max()
    if max(mean, std) <= 10:
        return ""
    return (
        f"; targets of mean up to {mean:.3g} and std up to {std:.3g}, far from the "
        "model's start at 0: --target-scale standardize"
    )


def _signal_check(rep) -> dict[str, Any]:
    grads = f"grad ratio first/last {rep.grad_ratio:.2g}"
    if rep.zero_head:
        grads = "head at zero (no gradient below it yet)"
    detail = "; ".join(rep.flags) or f"{grads}, act std ratio last/first {rep.act_ratio:.2g}"
    return {"check": f"signal propagation, step {rep.step}", "passed": rep.passed, "detail": detail}


def _listed(a: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in a]


def _find_lr(net, make_tx, data, key, task, settings: CheckSettings):
    """The LR finder's result, its check (detail left open for the given rate) and report."""
    method, num = settings.lr_method, settings.lr_num
    finder_args = dict(key=key, lr_min=settings.lr_min, lr_max=settings.lr_max, task=task)
    finder_args.update(steps=settings.lr_steps, batch_size=settings.batch_size)
    if method == "range":
        finder = lr_range_test(net, make_tx, data, **finder_args)
        why = f"smoothed loss lowest at {finder.best:.2e}"
        report = {
            "method": "range",
            "lrs": finder.lrs.tolist(),
            "losses": _listed(finder.losses),
            "smoothed": _listed(finder.smoothed),
            "diverged_at": finder.diverged_at,
        }
    else:
        finder = lr_finder(net, make_tx, data, num=num, **finder_args)
        why = f"the lowest final loss of {num} rates"
        report = {"method": "sweep", "lrs": finder.lrs.tolist(), "final": _listed(finder.final)}
    report.update(suggestion=finder.suggestion, best=finder.best)
    check = {
        "check": "LR finder" if method == "sweep" else "LR range test",
        "passed": True,
        "detail": f"suggested {finder.suggestion:.2e} ({why}",
    }
    return finder, check, report


def _write(run_dir, result: dict, settings: dict, finder, signals, over) -> None:
    """The plots and ``diagnose.json`` (last); ``result["out"]`` becomes the folder."""
    from jtricks.rundir import environment, write_json

    finder.plot(run_dir / "lr_finder.png")
    plot_signal(signals, run_dir / "signal.png")
    plot_overfit(over, run_dir / "overfit.png")
    write_json(
        run_dir / "diagnose.json", {**result, "settings": settings, "environment": environment()}
    )
    result["out"] = run_dir


def verdict_table(result: dict[str, Any]) -> str:
    """The checks of `diagnose` as a plain-text table."""
    return text_table(
        ["check", "verdict", "detail"],
        [(c["check"], "pass" if c["passed"] else "FAIL", c["detail"]) for c in result["checks"]],
    )
