"""A lifelong stream of edits: one editor edits the records in arrival order, edit call after edit call on the
model the last call returned (never restored in between), and at each point T every edit so far is scored on the
model that holds them all, with the first 10 edits scored alone to show what the stream kept of them.

Locality is measured against the unedited model's answers (computed once, before the first edit), not against
the model as the stream left it. Past `score_sample` edits a point scores an evenly spaced sample of that many of
the edits so far (every stretch of the stream represented; the model still holds them all): on 2 cores, scoring
all 1,000 edits of a routed stream costs more than making them.

A point is written (stream.json, atomically) as soon as it is scored; a run that is stopped keeps its points and,
started again, replays the edits up to the last one (seeded: the same edits) without scoring them again. SVF's
stream is `t2edit.evaluation.composition.run_sequential`, whose experts on disk are its state.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from t2edit.data.records import EditRecord
from t2edit.editors.base import EditedModel, Editor
from t2edit.evaluation.runner import PreEditReferences, _edit_in_sequence, evaluate_editor
from t2edit.files import atomic_write_json
from t2edit.leakage import prompt_key
from t2edit.plots import plot_curves

log = logging.getLogger("t2edit")
STREAM_POINTS = (10, 50, 100, 250, 500, 1000)
SCORES = ("edit_success", "locality", "portability", "edit_success_em", "locality_em", "portability_em")
FIRST = 10  # the first edits, scored alone at every point


def stream_points(n: int, points: Sequence[int] = STREAM_POINTS) -> list[int]:
    """The points at which a stream of n edits is scored: those of `points` up to n (n itself when none is)."""
    if any(p < 1 for p in points):
        raise ValueError(f"stream points must be at least 1 edit, got {sorted(points)}")
    kept = sorted({p for p in points if p <= n})
    return kept or [n]


class _AsLeft(Editor):
    """The model as the stream left it, scored as an edit that neither edits nor restores anything."""

    sequential = True

    def __init__(self, edited: EditedModel, name: str):
        self.edited, self.name = edited, name

    def edit(self, model, tokenizer, records):
        return EditedModel(model=self.edited.model, context=self.edited.context)


def scored_edits(records: Sequence[EditRecord], sample: int | None) -> list[EditRecord]:
    """What a point scores of the edits so far: all of them, or `sample` evenly spaced ones (the middle of each of
    `sample` equal stretches)."""
    records = list(records)
    if sample is not None and sample < 1:
        raise ValueError(f"--score-sample {sample}: score at least 1 edit per point")
    if sample is None or len(records) <= sample:
        return records
    return [records[(2 * i + 1) * len(records) // (2 * sample)] for i in range(sample)]


def edited_locality_probes(scored: Sequence[EditRecord], edits: Sequence[EditRecord]) -> int:
    """How many locality probes of the `scored` records are the prompt of another of `edits` (KnowEdit asks one
    record's fact as another's locality probe): the stream itself changed their answer, so holding the unedited
    model's answer there counts as kept though it is now out of date. Rows report the count beside locality."""
    owner = {prompt_key(r.prompt): id(r) for r in edits}
    return sum(owner.get(prompt_key(p.prompt), id(r)) != id(r)
               for r in scored for probes in r.locality.values() for p in probes)


