"""The dataset registry: every name ``--dataset`` and `load_dataset` accept.

It sits above the loaders (`jtricks.data.datasets` for MNIST-1D, synthetic data and
``.npz`` files, `jtricks.data.loaders` for MNIST and CIFAR files,
`jtricks.data.image_folder` for class folders of images, `jtricks.data.generated` for
the other tasks' data).
"""

from __future__ import annotations

from collections.abc import Callable

from jtricks.data import generated, image_folder, loaders, memory, packaged, tables
from jtricks.data.dataset import Dataset
from jtricks.data.datasets import DATASETS
from jtricks.data.user import user_dataset
from jtricks.errors import ConfigError
from jtricks.spec import build_from_registry

FILES_AND_TASKS: dict[str, Callable[..., Dataset]] = {
    "mnist": loaders.mnist,
    "fashion_mnist": loaders.fashion_mnist,
    "cifar10": loaders.cifar10,
    "cifar100": loaders.cifar100,
    "imagefolder": image_folder.imagefolder,
    "csv": tables.csv,
    "regression": generated.regression,
    "segmentation1d": generated.segmentation1d,
    "tokens": generated.tokens,
    "text": generated.text,
    "digits": packaged.digits,
    "memory": memory.memory,
}
"""Loaders for files on disk (`jtricks.data.loaders`), the other tasks' generators
(`jtricks.data.generated`), datasets shipped inside packages (`jtricks.data.packaged`) and
arrays held in memory (`jtricks.data.memory`)."""


def is_user_dataset(spec: object, registry: dict) -> bool:
    """Whether ``spec`` names a user's dataset factory (``module:factory(args)``): an import
    path whose module part is no name of ``registry`` (``npz:PATH`` is a file)."""
    if not isinstance(spec, str) or ":" not in spec.split("(", 1)[0]:
        return False
    module = spec.split(":", 1)[0].strip()
    dotted = all(part.isidentifier() for part in module.split("."))
    return dotted and module not in registry and module != "shards"


def load_dataset(spec: str) -> Dataset:
    """Load a registered dataset from a spec such as ``"mnist1d"``, ``"synthetic(shape=(8, 8, 3))"``
    or ``"npz:PATH"`` (short for ``npz(path='PATH')``), or a user's own, ``"mydata:load(n=5)"``
    (`jtricks.data.user`).

    Raises:
      ConfigError: for an unknown name (the message lists the valid ones) or a bad argument.
    """
    registry = {**DATASETS, **FILES_AND_TASKS}
    if is_user_dataset(spec, registry):
        return user_dataset(spec)
    if isinstance(spec, str) and ":" in spec and "(" not in spec:
        name, _, path = spec.partition(":")
        if name == "shards":
            raise ConfigError(
                f"{spec!r} is a folder of shards read from disk, which jtricks train and "
                "search stream (jtricks.data.shards.load_shards); this needs a dataset in "
                "memory, such as npz:PATH",
                param="dataset",
            )
        if name not in registry:
            raise ConfigError(
                f"unknown dataset {name!r}; valid datasets are: {', '.join(sorted(registry))}",
                param="dataset",
            )
        return build_from_registry(f"{name}(path={path!r})", registry, what="dataset")
    return build_from_registry(spec, registry, what="dataset")
