"""Images of your own in class folders: ``--dataset imagefolder:PATH``.

The layout is torchvision's ``ImageFolder`` one, with the split on top::

    PATH/train/cat/0001.png    PATH/test/cat/0100.jpg
    PATH/train/dog/0002.jpg    PATH/test/dog/0101.png

Class ``c`` is the ``c``-th folder name of ``train/`` in sorted order (``cat`` 0, ``dog``
1); ``test/`` may lack a class but not bring a new one. Names starting with a dot are
skipped (a Jupyter ``.ipynb_checkpoints`` folder, macOS's ``._0001.png``). Every ``.png``, ``.jpg``,
``.jpeg``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff`` and ``.webp`` file is decoded with
Pillow, converted to RGB (``mode="L"``: one grey channel) and, with ``size=(H, W)``,
resized (bilinear); without ``size`` every image must already have one size. Images come
as ``(N, H, W, C)`` float32 in [0, 255], as the MNIST and CIFAR loaders give them: scale
them with ``--preprocess``.

The decoded arrays are cached as ``.npz`` under `jtricks.data.datasets.cache_dir`, keyed
by the folder's listing (every file's path, size and modification time), ``size`` and
``mode``: a later run with the same files reads the cache; adding, changing or removing
a file decodes again.

New here: torchvision's ``ImageFolder`` reads one image per ``__getitem__``; this reads
the whole split into arrays in memory, the form `jtricks.fit` trains from on the device.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.data.datasets import atomic_save_npz, cache_dir
from jtricks.errors import ConfigError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MODES = ("RGB", "L")


def imagefolder(path: str, size: tuple[int, int] | None = None, mode: str = "RGB") -> Dataset:
    """The ``train/`` and ``test/`` class folders under ``path`` as a classification
    dataset (see the module docstring).

    Raises:
      ConfigError: naming the folder or file: a missing split, no class folder, a class
        with no image, a test class not in ``train/``, an unreadable image, images of
        different sizes without ``size``, a bad ``size`` or ``mode``.
    """
    root = Path(path)
    if mode not in MODES:
        raise ConfigError(f"imagefolder mode must be 'RGB' or 'L'; got {mode!r}", param="dataset")
    if size is not None:
        ok = isinstance(size, tuple | list) and len(size) == 2
        if not ok or not all(isinstance(s, int) and s >= 1 for s in size):
            raise ConfigError(
                f"imagefolder size must be (height, width) in pixels; got {size!r}",
                param="dataset",
            )
        size = (int(size[0]), int(size[1]))
    classes = _class_names(root / "train")
    train, test = (_listing(root / split, classes) for split in ("train", "test"))
    key = json.dumps([str(root.resolve()), size, mode, _stamps(train), _stamps(test)])
    cached = cache_dir() / f"imagefolder-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        arrays = {}
        for split, files in (("train", train), ("test", test)):
            arrays[f"x_{split}"] = _decode(files, size, mode)
            arrays[f"y_{split}"] = np.asarray([label for _, label in files], np.int32)
        atomic_save_npz(cached, **arrays)
    return Dataset(
        name="imagefolder",
        x_train=arrays["x_train"].astype(np.float32),
        y_train=arrays["y_train"],
        x_test=arrays["x_test"].astype(np.float32),
        y_test=arrays["y_test"],
        num_classes=len(classes),
        classes=tuple(classes),
    )


def _class_names(train: Path) -> list[str]:
    if not train.is_dir():
        raise ConfigError(
            f"imagefolder: {str(train)!r} is not a folder; give a folder holding train/ and "
            "test/, each with one folder of images per class",
            param="dataset",
        )
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not _hidden(p))
    if not classes:
        raise ConfigError(f"imagefolder: {str(train)!r} has no class folder", param="dataset")
    return classes


def _listing(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """Every image file of ``split`` with its label, in class then file-name order."""
    if not split.is_dir():
        raise ConfigError(f"imagefolder: {str(split)!r} is not a folder", param="dataset")
    extra = sorted(
        p.name for p in split.iterdir() if p.is_dir() and not _hidden(p) and p.name not in classes
    )
    if extra:
        raise ConfigError(
            f"imagefolder: {str(split)!r} has classes that train/ has not: {', '.join(extra)}",
            param="dataset",
        )
    files = []
    for label, name in enumerate(classes):
        folder = split / name
        images = sorted(
            f for f in folder.iterdir() if f.suffix.lower() in SUFFIXES and not _hidden(f)
        )
        if split.name == "train" and not images:
            raise ConfigError(f"imagefolder: {str(folder)!r} has no image", param="dataset")
        files += [(f, label) for f in images]
    if not files:
        raise ConfigError(f"imagefolder: {str(split)!r} has no image", param="dataset")
    return files


def _hidden(path: Path) -> bool:
    """A name starting with a dot: what tools leave beside the data (``.ipynb_checkpoints``
    folders from Jupyter, macOS's ``._name.png`` resource forks), never a class or an image."""
    return path.name.startswith(".")


def _stamps(files: list[tuple[Path, int]]) -> list[tuple[str, int, int]]:
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f, _ in files]


def _decode(files: list[tuple[Path, int]], size: tuple[int, int] | None, mode: str) -> np.ndarray:
    """``(N, H, W, C)`` uint8 of the files, each converted to ``mode`` and resized to
    ``size`` (``(H, W)``) when given."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(
                f"imagefolder: cannot read image {str(f)!r}: {e}", param="dataset"
            ) from None
        if images and a.shape != images[0].shape:
            raise ConfigError(
                f"imagefolder: {str(f)!r} is {a.shape[1]}x{a.shape[0]} pixels but "
                f"{str(files[0][0])!r} is {images[0].shape[1]}x{images[0].shape[0]}; give "
                "size=(height, width) to resize them all",
                param="dataset",
            )
        images.append(a)
    stacked = np.stack(images)
    return stacked[..., None] if stacked.ndim == 3 else stacked
