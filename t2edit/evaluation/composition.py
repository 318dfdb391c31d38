"""Compositional and sequential editing with many experts (`t2edit eval --composition K` / `--sequential`).

Composition: N edits split into K experts trained independently; each (K, router) row is scored by the one
evaluation path (`evaluate_editor`) with an `AdaptiveModel` as the edited model, next to one expert holding all
N edits. Two-hop questions whose two facts live in different experts are scored as their own column.

Sequential: single-edit experts are added one at a time (expert n+1 is trained alone, in its own directory;
experts 1..n are never retrained or rewritten) and all edits so far are scored after each addition.

The experts are trained by `t2edit.training.fanout`, whose pools follow the no-leakage rule for the whole edited
set: no expert trains on, and no router is fitted on, any prompt the evaluation scores for ANY edited record. This
module only splits, scores, tabulates and plots.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from t2edit.data.records import EditRecord, Probe
from t2edit.distributed import Processes, processes
from t2edit.editors import ExpertsEditor
from t2edit.evaluation.report import write_results
from t2edit.evaluation.runner import MethodResult, PreEditReferences, evaluate_editor
from t2edit.evaluation.stream import FIRST, edited_locality_probes, scored_edits
from t2edit.experts import Expert, ExpertInfo, OwnRouter
from t2edit.files import atomic_write, atomic_write_json
from t2edit.leakage import router_negatives
from t2edit.plots import plot_curves
from t2edit.routing import AdaptiveModel, FixedRouter, annotate_expert, encode, get_router, last_states, threshold_above
from t2edit.runs import check_run_key, digest, edits_digest, run_lock
from t2edit.svf import apply_svf, model_fingerprint
from t2edit.training import expert_run_dir, train_experts, trained_experts

log = logging.getLogger("t2edit")
ROW_ROUTERS = ("oracle", "embedding", "scope", "scope-split", "hybrid", "classifier", "prompt", "cem", "uniform")


def many_experts_key(setup, base_config=None) -> dict:
    """What the experts of a composition or sequential run depend on: the edited records in order, what they learn
    from (the other records and facts), the base model and the training settings."""
    return {"edits": edits_digest(setup.edits),
            "learning_pool": digest([r.prompt for r in setup.other_records] + list(setup.extra_neighbour_prompts)),
            "base_model": model_fingerprint(setup.model),
            "train_config": digest(asdict(base_config)) if base_config is not None else "preset"}


def split_records(records: Sequence[EditRecord], k: int) -> list[list[EditRecord]]:
    """k contiguous, near-equal chunks (k = len(records): one edit per expert)."""
    if not 1 <= k <= len(records):
        raise ValueError(f"--composition K={k} must lie in [1, number of edits = {len(records)}]")
    bounds = [round(i * len(records) / k) for i in range(k + 1)]
    return [list(records[a:b]) for a, b in zip(bounds, bounds[1:])]


def oracle_assignments(chunks: list[list[EditRecord]], cross: Sequence[tuple[str, int, int]] = ()) -> dict:
    """Scored prompt → {expert: weight}: the record's expert for its edit, rephrase and portability prompts; no
    expert for locality prompts; for a two-hop prompt across experts, both experts' changes added."""
    out: dict[str, dict[int, float]] = {}
    for k, chunk in enumerate(chunks):
        for record in chunk:
            for prompt in [record.prompt] + [p.prompt for p in record.rephrase] + \
                    [p.prompt for probes in record.portability.values() for p in probes]:
                out[prompt] = {k: 1.0}
            for probes in record.locality.values():
                for p in probes:
                    out.setdefault(p.prompt, {})
    for prompt, a, b in cross:
        out[prompt] = {a: 1.0, b: 1.0} if a != b else {a: 1.0}
    return out


