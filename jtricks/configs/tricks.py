"""Every trick at once on the paper-sized CNN.

BatchNorm, AdamW (decoupled weight decay), a one-cycle schedule, a random circular shift
of up to 2 samples plus a random linear trend (MNIST-1D's shear), and test-time
augmentation over 33 views, on 26 channels instead of 25 (5,730 parameters).

Command::

    jtricks train --recipe tricks --out runs/tricks

Expected: test accuracy about 0.98 on MNIST-1D (0.980 / 0.985 / 0.979 for seeds 0 / 1 /
2; 0.979 / 0.975 / 0.972 for the same runs' single, un-augmented view).

How it was chosen (on the validation split, 10% of the training split): shift(2/3/4/6),
time_stretch, scale, noise, dropout 0.1, GELU, EMA, 25 / 26 channels, learning rate
1e-2 / 2e-2 / 3e-2, weight decay 1e-4 / 1e-3 / 1e-2, 3000 / 4000 steps and batch 64 /
100 / 128 (2-3 seeds); then, on 12 seeds: kernel sizes 7 / 9 in the first layer, a
fourth layer, widths 20/28/28, warm-up cosine and a shorter one-cycle warm-up, 5000 /
6000 steps, label smoothing 0.1, mixup 0.2, trend(0.5 / 1 / 2), and TTA with 1 / 5 /
9 / 17 / 33 views. Checkpoints every 50 of the 112 short epochs.
"""

from __future__ import annotations

from typing import Any


def get_config() -> dict[str, Any]:
    return {
        "model": "cnn(norm='batch', channels=(26, 26, 26))",
        "optimizer": "adamw(weight_decay=1e-4)",
        "learning_rate": 1e-2,
        "schedule": "one_cycle",
        "batch_size": 100,
        "steps": 4000,
        "augment": "shift(2) | trend(1.0)",
        "tta": 33,
        "checkpoint_every": 50,
    }
