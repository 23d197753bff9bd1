"""Every cache jtricks keeps of compiled programs and traced shapes registers itself here,
so `clear_caches` empties them all.

The pattern is equinox's (each of its caches registers itself for
``equinox.clear_caches``): a cache is declared with `cached` (a `functools.lru_cache`),
`jitted` (a module-level `jax.jit`) or `register` (anything with a method that empties
it), at the place it is defined, so a new cache cannot be forgotten by a central list.
A test finds every module-level cache and jitted function in the package and checks it
is registered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_CLEARERS: list[Callable[[], None]] = []


def register(clear: Callable[[], None]) -> Callable[[], None]:
    """Add ``clear`` (a no-argument function that empties one cache) to what
    `clear_caches` calls; returns it."""
    _CLEARERS.append(clear)
    return clear


def cached(fn: F | None = None, *, maxsize: int | None = None) -> Any:
    """`functools.lru_cache` (unbounded by default, as `functools.cache`) registered for
    `clear_caches`; use as ``@cached`` or ``@cached(maxsize=64)``."""
    if fn is None:
        return functools.partial(cached, maxsize=maxsize)
    wrapped = functools.lru_cache(maxsize=maxsize)(fn)
    register(wrapped.cache_clear)
    return wrapped


def jitted(fn: F | None = None, **jit_kwargs: Any) -> Any:
    """`jax.jit` of a module-level function, registered for `clear_caches` (its compiled
    programs are dropped by ``clear_cache()``); ``@jitted`` or ``@jitted(static_argnums=...)``."""
    import jax

    if fn is None:
        return functools.partial(jitted, **jit_kwargs)
    compiled = jax.jit(fn, **jit_kwargs)
    register(compiled.clear_cache)
    return compiled


def registered(clear: Any) -> bool:
    """Whether ``clear`` (a bound ``cache_clear`` / ``clear_cache`` / ``dict.clear``) is
    registered."""
    return any(c == clear for c in _CLEARERS)


def clear_caches() -> None:
    """Forget every compiled program and traced shape jtricks keeps: the step functions
    and epoch, part and chunk programs of `fit` and `evaluate`, the data checks' shape
    tracing, test-time augmentation, the compiled model initialisers and state copies,
    and the tasks made from losses. The next call compiles again (JAX's persistent
    compilation cache, when enabled, still serves it from disk); `jax.clear_caches`
    clears JAX's own in-memory caches as well."""
    for clear in _CLEARERS:
        clear()
