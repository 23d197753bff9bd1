"""How a `TrainConfig` field is declared (`setting`: its flag, help and check) and the
checks fields use, each naming the field, its value and what is allowed."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jtricks.errors import ConfigError, check_int, check_range
from jtricks.spec import parse_spec
from jtricks.training.state import check_eval_source

Check = Callable[[str, Any], None]


def setting(
    default: Any,
    help: str,
    check: Check | None = None,
    *,
    parse: type = str,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    metavar: str | None = None,
    exclusive: str | None = None,
) -> Any:
    """A config field with its CLI flag (default ``--name-with-dashes``), the type the flag
    parses (``bool``: a switch), its help line and its check ``check(name, value)``. Flags
    with the same ``exclusive`` name cannot be given together."""
    meta = dict(help=help, check=check, parse=parse, flag=flag, aliases=tuple(aliases))
    meta.update(metavar=metavar, exclusive=exclusive)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(field: dataclasses.Field) -> str:
    """The CLI flag of a config field."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


# ----------------------------------------------------------------------------- field checks


def string(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string; got {value!r}", param=name)


def spec_string(instead: str) -> Check:
    """A spec string; another object (a module, arrays) is refused, saying what to give
    ``instead``: a config is recorded as JSON, so it names what it builds."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, str):
            shown = repr(value)
            if len(shown) > 80 or "\n" in shown:
                shown = f"an object of type {type(value).__name__}"
            raise ConfigError(f"{name} must be a spec string; got {shown}: {instead}", param=name)

    return check


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {value!r}", param=name)


def optional(check: Check) -> Check:
    """``check``, skipped for ``None``."""
    return lambda name, value: None if value is None else check(name, value)


INT_LIMIT = 2**31 - 1  # the largest count a flag takes: the step counter is an int32


def at_least(low: int, high: int = INT_LIMIT) -> Check:
    """An integer in ``[low, high]``."""

    def check(name: str, value: Any) -> None:
        if isinstance(value, int) and value > high == INT_LIMIT:  # (a bool never is)
            raise ConfigError(
                f"{name} must satisfy {low} <= {name} <= {INT_LIMIT} (the step counter is an "
                f"int32 on the device); got {value}",
                param=name,
            )
        check_int(name, value, low=low, high=high)

    return check


def number(low: float, high: float | None = None, *, closed: tuple[bool, bool] = (True, True)):
    """A number in the interval from ``low`` to ``high`` (``closed`` says which ends count)."""

    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number; got {value!r}", param=name)
        check_range(
            name, value, low=low, high=high, low_inclusive=closed[0], high_inclusive=closed[1]
        )

    return check


def one_of(names: Sequence[str]) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in names:
            raise ConfigError(
                f"{name} must be one of {', '.join(names)}; got {value!r}", param=name
            )

    return check


def profile_steps(name: str, value: Any) -> None:
    """``A:B`` or ``A``: steps ``1 <= A <= B`` (`parse_steps`)."""
    parse_steps(value, name)


def parse_steps(value: Any, name: str = "profile") -> tuple[int, int]:
    """``(A, B)`` of a step range ``"A:B"`` (inclusive) or ``"A"`` (one step).

    Raises:
      ConfigError: not of that form, or not ``1 <= A <= B``.
    """
    text = value if isinstance(value, str) else ""
    first, colon, last = text.partition(":")
    try:
        a, b = int(first), int(last if colon else first)
    except ValueError:
        a = b = 0
    if not 1 <= a <= b:
        raise ConfigError(
            f"{name} must be steps A:B with 1 <= A <= B (e.g. 10:15), or one step A; got {value!r}",
            param=name,
        )
    return a, b


def eval_source(name: str, value: Any) -> None:
    check_eval_source(value)


def class_weight_spec(name: str, value: Any) -> None:
    """``balanced``, or a literal ``{class: weight}`` / list of weights (`parse_class_weight`)."""
    parse_class_weight(value, name)


def parse_class_weight(value: Any, name: str = "class_weight") -> Any:
    """``"balanced"`` as it is; ``"{0: 2.0, 3: 5.0}"`` or ``"[1.0, 2.0, ...]"`` as the dict
    or list it spells (`ast.literal_eval`: nothing is executed).

    Raises:
      ConfigError: anything else.
    """
    if value == "balanced":
        return value
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) else None
    except (ValueError, SyntaxError):
        parsed = None
    if not isinstance(parsed, dict | list | tuple):
        raise ConfigError(
            f"{name} must be balanced, {{class: weight, ...}} or [w0, w1, ...]; got {value!r}",
            param=name,
        )
    return parsed


LOSSES = {
    "cross_entropy": None,
    "focal": ("gamma", 2.0, "focal_gamma", (0.0, None, True)),
    "gce": ("q", 0.7, "gce_q", (0.0, 1.0, False)),
    "huber": ("delta", 1.0, "huber_delta", (0.0, None, False)),
}
"""Each training loss: ``(its argument, default, the task field it sets, (low, high,
low included))``; ``None`` for the plain cross-entropy."""


def loss_spec(name: str, value: Any) -> None:
    """``cross_entropy``, ``focal(gamma=G)`` with ``G >= 0``, ``gce(q=Q)`` with
    ``0 < Q <= 1`` or ``huber(delta=D)`` with ``D > 0``, the argument also by position
    (``huber(0.5)``; `parse_loss`)."""
    parse_loss(value, name)


def parse_loss(value: Any, name: str = "loss") -> dict[str, float]:
    """The task's fields a loss spec sets: ``{}`` for ``cross_entropy``,
    ``{"focal_gamma": G}``, ``{"gce_q": Q}`` or a regression's ``{"huber_delta": D}``.

    Raises:
      ConfigError: another name or argument, or one out of its range.
    """
    string(name, value)
    loss, args, kwargs = parse_spec(value, what=name)
    if loss not in LOSSES or (loss == "cross_entropy" and (args or kwargs)):
        raise ConfigError(
            f"{name} must be cross_entropy, focal(gamma=2.0), gce(q=0.7) or "
            f"huber(delta=1.0); got {value!r}",
            param=name,
        )
    if LOSSES[loss] is None:
        return {}
    arg, default, field, (low, high, low_in) = LOSSES[loss]
    if len(args) + len(kwargs) > 1 or set(kwargs) - {arg}:
        raise ConfigError(
            f"{name}: {loss} takes one argument, {arg}, e.g. {loss}({default}) or "
            f"{loss}({arg}={default}); got {value!r}",
            param=name,
        )
    given = args[0] if args else kwargs.get(arg, default)
    try:
        number(low, high, closed=(low_in, True))(arg, given)
    except ConfigError as e:
        raise ConfigError(f"{name} {value!r}: {e}", param=name) from None
    return {field: float(given)}
