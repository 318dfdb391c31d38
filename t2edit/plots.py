"""Line plots of curves (reward curves, sequential-editing curves), written as one PNG atomically."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

from t2edit.files import atomic_write

Curve = tuple[str, Sequence[float], Sequence[float | None], str]


def plot_curves(panels: Sequence[tuple[str, Sequence[Curve]]], path: str | os.PathLike, *, xlabel: str,
                ylabel: str, ylim: tuple[float, float] | None = None, panel_width: float = 5.5,
                dpi: int = 120, xscale: str = "linear", suptitle: str = "") -> Path:
    """Line plots, one panel per (title, curves) side by side, saved as one PNG at `path` (atomically); `suptitle`
    over them all."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_width * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)
    if suptitle:
        fig.suptitle(suptitle)
    for axis, (title, curves) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, xs, ys, style in curves:
            axis.plot(list(xs), [float("nan") if y is None else y for y in ys], style, label=label)
        axis.set_title(title)
        axis.set_xscale(xscale)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        if ylim is not None:
            axis.set_ylim(*ylim)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path


__all__ = ["Curve", "plot_curves"]