def cross_two_hop(chunks: list[list[EditRecord]]) -> list[tuple[EditRecord, str, int, int]]:
    """Two-hop questions whose two facts are both edits: A edits (s, r1) → t and B edits (t, r2) → t2, so "r2 of
    the r1 of s" should now be t2. Built from the edit prompts alone; returns (record with that probe, prompt,
    expert of A, expert of B)."""
    where = {id(r): k for k, chunk in enumerate(chunks) for r in chunk}
    by_subject: dict[str, list[EditRecord]] = {}
    for chunk in chunks:
        for r in chunk:
            by_subject.setdefault(r.subject, []).append(r)
    out = []
    for chunk in chunks:
        for a in chunk:
            if not a.prompt.endswith(" is") or a.subject not in a.prompt:
                continue
            inner = a.prompt[:-3]
            inner = inner[0].lower() + inner[1:]
            for b in by_subject.get(a.target, []):
                if b.subject in b.prompt:
                    prompt = b.prompt.replace(b.subject, inner, 1)
                    record = EditRecord(subject=a.subject, prompt=a.prompt, target_new=a.target_new,
                                        portability={"two_hop_across_experts": [Probe(prompt, list(b.target_new))]})
                    out.append((record, prompt, where[id(a)], where[id(b)]))
    return out


def _router_factory(name: str, chunks, cross):
    if name == "oracle":
        return lambda: get_router("oracle", assignments=oracle_assignments(chunks, [(p, a, b) for _, p, a, b in cross]))
    return lambda: get_router(name)


def _score(editor, setup, records, cross_records, batch_size, progress):
    result = evaluate_editor(editor, setup.model, setup.tokenizer, records, fluency=False, progress=progress,
                             batch_size=batch_size)
    if cross_records:
        cross = evaluate_editor(editor, setup.model, setup.tokenizer, cross_records, fluency=False,
                                progress=False, batch_size=batch_size)
        result.extra["two_hop_across"] = cross.portability
        result.extra["two_hop_across_em"] = cross.portability_em
        result.extra["n_two_hop_across"] = len(cross_records)
    result.extra["router_fit_seconds"] = getattr(editor, "fit_seconds", None)
    return result


def run_composition(setup, ks: Sequence[int], out_dir: str, routers: Sequence[str] = ROW_ROUTERS,
                    base_config=None, progress: bool = True, title: str = ""):
    """The composition table. K = 1 gives the one-expert-for-all rows (applied to every prompt, and behind its
    own embedding router); any other K splits the edits into K experts and scores each router. Each K's rows are
    written to out_dir/rows-k{K}.json as they finish, so K values can run in separate processes; the table and
    plot (composition.md, results.*) cover every K found in out_dir.

    Under `accelerate launch --num_processes N`, every process trains its share of each K's experts, the main
    process gathers them into out_dir (`t2edit.training.trained_experts`) and scores the rows alone; the others
    return [] once the experts are trained."""
    edits = list(setup.edits)
    n = len(edits)
    procs = processes()
    if procs.is_main:
        check_run_key(out_dir, many_experts_key(setup, base_config), "composition run")
    negatives = router_negatives(setup, edits)
    batch_size = 64 if setup.world_report is not None else 16
    for k in ks:
        k = n if k in (0, -1) or k > n else k
        chunks = split_records(edits, k)
        dirs = train_experts(setup, chunks, Path(out_dir) / f"experts-k{k}", edits, base_config,
                             progress and procs.is_main)
        if not procs.is_main:
            continue
        cross = cross_two_hop(chunks)
        if k == 1:
            rows = [("always", lambda: FixedRouter([1.0, 0.0])), ("embedding", _router_factory("embedding", chunks, []))]
        else:
            rows = [(name, _router_factory(name, chunks, cross)) for name in routers if not (name == "prompt" and k > 16)]
        results = []
        for name, factory in rows:
            label = f"K={k} {name}"
            editor = ExpertsEditor(dirs, factory, label, negatives)
            started = time.perf_counter()
            results.append(_tag(_score(editor, setup, edits, [c for c, *_ in cross], batch_size, progress), k, label))
            log.info("%s: %.1f s", label, time.perf_counter() - started)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(out_dir, f"rows-k{k}.json"), [r.to_dict() for r in results])
    if not procs.is_main:
        return []
    return write_composition(out_dir, title or f"{setup.model_name}: {n} edits composed from K experts")


