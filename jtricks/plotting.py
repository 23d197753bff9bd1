"""The one plotting preamble: matplotlib without a display, figures saved atomically.

Every PNG jtricks writes (training curves, diagnostics, benchmark profiles) goes through
`pyplot` and `save_figure`, so no command needs a display and a reader never sees half
an image.
"""

from __future__ import annotations

import os
from typing import Any

from jtricks.rundir import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, *, axes: Any = (), dpi: int = 100) -> None:
    """Give each of ``axes`` a light grid (and a legend where it has labelled lines), lay
    ``fig`` out tight, write it to ``path`` as a PNG atomically
    (`jtricks.rundir.atomic_write`), and close it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        labelled = len(ax.get_legend_handles_labels()[0])
        if labelled:
            ax.legend(fontsize=7 if labelled > 6 else None)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
