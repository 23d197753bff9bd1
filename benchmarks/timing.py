"""What every benchmark script shares: timing arms in turn, and writing the result."""

from __future__ import annotations

import json
from collections.abc import Callable


def time_arms(arms: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Every arm once to compile (each returns the seconds it measured itself), then
    ``repeats`` rounds of the arms in turn (A B A B ...), so drift hits all alike."""
    for fn in arms.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            times[name].append(fn())
    return times


def write_result(result: dict, path: str | None) -> None:
    """The result as an indented JSON file at ``path`` (nothing when ``None``)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