def write_composition(out_dir: str, title: str = "composition"):
    """Merge every rows-k*.json in out_dir into composition.md and results.{json,md,png}."""
    results = []
    for path in sorted(Path(out_dir).glob("rows-k*.json"), key=lambda p: int(p.stem[6:])):
        results += [MethodResult(**row) for row in json.loads(path.read_text())]
    write_results(results, out_dir, title=title)
    table = composition_table(results)
    atomic_write(Path(out_dir, "composition.md"), table + "\n")
    log.info("composition\n%s", table)
    return results


def _tag(result, k, label):
    result.method = label
    result.extra["k"] = k
    return result


def composition_table(results) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| experts / router | ES | Loc | Port | ES (EM) | Loc (EM) | Port (EM) | two-hop across experts "
             "(EM) | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.method} | {pct(r.edit_success)} | {pct(r.locality)} | {pct(r.portability)} | "
                     f"{pct(r.edit_success_em)} | {pct(r.locality_em)} | {pct(r.portability_em)} | "
                     f"{pct(r.extra.get('two_hop_across'))} ({pct(r.extra.get('two_hop_across_em'))}) | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)


def sequential_sizes(n: int, points: int = 10) -> list[int]:
    """Where the sequential curve is scored: 1 and `points` evenly spaced sizes up to n."""
    return sorted({max(1, round(n * i / points)) for i in range(1, points + 1)} | {1})


def run_sequential(setup, out_dir: str, routers: Sequence[str] = ("scope-split", "embedding"), points: int = 10,
                   base_config=None, progress: bool = True, workers: int = 1, batch_size: int | None = None,
                   deadline: float | None = None, sizes: Sequence[int] | None = None,
                   experts_dir: str | Path | None = None, references: PreEditReferences | None = None,
                   score_sample: int | None = None, on_point: Callable[[dict], None] = lambda row: None):
    """Single-edit experts added one at a time; at each size of `sizes` (default `sequential_sizes(n, points)`)
    all edits so far are scored with every router (and the first 10 edits alone, to see whether they keep their
    scores). Experts train while earlier points are scored (`trained_experts`, `workers` CPU processes).
    `references` (`t2edit.evaluation.runner.pre_edit_references` of the edits) spares each point the unedited
    model's answers; `score_sample`: past that many edits a point scores `scored_edits` of them. `on_point` is
    called with each row as soon as it is scored.

    Each point is appended to out_dir/sequential.json (and the plot redrawn) as soon as it is scored, so a run
    stopped early keeps every finished point. `deadline` (a time.perf_counter() value): no point is started after
    it, nor one that the time of the previous point says would end after it. The experts go to `experts_dir`
    (default out_dir/experts-single). One process writes to out_dir at a time, and only the run that made its
    experts continues there.

    Under `accelerate launch --num_processes N`, the experts the curve needs are trained first, every process
    training its share and the main process gathering them into `experts_dir` (`t2edit.training.trained_experts`);
    the main process then scores the curve alone (`deadline` then bounds the scoring, not the training), and the
    others return [] once the experts are trained."""
    experts_dir = Path(experts_dir or Path(out_dir) / "experts-single")
    procs = processes()
    if procs.launched and workers > 1:
        raise ValueError("--workers starts a local pool of processes; under accelerate launch the launched processes "
                         "train the experts: drop --workers")
    n = len(setup.edits)
    needed = max((s for s in (sizes or sequential_sizes(n, points)) if 1 <= s <= n), default=0)
    if not procs.is_main:
        train_experts(setup, split_records(setup.edits, n)[:needed], experts_dir, list(setup.edits), base_config,
                      progress=False)
        return []
    with run_lock(out_dir):
        # The experts directory may be shared by runs of one edited set; each expert there is checked against the
        # edits it is reused for (`t2edit.training.train_one_expert`).
        check_run_key(out_dir, many_experts_key(setup, base_config), "sequential run")
        if procs.launched:
            train_experts(setup, split_records(setup.edits, n)[:needed], experts_dir, list(setup.edits),
                          base_config, progress)
            procs = Processes()  # every expert is on disk: the curve is scored here alone
        return _sequential(setup, out_dir, routers, points, base_config, progress, workers, batch_size, deadline,
                           sizes, experts_dir, procs, references, score_sample, on_point)


