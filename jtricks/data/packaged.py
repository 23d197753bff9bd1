"""Datasets that ship inside an installed package, so nothing is downloaded.

* `digits`: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; the UCI
  "Optical Recognition of Handwritten Digits" test set), which the scikit-learn wheel
  carries as ``sklearn/datasets/data/digits.csv.gz``. Needs the extra
  ``pip install 'jtricks[sklearn]'``.

What is new here: scikit-learn has no train/test split of its own for it; the split is a
seeded, stratified one (`jtricks.data.train_val_split`), and the images keep their
``(8, 8, 1)`` shape so image models and augmentations apply.

References:
  Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits" (UCI, 1998),
  https://archive.ics.uci.edu/dataset/80
"""

from __future__ import annotations

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.data.imbalance import degrade
from jtricks.data.preprocess import train_val_split
from jtricks.errors import ConfigError, check_range


def digits(
    test_fraction: float = 0.2, seed: int = 0, imbalance: float = 1.0, label_noise: float = 0.0
) -> Dataset:
    """scikit-learn's 8x8 digits as ``(N, 8, 8, 1)`` float32 images with values 0..16,
    split into train and test (``test_fraction`` of each class, seeded). ``imbalance``
    and ``label_noise``: as for `jtricks.data.datasets.mnist1d`.

    Raises:
      ConfigError: scikit-learn is not installed, or ``test_fraction`` is not in (0, 1).
    """
    check_range(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "the digits dataset ships with scikit-learn, which is not installed: "
            "pip install 'jtricks[sklearn]'",
            param="dataset",
        ) from None
    data = load_digits()
    x = data.images.astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    x_tr, y_tr, x_te, y_te = train_val_split(x, y, test_fraction, seed=seed, stratify=True)
    data = Dataset(
        name=f"digits(test_fraction={test_fraction}, seed={seed})",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=10,
    )
    return degrade(data, imbalance=imbalance, label_noise=label_noise, seed=seed)
