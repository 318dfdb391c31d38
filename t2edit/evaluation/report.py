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

# (label, field) of the rates in the plot; fluency has its own panel (another scale).
_PLOTTED = [("Edit Succ.", "edit_success"), ("Locality", "locality"), ("Portability", "portability"),
            ("ES (EM)", "edit_success_em"), ("Loc (EM)", "locality_em"), ("Port (EM)", "portability_em")]


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


def _bar_plot(results: Sequence[MethodResult], title: str) -> bytes:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8.0, 1.6 * len(_PLOTTED) + 0.4 * len(results)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    rates, flu = fig.subplots(1, 2, width_ratios=[4, 1])
    width = 0.8 / max(1, len(results))
    for m, result in enumerate(results):
        values = [100 * (getattr(result, f) or 0.0) for _, f in _PLOTTED]
        xs = [i + (m - (len(results) - 1) / 2) * width for i in range(len(_PLOTTED))]
        rates.bar(xs, values, width, label=result.method)
        flu.bar([m], [result.fluency or 0.0], 0.6, color=f"C{m}")
    rates.set_xticks(range(len(_PLOTTED)), [label for label, _ in _PLOTTED])
    rates.set_ylim(0, 105)
    rates.set_ylabel("%")
    rates.set_title(title)
    rates.legend(fontsize="small", ncols=min(6, max(1, len(results))), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    flu.set_xticks(range(len(results)), [r.method for r in results], rotation=45, ha="right")
    flu.set_title("Fluency (×100 bits)")
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
    atomic_write(paths["png"], _bar_plot(results, title))
    return paths
