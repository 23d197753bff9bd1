"""`jtricks.plotting`: every PNG drawn on a figure of its own, matplotlib's global state
(backend, pyplot's figures) left as the researcher set it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """This process's environment with the repository on ``PYTHONPATH``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


SESSION = """
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")  # the researcher's backend (in a notebook: the inline one)
import matplotlib.pyplot as plt
import numpy as np
from jtricks.plotting import save_figure, subplots
from jtricks.training.class_report import ClassReport, plot_confusion

mine = plt.figure()
out = Path(sys.argv[1])
fig, axes = subplots(1, 2, figsize=(5, 2), squeeze=False)
axes[0, 0].plot([1, 2, 3], [3, 1, 2], label="train")
save_figure(fig, out / "curves.png", axes=tuple(axes.ravel()), dpi=80)
plot_confusion(ClassReport(np.array([[3, 1], [0, 4]])), out / "confusion.png", classes=["a", "b"])
state = {"backend": matplotlib.get_backend(), "figures": plt.get_fignums()}
print(json.dumps({**state, "current_is_mine": plt.gcf() is mine}))
"""


def test_figures_leave_the_researchers_backend_and_figures_alone(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SESSION, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    # pyplot's backend unchanged (it was switched to Agg), its one figure the researcher's
    assert state == {"backend": "svg", "figures": [1], "current_is_mine": True}
    with Image.open(tmp_path / "curves.png") as png:
        assert png.format == "PNG" and png.size == (5 * 80, 2 * 80)
    with Image.open(tmp_path / "confusion.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "curves.png"]


def test_a_confusion_matrix_makes_room_for_long_class_names(tmp_path):
    """Long names on the axes: no clipped layout (matplotlib warns when it cannot fit
    them; the figure kept its size for 4 classes whatever their names), cut at 24."""
    import warnings

    import numpy as np

    from jtricks.training.class_report import ClassReport, _shortened, plot_confusion

    names = ["airplane", "automobile with a long name", "bird", "x" * 40]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" was the clipping
        plot_confusion(
            ClassReport(np.eye(4, dtype=np.int64) * 5), tmp_path / "c.png", classes=names
        )
        plot_confusion(ClassReport(np.eye(4, dtype=np.int64) * 5), tmp_path / "s.png")
    with Image.open(tmp_path / "c.png") as named, Image.open(tmp_path / "s.png") as plain:
        assert named.size[0] > plain.size[0] + 100 and named.size[1] > plain.size[1] + 100
    assert _shortened("x" * 40) == "x" * 23 + "\u2026" and _shortened("bird") == "bird"


def test_preload_imports_matplotlib_in_the_background_and_nothing_global():
    """`preload` (called as a run with a folder starts) imports the figure modules on a
    thread of its own; pyplot stays unimported."""
    code = (
        "import sys, jtricks.plotting as p\n"
        "before = 'matplotlib.figure' in sys.modules\n"
        "p.preload().join(timeout=120)\n"
        "print(before, 'matplotlib.figure' in sys.modules, 'matplotlib.pyplot' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True", "False"]