def stream_editor(editor: Editor, model, tokenizer, records: Sequence[EditRecord], references: PreEditReferences,
                  points: Sequence[int], chunk: int = 1, done: Sequence[dict] = (),
                  on_point: Callable[[dict], None] = lambda row: None, time_budget: float | None = None,
                  batch_size: int = 16, seed: int = 0, progress: bool = False,
                  score_sample: int | None = None) -> list[dict]:
    """Edit `records` in order, `chunk` per call (a call never spans a point), and score at each point (all edits
    so far, or `scored_edits(..., score_sample)` of them). `done`: the rows of an earlier run of this stream (their
    points are replayed, not scored again). `time_budget` (seconds): no point is started that the pace so far says
    would end after it. Returns the rows, in order; the model is restored before returning."""
    if not getattr(editor, "sequential", False):
        raise ValueError(f"method {editor.name!r} does not edit sequentially (its edits replace each other)")
    if chunk < 1:
        raise ValueError(f"--chunk {chunk}: at least 1 edit per call")
    records = list(records)
    finished = {row["edits"]: row for row in done}
    calls: list[EditedModel] = []
    rows, edited_upto, edit_seconds, started = [], 0, 0.0, time.perf_counter()
    cpu_only = [] if next(model.parameters()).device.type == "cpu" else [next(model.parameters()).device]
    bar = tqdm(total=points[-1] if points else 0, desc=f"{editor.name}: stream", disable=not progress)
    try:
        for point in points:
            elapsed = time.perf_counter() - started
            if time_budget is not None and edited_upto and elapsed * point / edited_upto > time_budget:
                log.info("stream %s: stopped at %d edits (the next point, %d, would end past the time budget)",
                         editor.name, edited_upto, point)
                break
            while edited_upto < point:
                batch = records[edited_upto:min(point, edited_upto + chunk)]
                begun = time.perf_counter()
                with torch.random.fork_rng(devices=cpu_only):  # each call from its own seed: a replay edits the same
                    torch.manual_seed(seed * 1_000_003 + edited_upto)
                    calls.append(_edit_in_sequence(editor, calls[-1].model if calls else model, tokenizer, batch,
                                                   len(batch)))
                edit_seconds += time.perf_counter() - begun
                edited_upto += len(batch)
                bar.update(len(batch))
            if point in finished:
                rows.append(finished[point])
                continue
            scoring = time.perf_counter()
            now = _AsLeft(calls[-1], editor.name)
            scored = scored_edits(records[:point], score_sample)
            result = evaluate_editor(now, model, tokenizer, scored, fluency=False, progress=False,
                                     batch_size=batch_size, references=references)
            first = evaluate_editor(now, model, tokenizer, records[:min(FIRST, point)], fluency=False,
                                    progress=False, batch_size=batch_size, references=references)
            row = {"method": editor.name, "edits_per_call": chunk, "edits": point, "scored": len(scored),
                   **{k: getattr(result, k) for k in SCORES},
                   "edited_locality_probes": edited_locality_probes(scored, records[:point]),
                   **{f"first{FIRST}_{k}": getattr(first, k) for k in ("edit_success", "edit_success_em")},
                   "edit_seconds": round(edit_seconds, 2), "seconds_per_edit": round(edit_seconds / point, 3),
                   "score_seconds": round(time.perf_counter() - scoring, 2)}
            rows.append(row)
            on_point(row)
            log.info("stream %s %4d edits: ES %.3f Loc %.3f Port %.3f (first %d: ES %.3f) %.2f s/edit", editor.name,
                     point, row["edit_success"] or 0, row["locality"] or 0, row["portability"] or 0, FIRST,
                     row[f"first{FIRST}_edit_success"] or 0, row["seconds_per_edit"])
    finally:
        bar.close()
        for edited in reversed(calls):
            edited.restore()
    return rows


def write_stream(rows: Sequence[dict], out_dir: str | Path, title: str = "stream of edits") -> None:
    """stream.json (every row, with `title`) and stream.png: each score against T, one line per method."""
    out = Path(out_dir)
    atomic_write_json(out / "stream.json", {"title": title, "rows": list(rows)})
    plot_stream(rows, out / "stream.png", title)


def plot_stream(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = []
    for key, name in (("edit_success_em", "strict edit success"), ("locality_em", "strict locality"),
                      ("portability_em", "strict portability"), (f"first{FIRST}_edit_success_em",
                                                                 f"first {FIRST} edits kept (strict ES)")):
        curves = []
        for method in methods:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["edits"])
            curves.append((method, [r["edits"] for r in mine],
                           [None if r.get(key) is None else 100 * r[key] for r in mine], "o-"))
        panels.append((name, curves))
    return plot_curves(panels, path, xlabel="edits so far (T)", ylabel="%", ylim=(0, 105), xscale="log",
                       panel_width=4.5, suptitle=title)


__all__ = ["STREAM_POINTS", "edited_locality_probes", "plot_stream", "scored_edits", "stream_editor", "stream_points",
           "write_stream"]
