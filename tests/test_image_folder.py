"""``--dataset imagefolder:PATH``: class folders of image files decoded into arrays,
against the pixels written; resizing, the cache, refusals in one line, a CLI run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jtricks.cli import main
from jtricks.data import load_dataset
from jtricks.errors import ConfigError

RNG = np.random.default_rng(0)


def _write(root, split, name, pixels, suffix=".png"):
    folder = root / split / name
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.iterdir()))
    Image.fromarray(pixels).save(folder / f"{n:03d}{suffix}")


@pytest.fixture
def folder(tmp_path):
    """3 classes, 4 training and 2 test images each, 6x5 RGB (PNG and lossless BMP)."""
    written = {"train": [], "test": []}
    for split, count in (("train", 4), ("test", 2)):
        for label, name in enumerate(("ant", "bee", "cat")):
            for i in range(count):
                pixels = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                _write(tmp_path / "imgs", split, name, pixels, ".bmp" if i % 2 else ".png")
                written[split].append((pixels, label))
    return tmp_path / "imgs", written


def test_the_folders_become_the_pixels_and_labels_written(folder):
    root, written = folder
    data = load_dataset(f"imagefolder:{root}")
    assert data.num_classes == 3 and data.x_train.shape == (12, 6, 5, 3)
    assert data.x_train.dtype == np.float32 and data.classes == ("ant", "bee", "cat")
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        np.testing.assert_array_equal(x, np.stack([p for p, _ in written[split]]))
        np.testing.assert_array_equal(y, [label for _, label in written[split]])
    grey = load_dataset(f"imagefolder(path='{root}', mode='L', size=(3, 4))")
    assert grey.x_train.shape == (12, 3, 4, 1)
    expect = Image.fromarray(written["train"][0][0]).convert("L").resize((4, 3), Image.BILINEAR)
    np.testing.assert_array_equal(grey.x_train[0, ..., 0], np.asarray(expect))


def test_what_tools_leave_beside_the_images_is_skipped(folder):
    """A Jupyter ``.ipynb_checkpoints`` folder (in ``train/`` and in a class folder) and a
    macOS resource fork ``._000.png`` (not an image) are neither classes nor images."""
    root, written = folder
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "ant" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "bee" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    data = load_dataset(f"imagefolder:{root}")
    assert data.num_classes == 3
    np.testing.assert_array_equal(data.x_train, np.stack([p for p, _ in written["train"]]))


def test_the_cache_is_read_until_a_file_changes(folder, monkeypatch):
    root, _ = folder
    first = load_dataset(f"imagefolder:{root}")
    import jtricks.data.image_folder as image_folder

    monkeypatch.setattr(image_folder, "_decode", lambda *a: pytest.fail("decoded again"))
    cached = load_dataset(f"imagefolder:{root}")
    np.testing.assert_array_equal(cached.x_train, first.x_train)
    assert cached.classes == ("ant", "bee", "cat")
    monkeypatch.undo()
    _write(root, "train", "ant", np.zeros((6, 5, 3), np.uint8))
    assert load_dataset(f"imagefolder:{root}").x_train.shape[0] == 13


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: _write(r, "train", "ant", np.zeros((7, 5, 3), np.uint8)), "give size="),
        (lambda r: _write(r, "test", "dog", np.zeros((6, 5, 3), np.uint8)), "classes that train/"),
        (lambda r: (r / "train" / "ant" / "bad.png").write_bytes(b"not an image"), "cannot read"),
        (lambda r: (r / "train" / "eel").mkdir(), "train/eel' has no image"),
    ],
)
def test_bad_folders_are_refused_naming_the_file(folder, change, message):
    root, _ = folder
    change(root)
    with pytest.raises(ConfigError, match=message):
        load_dataset(f"imagefolder:{root}")


def test_bad_arguments_and_a_missing_split_are_refused(folder, tmp_path):
    root, _ = folder
    for spec, message in (
        (f"imagefolder(path='{root}', size=(0, 4))", "size must be"),
        (f"imagefolder(path='{root}', mode='CMYK')", "mode must be"),
        (f"imagefolder:{tmp_path / 'none'}", "is not a folder"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_dataset(spec)


def test_cli_trains_on_an_image_folder(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "run"
    args = ["train", "--dataset", f"imagefolder:{root}", "--model", "mlp(features=(8,))"]
    args += ["--preprocess", "standardize", "--epochs", "2", "--batch-size", "4", "--no-progress"]
    assert main([*args, "--val-fraction", "0.25", "--out", str(out)]) == 0
    assert 0 <= json.loads((out / "summary.json").read_text())["test_accuracy"] <= 1
