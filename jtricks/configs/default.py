"""The MNIST-1D paper's CNN: Adam at 1e-2, batch 100, 6000 steps, nothing else.

Command::

    jtricks train --recipe default --out runs/default

Expected: test accuracy 0.91-0.92 on MNIST-1D (0.909 / 0.918 / 0.918 for seeds 0 / 1 /
2), 5,210 parameters. This is also what ``jtricks train`` does with no flags.
"""

from __future__ import annotations

from typing import Any


def get_config() -> dict[str, Any]:
    return {}