def _sequential(setup, out_dir, routers, points, base_config, progress, workers, batch_size, deadline, sizes,
                experts_dir: Path, procs: Processes, references=None, score_sample=None, on_point=lambda row: None):
    edits = list(setup.edits)
    n = len(edits)
    chunks = split_records(edits, n)
    dirs = [str(expert_run_dir(experts_dir, k) / "expert") for k in range(n)]
    sizes = sorted({s for s in (sizes or sequential_sizes(n, points)) if 1 <= s <= n})
    batch_size = batch_size or (64 if setup.world_report is not None else 16)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    saved = Path(out_dir) / "sequential.json"  # an earlier run of this curve (its run key checked): its points stay
    curve: list[dict] = [r for r in json.loads(saved.read_text()) if r["edits"] not in sizes] if saved.exists() else []
    loaded: dict = {}
    started = time.perf_counter()
    last_point_seconds, last_scored = 0.0, 0
    # no expert past the last point is trained
    ready = trained_experts(setup, chunks[:sizes[-1]] if sizes else chunks, experts_dir, edits, base_config,
                            progress, workers, procs)
    try:
        trained = 0
        for size in sizes:
            while trained < size and not _past(deadline):
                next(ready)
                trained += 1
            # scoring grows with the edits scored (all so far, or a sample); the routers' fit (pass 1 over the
            # negatives) is left out of the projection
            expected = last_point_seconds * len(scored_edits(range(size), score_sample)) / max(1, last_scored)
            if _past(deadline, expected):
                log.info("sequential: deadline; stopping before %d edits (%d experts trained, %d rows kept)", size,
                         trained, len(curve))
                break
            point_started, fitting = time.perf_counter(), 0.0
            so_far = edits[:size]
            negatives = router_negatives(setup, so_far)
            pass1: dict = {}  # the negatives' pass 1 for this point's routers (a later point has other negatives)
            for name in routers:
                row_started = time.perf_counter()
                editor = ExpertsEditor(dirs[:size], _router_factory(name, chunks[:size], []), f"{name}@{size}",
                                        negatives, loaded=loaded, pass1_cache=pass1)
                scored = scored_edits(so_far, score_sample)
                result = evaluate_editor(editor, setup.model, setup.tokenizer, scored, fluency=False,
                                         progress=False, batch_size=batch_size, references=references)
                first = evaluate_editor(editor, setup.model, setup.tokenizer, edits[:min(FIRST, size)],
                                        fluency=False, progress=False, batch_size=batch_size, references=references)
                row = {"router": name, "edits": size, "scored": len(scored), **{k: getattr(result, k) for k in (
                    "edit_success", "locality", "portability", "edit_success_em", "locality_em", "portability_em")},
                    "first10_edit_success": first.edit_success, "first10_edit_success_em": first.edit_success_em,
                    "edited_locality_probes": edited_locality_probes(scored, so_far),
                    "negatives": len(negatives), "router_fit_seconds": round(editor.fit_seconds, 2),
                    # the experts' own training time (kept in each expert: a resumed run reports the same)
                    "train_seconds": round(sum(loaded[d].info.train_seconds or 0.0 for d in dirs[:size]), 2),
                    "seconds": round(time.perf_counter() - row_started, 2),
                    "elapsed_seconds": round(time.perf_counter() - started, 1)}
                fitting += editor.fit_seconds
                curve.append(row)
                log.info("sequential %s %4d edits: ES %.3f Loc %.3f Port %.3f (first 10: ES %.3f) %.1f s", name, size,
                         row["edit_success"], row["locality"], row["portability"], row["first10_edit_success"],
                         row["seconds"])
                curve.sort(key=lambda r: r["edits"])
                atomic_write_json(saved, curve)
                on_point(row)
            plot_sequential(curve, Path(out_dir) / "sequential.png")
            last_point_seconds = time.perf_counter() - point_started - fitting
            last_scored = len(scored_edits(range(size), score_sample))
    finally:
        ready.close()  # stops the training workers if the curve ended early
    return curve


