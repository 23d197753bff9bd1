"""The tricks of the ``tricks`` recipe on a wider residual CNN (59,146 parameters,
global average pooling), with the shift augmentation alone and without TTA.

Command::

    jtricks train --recipe tricks_wide --out runs/tricks_wide

Expected: test accuracy about 0.99 on MNIST-1D (0.995 / 0.992 / 0.993 for seeds 0 / 1 /
2).
"""

from __future__ import annotations

from typing import Any

from jtricks.configs import tricks


def get_config() -> dict[str, Any]:
    config = tricks.get_config()
    del config["tta"], config["checkpoint_every"]
    config.update(model="cnn_wide(widths=(32, 64))", augment="shift(2)")
    return config
