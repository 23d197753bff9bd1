"""The one plotting preamble: figures drawn off-screen, saved atomically.

Every PNG jtricks writes (training curves, diagnostics, benchmark profiles) is drawn on a
`matplotlib.figure.Figure` of its own (`subplots`) and written by `save_figure`, so no
command needs a display and a reader never sees half an image. What is new against
``matplotlib.pyplot``: nothing global is touched. pyplot would register each figure in
its list of open figures and needs its backend set to one without a display, which in a
notebook replaces the inline backend the researcher's own plots use; a bare ``Figure``
does neither, so ``jtricks.train(out=...)`` leaves the session's plotting as it was
(matplotlib's advice for figures made in a server or a library).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from jtricks.rundir import atomic_write


def preload() -> threading.Thread:
    """Import matplotlib's ``Figure`` and Agg modules on a background thread, returned
    started. A run that plots at its end calls this as it starts: the 0.3-0.5 s of imports
    then overlap with its data loading and XLA compilation (which let go of the
    interpreter) instead of delaying its last plots. An import that fails here fails
    again, with its message, where the figure is made."""
    thread = threading.Thread(target=_import_matplotlib, name="jtricks-plotting", daemon=True)
    thread.start()
    return thread


def _import_matplotlib() -> None:
    with contextlib.suppress(Exception):
        from matplotlib.backends import backend_agg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401


def subplots(rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """``(figure, axes)`` as ``pyplot.subplots(rows, cols, **kwargs)`` returns them (one
    ``Axes`` for a 1x1 grid, an array otherwise; ``squeeze=False`` keeps the 2-D array),
    on a ``Figure`` that no backend or figure list knows of. ``figsize`` and ``dpi`` go
    to the figure, the rest to ``Figure.subplots``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # first use: 0.3 s import
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None), dpi=kwargs.pop("dpi", None))
    FigureCanvasAgg(fig)  # its renderer lays the figure out and then draws it
    return fig, fig.subplots(rows, cols, **kwargs)


def save_figure(fig: Any, path: str | os.PathLike, *, axes: Any = (), dpi: int = 100) -> None:
    """Give each of ``axes`` a light grid (and a legend where it has labelled lines), lay
    ``fig`` out tight, and write it to ``path`` as a PNG atomically
    (`jtricks.rundir.atomic_write`)."""
    for ax in axes:
        ax.grid(alpha=0.3)
        labelled = len(ax.get_legend_handles_labels()[0])
        if labelled:
            ax.legend(fontsize=7 if labelled > 6 else None)
    fig.set_dpi(dpi)
    fig.tight_layout()
    fig.set_layout_engine(None)  # laid out: else savefig lays it out once more
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