def _past(deadline: float | None, ahead: float = 0.0) -> bool:
    return deadline is not None and time.perf_counter() + ahead > deadline


def plot_sequential(curve: list[dict], path: Path):
    """One panel per router: the rates against the number of single-edit experts so far."""
    panels = []
    for name in dict.fromkeys(r["router"] for r in curve):
        rows = [r for r in curve if r["router"] == name]
        x = [r["edits"] for r in rows]
        panels.append((f"sequential single-edit experts, router {name}", [
            (key, x, [100 * (r[key] or 0) for r in rows], style)
            for key, style in (("edit_success", "o-"), ("locality", "s-"), ("portability", "^-"),
                               ("edit_success_em", "o--"), ("portability_em", "^--"))]))
    plot_curves(panels, path, xlabel="edits so far (one expert each)", ylabel="%", ylim=(0, 105), dpi=110)


def routing_rates(model, tokenizer, records: Sequence[EditRecord], negatives: Sequence[str],
                  held_out: Sequence[str], routers: Sequence[str] = ("embedding", "scope"), margin: float = 0.5,
                  router_kwargs: dict | None = None) -> dict:
    """Share of prompts each router sends to an expert (and to the right one), one placeholder expert per record
    (z neutral: routing needs no trained expert). Keys and thresholds come from the edit prompts and `negatives`
    (other records only); the records' locality / portability prompts are only scored."""
    tokenizer.padding_side = "left"
    svf = apply_svf(model, progress=False) if not hasattr(model, "svf_layers") else model
    # calibrate_own_router's keys and threshold per record, with the negatives encoded once for all records
    negative_states = F.normalize(last_states(svf, tokenizer, list(negatives)), dim=-1)
    keys = F.normalize(last_states(svf, tokenizer, [r.prompt for r in records]), dim=-1)
    experts = []
    for i, record in enumerate(records):
        closest = (negative_states @ keys[i]).max().item()
        router = OwnRouter(keys=keys[i:i + 1], threshold=threshold_above(closest, margin))
        expert = Expert.from_model(svf, router=router, info=ExpertInfo(name=record.subject))
        annotate_expert(expert, [record])
        experts.append(expert)
    probes: dict[str, list[tuple[str, int | None]]] = {"edit": [(r.prompt, i) for i, r in enumerate(records)],
                                                         "held-out other facts": [(p, None) for p in held_out]}
    for i, record in enumerate(records):
        for kind, items in record.locality.items():
            probes.setdefault(f"locality/{kind}", []).extend((p.prompt, None) for p in items if p.prompt)
        for kind, items in record.portability.items():
            probes.setdefault(f"portability/{kind}", []).extend((p.prompt, i) for p in items if p.prompt)
    out = {}
    for name in routers:
        started = time.perf_counter()
        adaptive = AdaptiveModel(svf, experts, get_router(name, **(router_kwargs or {}).get(name, {})), tokenizer,
                                 negatives=list(negatives))
        rates = {}
        for kind, items in probes.items():
            weights = torch.cat([adaptive.router.weights(b) for b in encode(adaptive, tokenizer,
                                                                            [p for p, _ in items], 32)])
            choice = weights.argmax(-1)
            routed = choice < len(experts)
            right = [bool(r) and (want is None or c == want) for r, c, (_, want) in
                     zip(routed.tolist(), choice.tolist(), items)]
            rates[kind] = {"n": len(items), "routed": routed.float().mean().item(),
                           "to_right_expert": sum(right) / len(items)}
        rates["threshold"] = getattr(adaptive.router, "threshold", None)
        rates["seconds"] = time.perf_counter() - started
        out[name] = rates
    svf.unload()
    return out


__all__ = ["ROW_ROUTERS", "composition_table", "cross_two_hop", "oracle_assignments", "plot_sequential",
           "routing_rates", "run_composition", "run_sequential", "sequential_sizes", "split_records",
           "write_composition"]
