"""The tricks of the ``tricks`` recipe on a wider residual CNN (59,146 parameters,
global average pooling), without TTA.

Command::

    jtricks train --recipe tricks_wide --out runs/tricks_wide

Expected: test accuracy about 0.99 on MNIST-1D (0.995 / 0.992 / 0.993 for seeds 0 / 1 /
2).
"""

from __future__ import annotations

from typing import Any


def get_config() -> dict[str, Any]:
    return {
        "model": "cnn_wide(widths=(32, 64))",
        "optimizer": "adamw(weight_decay=1e-4)",
        "learning_rate": 1e-2,
        "schedule": "one_cycle",
        "batch_size": 100,
        "steps": 4000,
        "augment": "shift(2)",
    }
