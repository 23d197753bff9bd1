"""A tiny, safe call-spec language shared by the CLI and configs.

A spec is a name with optional keyword (or positional) literal arguments::

    "adam"                      -> ("adam", (), {})
    "adam(lr=1e-3, b1=0.9)"     -> ("adam", (), {"lr": 0.001, "b1": 0.9})
    "synthetic(shape=(8, 8, 3))" -> ("synthetic", (), {"shape": (8, 8, 3)})
    "optax.lion(b1=0.95)"       -> ("optax.lion", (), {"b1": 0.95})
    "mypkg.opt:make(lr=1e-3)"   -> ("mypkg.opt:make", (), {"lr": 0.001})

A name may be dotted (``optax.contrib.muon``) or an import path ``module:attribute``;
what it resolves to is up to the caller.

Arguments are Python literals read with `ast.literal_eval`: nothing is ever
executed. Pipelines are specs joined by ``|``.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any

from jtricks.errors import ConfigError, did_you_mean, unknown_name


def parse_spec(spec: str, *, what: str = "spec") -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Parse ``"name(arg, key=value, ...)"`` into ``(name, args, kwargs)``.

    Args:
      spec: the text to parse.
      what: what the spec names (used in error messages), e.g. ``"optimizer"``.

    Returns:
      The name, the positional literal arguments and the keyword literal arguments.

    Raises:
      ConfigError: if the text is not a name optionally followed by literal arguments.
    """
    text = spec.strip()
    module, text = _import_prefix(text)
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ConfigError(
            f"cannot parse {what} {spec!r}: expected name or name(key=value, ...)", param=what
        ) from None
    func = node.func if isinstance(node, ast.Call) else node
    name = _dotted(func)
    if name is not None and module:
        name = f"{module}:{name}"
    if name is not None and not isinstance(node, ast.Call):
        return name, (), {}
    if isinstance(node, ast.Call) and name is not None:
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError:
            raise ConfigError(
                f"cannot parse {what} {spec!r}: arguments must be literals (numbers, strings, tuples)",
                param=what,
            ) from None
        if any(kw.arg is None for kw in node.keywords):
            raise ConfigError(f"cannot parse {what} {spec!r}: '**' is not allowed", param=what)
        return name, args, kwargs
    raise ConfigError(
        f"cannot parse {what} {spec!r}: expected name or name(key=value, ...)", param=what
    )


def _import_prefix(text: str) -> tuple[str, str]:
    """``"pkg.mod:make(lr=1)"`` -> ``("pkg.mod", "make(lr=1)")``; other text unchanged."""
    head = text.split("(", 1)[0]
    if ":" not in head:
        return "", text
    module, rest = text.split(":", 1)
    if not all(part.isidentifier() for part in module.strip().split(".")):
        return "", text  # not an import path: let the parser report it
    return module.strip(), rest.strip()


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` as a string for a name or attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def split_top_level(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` outside parentheses, brackets and quotes; strip the parts."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def split_pipeline(text: str, *, what: str | None = None) -> list[str]:
    """Split ``"a(1) | b | c(x=2)"`` into its parts, ignoring ``|`` inside parentheses or
    quotes; ``what`` names the setting in errors (e.g. ``"optimizer"``)."""
    parts = split_top_level(text, "|")
    if any(not p for p in parts):
        where = f"{what} " if what else ""
        raise ConfigError(
            f"empty stage in {where}pipeline {text!r}: stages are joined by single '|'",
            param=what,
        )
    return parts


def call_with_checked_args(fn: Callable[..., Any], args: tuple, kwargs: dict, *, what: str) -> Any:
    """Call ``fn(*args, **kwargs)``; an unknown or surplus argument becomes a `ConfigError`
    that lists the arguments ``fn`` accepts."""
    sig = inspect.signature(fn)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        valid = ", ".join(sig.parameters)
        raise ConfigError(f"bad arguments for {what}: {e}; valid arguments are: {valid}") from None
    return fn(*args, **kwargs)


def build_from_registry(
    spec: str,
    registry: dict[str, Callable[..., Any]],
    *,
    what: str,
    leading: tuple[Any, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> Any:
    """Parse ``spec`` and call the registered factory it names.

    ``leading`` positional arguments come first (e.g. the learning rate);
    ``defaults`` fill keyword arguments the spec leaves out. Every error,
    including one raised by the factory's own validation, is a `ConfigError`
    whose ``param`` is ``what``, so the CLI can point at the right flag.

    Raises:
      ConfigError: unknown name (listing the valid ones), bad syntax or bad arguments.
    """
    if not isinstance(spec, str):
        raise ConfigError(
            f"{what} must be a spec string such as 'name(key=value)'; got {spec!r}", param=what
        )
    try:
        name, args, kwargs = parse_spec(spec, what=what)
    except ConfigError as e:  # e.g. "resnet-18": still say which names exist
        head = spec.split("(", 1)[0].strip()
        raise ConfigError(
            f"{e}; valid {what}s are: {', '.join(sorted(registry))}" + did_you_mean(head, registry),
            param=what,
        ) from None
    if name not in registry:
        raise unknown_name(what, name, registry)
    for k, v in (defaults or {}).items():
        kwargs.setdefault(k, v)
    try:
        return call_with_checked_args(
            registry[name], (*leading, *args), kwargs, what=f"{what} {name!r}"
        )
    except ConfigError as e:
        if e.param == what:
            raise
        raise ConfigError(f"in {what} {spec!r}: {e}", param=what) from None
