"""The guide's Python examples run as written: every ```python block of docs/guide.md, in
order, in one namespace (later blocks reuse earlier names, as the guide says), from a
scratch folder; then a few of the values the guide's comments state are checked."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import jax
import numpy as np

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def _blocks() -> list[str]:
    """Every ```python block, dedented (a block inside a list item is indented)."""
    found = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    return [textwrap.dedent(b) for b in found]


def test_the_guides_examples_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write data/train
    blocks = _blocks()
    assert len(blocks) >= 10
    namespace: dict = {"__name__": "guide"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{GUIDE.name} python block {i}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"python block {i} of the guide failed:\n{block}") from e
    # what the comments say
    first_stream_run = namespace["more"]  # the 5 epochs after the 10 of the stream example
    assert first_stream_run.records[-1]["data_state"] == {"next_index": 15 * (3600 // 128)}
    initial = jax.tree.leaves(namespace["trained"].params)
    assert all(isinstance(a, jax.Array) and not a.is_deleted() for a in initial)
    assert np.isfinite(namespace["found"].suggestion)
    capsys.readouterr()


def test_the_guides_ensemble_and_transfer_examples_give_what_they_say(tmp_path, monkeypatch):
    """The ensemble block: one validation value per member, probabilities that sum to
    one; the transfer block: its assertion (a reload evaluates exactly) ran."""
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _blocks() if "create_ensemble" in b or "load_pretrained" in b]
    assert len(blocks) == 2
    namespace: dict = {"__name__": "guide"}
    for block in blocks:
        exec(compile(block, GUIDE.name, "exec"), namespace)
    record = namespace["ens_history"].records[-1]
    assert len(record["val_member_accuracy"]) == 3
    probs = np.asarray(namespace["probs"])
    assert probs.shape == (200, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert len(namespace["ens_metrics"]["member_accuracy"]) == 3
    assert namespace["info"]["stats_loaded"]


def test_the_readmes_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's quick-start Python blocks (every ```python block of README.md; the other
    docs hold none besides the guide's), each in a fresh namespace."""
    monkeypatch.chdir(tmp_path)
    readme = GUIDE.parents[1] / "README.md"
    blocks = [
        textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    ]
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        namespace: dict = {"__name__": "readme"}
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert namespace["history"]["val_loss"][-1] < namespace["history"]["val_loss"][0]
    docs = GUIDE.parent.glob("*.md")
    assert [d.name for d in docs if "```python" in d.read_text()] == ["guide.md"]
    capsys.readouterr()
