"""Results table (terminal and Markdown), results.json and a bar plot, written atomically."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from t2edit.files import atomic_write
from t2edit.evaluation.runner import AGGREGATION, FLUENCY_NOTE, MethodResult


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


COLUMNS: list[tuple[str, Callable[[MethodResult], str]]] = [
    ("Method", lambda r: r.method),
    ("Edit Succ.", lambda r: _pct(r.edit_success)),
    ("Locality", lambda r: _pct(r.locality)),
    ("Portability", lambda r: _pct(r.portability)),
    ("Fluency", lambda r: _num(r.fluency)),
    ("ES (EM)", lambda r: _pct(r.edit_success_em)),
    ("Loc (EM)", lambda r: _pct(r.locality_em)),
    ("Port (EM)", lambda r: _pct(r.portability_em)),
    ("n", lambda r: str(r.n_records)),
    ("seconds", lambda r: _num(r.seconds)),
]

# (label, field, scale) of the plot's panels: rates in percent, fluency on its own scale.
_PLOTTED = [("Edit Succ.", "edit_success", 100), ("Locality", "locality", 100), ("Portability", "portability", 100),
            ("Fluency (x100 bits)", "fluency", 1), ("ES (EM)", "edit_success_em", 100),
            ("Loc (EM)", "locality_em", 100), ("Port (EM)", "portability_em", 100)]
_PANELS_PER_ROW = 4


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def format_table(results: Sequence[MethodResult]) -> str:
    """The results table (Markdown, columns aligned so it also reads in a terminal); rates in percent."""
    return _markdown_table([name for name, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in results])


def _portability_by_kind_table(results: Sequence[MethodResult]) -> str:
    rows = [[r.method, kind, _pct(v.get("portability")), _pct(v.get("portability_em")), str(v.get("n_records", ""))]
            for r in results for kind, v in sorted(r.portability_by_kind.items())]
    return _markdown_table(["Method", "Kind", "Portability", "Port (EM)", "n"], rows) if rows else ""


def _notes(results: Sequence[MethodResult]) -> list[str]:
    modes = ", ".join(sorted({r.mode for r in results})) or "–"
    return [
        f"Aggregation: {AGGREGATION}.",
        "Edit Succ. / Locality / Portability: EasyEdit's teacher-forced token accuracy (locality: argmax tokens "
        "unchanged from the unedited model). ES / Port (EM): greedy answer matches an alias after normalisation; "
        "Loc (EM): greedy answer matches the unedited model's greedy answer. Rates in percent.",
        f"Fluency: {FLUENCY_NOTE}. Edit mode: {modes}. seconds: editing + scoring.",
    ]


def plotted_metrics(results: Sequence[MethodResult]) -> list[tuple[str, str, int]]:
    """(label, field, scale) of each panel the plot draws: the metrics at least one method has."""
    return [(label, field, scale) for label, field, scale in _PLOTTED
            if any(getattr(r, field) is not None for r in results)]


def bar_plot(results: Sequence[MethodResult], title: str) -> bytes:
    """One panel per metric that any method has (a skipped fluency run draws no empty axis), methods as
    horizontal bars in table order, so a dozen methods stay legible; a method without the metric shows "–"."""
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = plotted_metrics(results)
    n_rows = max(1, -(-len(panels) // _PANELS_PER_ROW))
    n_cols = min(_PANELS_PER_ROW, max(1, len(panels)))
    fig = Figure(figsize=(3.2 * n_cols + 1.2, (0.28 * len(results) + 1.0) * n_rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    names = [r.method for r in results]
    rows = range(len(results))
    for axis, (label, field, scale) in zip(axes, panels):
        values = [getattr(r, field) for r in results]
        axis.barh(rows, [scale * (v or 0.0) for v in values], color=[f"C{m % 10}" for m in rows])
        top = 105 if scale == 100 else 1.15 * max(scale * (v or 0.0) for v in values)
        for m, value in zip(rows, values):
            text = "–" if value is None else f"{scale * value:.0f}" if scale == 100 else f"{value:.0f}"
            axis.text(scale * (value or 0.0) + top * 0.01, m, text, va="center", fontsize="x-small")
        axis.set_xlim(0, top)
        axis.set_yticks(rows, names if axis in axes[::n_cols] else [""] * len(names), fontsize="small")
        axis.invert_yaxis()
        axis.set_title(label, fontsize="medium")
        axis.grid(axis="x", alpha=0.3)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


# (label, xs, ys, matplotlib format such as "o-"); a None in ys leaves a gap.
def write_results(results: Sequence[MethodResult], out_dir: str | os.PathLike,
                  title: str = "Knowledge editing results") -> dict[str, Path]:
    """Write results.json, results.md and results.png into `out_dir` (created if needed); returns their paths."""
    results = list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    payload = {"title": title, "aggregation": AGGREGATION, "fluency_scale": FLUENCY_NOTE,
               "methods": [r.to_dict() for r in results]}
    atomic_write(paths["json"], (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode())
    sections = [f"# {title}", format_table(results), "\n".join(_notes(results))]
    by_kind = _portability_by_kind_table(results)
    if by_kind:
        sections += ["## Portability by kind", by_kind]
    atomic_write(paths["md"], ("\n\n".join(sections) + "\n").encode())
    atomic_write(paths["png"], bar_plot(results, title))
    return paths
