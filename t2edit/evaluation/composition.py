"""Compositional and sequential editing with many experts (`t2edit eval --composition K` / `--sequential`).

Composition: N edits split into K experts trained independently; each (K, router) row is scored by the one
evaluation path (`evaluate_editor`) with an `AdaptiveModel` as the edited model, next to one expert holding all
N edits. Two-hop questions whose two facts live in different experts are scored as their own column.

Sequential: single-edit experts are added one at a time (expert n+1 is trained alone, in its own directory;
experts 1..n are never retrained or rewritten) and all edits so far are scored after each addition.

Training pools follow the no-leakage rule for the whole edited set: no expert trains on, and no router is fitted
on, any prompt the evaluation scores for ANY edited record (locality, portability, rephrase).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from t2edit.data.records import EditRecord, Probe
from t2edit.editing import EditedModel, Editor
from t2edit.experts import CONFIG_NAME, Expert

ROW_ROUTERS = ("oracle", "embedding", "scope", "scope-split", "hybrid", "classifier", "prompt", "cem", "uniform")


def split_records(records: Sequence[EditRecord], k: int) -> list[list[EditRecord]]:
    """k contiguous, near-equal chunks (k = len(records): one edit per expert)."""
    if not 1 <= k <= len(records):
        raise ValueError(f"--composition K={k} must lie in [1, number of edits = {len(records)}]")
    bounds = [round(i * len(records) / k) for i in range(k + 1)]
    return [list(records[a:b]) for a, b in zip(bounds, bounds[1:])]


def template_prompts(records: Sequence[EditRecord], blocked: set[str], limit: int = 400, seed: int = 0) -> list[str]:
    """Other questions nobody scores: the edit prompts' relation templates asked about every entity the records
    name (subjects, old and new objects), minus the blocked prompts (as `t2edit.leakage.prompt_key`s); a seeded
    sample of `limit`. When every fact of a world is some record's scored prompt (the built-in world with all
    records edited), these are the prompts left for locality training and router calibration."""
    import random

    from t2edit.leakage import SUBJECT_SLOT, prompt_key, relation_templates

    stripped = [EditRecord(subject=r.subject, prompt=r.prompt, target_new=r.target_new) for r in records]
    templates = sorted({t for ts in relation_templates(stripped, with_locality=False).values() for t in ts})
    entities = sorted({r.subject for r in records} | {a for r in records for a in r.target_new + r.ground_truth})
    prompts = sorted(p for p in {t.replace(SUBJECT_SLOT, e, 1) for t in templates for e in entities}
                     if prompt_key(p) not in blocked)
    return random.Random(seed).sample(prompts, min(limit, len(prompts)))


def training_pools(setup, edited: Sequence[EditRecord], chunk: Sequence[EditRecord]) -> tuple[list[str], list[str]]:
    """Neighbour prompts and same-subject anchors for one expert (`t2edit.leakage.learning_pool` for the chunk),
    minus every prompt scored for any edited record."""
    from t2edit.leakage import learning_pool, prompt_key, scored_prompt_keys

    scored = scored_prompt_keys(list(edited))
    # Other edits lend their relation templates (edit prompts only: their scored prompts stay unseen).
    in_chunk = {id(r) for r in chunk}
    stripped = [EditRecord(subject=r.subject, prompt=r.prompt, target_new=r.target_new) for r in edited
                if id(r) not in in_chunk]
    pool = learning_pool(list(chunk), list(setup.other_records) + stripped, setup.extra_neighbour_prompts)
    return ([p for p in pool.neighbour_prompts if prompt_key(p) not in scored],
            [p for p in pool.subject_prompts if prompt_key(p) not in scored])


def negatives_for(setup, edited: Sequence[EditRecord]) -> list[str]:
    """What routers are fitted on besides the experts: other facts and the edited subjects asked about other
    relations (training-side prompts only)."""
    from t2edit.leakage import prompt_key, scored_prompt_keys

    pool, subject = training_pools(setup, edited, edited)
    blocked = scored_prompt_keys(list(edited)) | {prompt_key(p) for p in pool + subject}
    # Template questions only calibrate routers: as training neighbours they drowned single edits (measured).
    return pool + subject + template_prompts(list(edited) + list(setup.other_records), blocked)


def steps_for(n_edits: int, base_steps: int) -> int:
    """Fewer steps for small experts: measured on the built-in world (README), a single edit is learned in ~30."""
    return max(30, min(base_steps, 30 + 2 * n_edits))


def _expert_run_dir(out_dir, k: int) -> Path:
    return Path(out_dir) / f"expert-{k:04d}"


def train_one_expert(setup, chunk: Sequence[EditRecord], run_dir: str | Path, edited: Sequence[EditRecord],
                     base_config=None) -> Path:
    """Train the expert of one chunk into run_dir/expert, unless it is already there (adding an expert never
    retrains or rewrites another). Returns the expert directory."""
    from t2edit.routers import annotate_expert
    from t2edit.svf import apply_svf
    from t2edit.training import SVFTrainer, TrainConfig, apply_preset

    # The settings of the model being edited, as `t2edit eval` uses them: the world preset for fact worlds, the
    # llm preset for a pretrained model.
    base = base_config or apply_preset(TrainConfig(
        model=None if setup.world_report is not None else setup.model_name))
    expert_dir = Path(run_dir) / "expert"
    if (expert_dir / CONFIG_NAME).exists():
        return expert_dir
    config = replace(base, output_dir=str(run_dir), save_every=0, eval_every=0, resume=False, progress=False,
                     steps=steps_for(len(chunk), base.steps), n_edits=len(chunk),
                     # Neighbours in proportion to the edits: 64 neighbour rows against one edit row drown
                     # the edit (measured: a single edit was not learned at all in 100 steps).
                     neighbours_per_step=min(base.neighbours_per_step, 4 * len(chunk)))
    pool, subject = training_pools(setup, edited, chunk)
    svf_model = apply_svf(setup.model, config.svf_config(), progress=False)
    try:
        expert = SVFTrainer(svf_model, setup.tokenizer, list(chunk), pool, config, subject_prompts=subject).train()
        annotate_expert(expert, chunk)
        expert.save_pretrained(expert_dir)
    finally:
        svf_model.unload()
    return expert_dir


def trained_experts(setup, chunks: list[list[EditRecord]], out_dir: str | Path, edited: Sequence[EditRecord],
                    base_config=None, progress: bool = True, workers: int = 1):
    """Train one expert per chunk (in out_dir/expert-NNNN/expert, skipping those already on disk) and yield k as
    soon as experts 0..k are all on disk, so a caller can score the first k while later ones train.

    `workers` > 1 trains in that many CPU processes of one thread each (`setup.spec` says how each reloads the
    setup): a single-edit expert of a fact world is a few hundred tiny, latency-bound steps that one core runs
    about as fast as a GPU. Each expert is trained alone either way, so the result does not depend on `workers`."""
    from tqdm.auto import tqdm

    todo = [k for k in range(len(chunks)) if not (_expert_run_dir(out_dir, k) / "expert" / CONFIG_NAME).exists()]
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc=f"{len(chunks)} experts",
               disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for k, chunk in enumerate(chunks):
            if k in todo:
                train_one_expert(setup, chunk, _expert_run_dir(out_dir, k), edited, base_config)
                bar.update(1)
            yield k
        bar.close()
        return
    if getattr(setup, "spec", None) is None:
        raise ValueError("training experts in worker processes needs a setup from t2edit.jobs.load_setup (its "
                         "spec says how each worker reloads it); pass workers=1")
    import multiprocessing

    from t2edit.svf import apply_svf
    from t2edit.training import TrainConfig

    # Decompose the target matrices once, here, into the shared SVD cache: every process then reads the same
    # factors (each expert's z scales these singular vectors, so all processes must agree on them).
    svf_config = (base_config or TrainConfig()).svf_config()
    if svf_config.svd_cache_dir == "":
        raise ValueError("training experts in worker processes needs the SVD cache (svd_cache_dir not ''), so that "
                         "every process uses the same singular vectors; pass workers=1")
    apply_svf(setup.model, svf_config, progress=False).unload()
    position = {id(r): i for i, r in enumerate(setup.edits)}
    tasks = [(k, [position[id(r)] for r in chunks[k]]) for k in todo]
    done = set(range(len(chunks))) - set(todo)
    next_k = 0
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
    with context.Pool(min(workers, len(todo)), initializer=_worker_start,
                      initargs=(setup.spec, str(out_dir), [position[id(r)] for r in edited], base_config)) as pool:
        for k, _seconds in pool.imap(_worker_train, tasks):
            done.add(k)
            bar.update(1)
            while next_k in done:
                yield next_k
                next_k += 1
    bar.close()
    yield from range(next_k, len(chunks))


_WORKER: dict = {}


def _worker_start(spec: dict, out_dir: str, edited: list[int], base_config):
    torch.set_num_threads(1)
    from t2edit.jobs import load_setup

    setup = load_setup(**{**spec, "progress": False})
    _WORKER.update(setup=setup, out_dir=out_dir, edited=[setup.edits[i] for i in edited], base=base_config)


def _worker_train(task: tuple[int, list[int]]) -> tuple[int, float]:
    k, positions = task
    started = time.perf_counter()
    setup = _WORKER["setup"]
    train_one_expert(setup, [setup.edits[i] for i in positions], _expert_run_dir(_WORKER["out_dir"], k),
                     _WORKER["edited"], _WORKER["base"])
    return k, time.perf_counter() - started


def train_experts(setup, chunks: list[list[EditRecord]], out_dir: str | Path, edited: Sequence[EditRecord],
                  base_config=None, progress: bool = True, workers: int = 1) -> list[Path]:
    """Train one expert per chunk (see `trained_experts`); returns the expert directories."""
    for _ in trained_experts(setup, chunks, out_dir, edited, base_config, progress, workers):
        pass
    return [_expert_run_dir(out_dir, k) / "expert" for k in range(len(chunks))]


class AdaptiveEditor(Editor):
    """K trained experts behind a router, as an Editor: `edit` loads them over the model and fits the router once
    (on the experts and the negatives; the records it is asked to edit only decide which experts exist)."""

    def __init__(self, expert_dirs: Sequence[str | Path], router_factory: Callable[[], object], name: str,
                 negatives: Sequence[str] = (), mixing: str = "auto", loaded: dict | None = None):
        self.expert_dirs, self.router_factory, self.name = [str(d) for d in expert_dirs], router_factory, name
        self.negatives, self.mixing = list(negatives), mixing
        # Experts already read from disk, by directory, shared between editors (a sequential curve reads the
        # first experts again at every point); nothing here changes an expert once loaded.
        self.loaded = {} if loaded is None else loaded
        self.router = None
        self.fit_seconds = 0.0

    def edit(self, model, tokenizer, records):
        from t2edit.adaptation import AdaptiveModel

        for d in self.expert_dirs:
            if d not in self.loaded:
                self.loaded[d] = Expert.from_pretrained(d)
        experts = [self.loaded[d] for d in self.expert_dirs]
        fit = self.router is None
        if fit:
            self.router = self.router_factory()
        started = time.perf_counter()
        adaptive = AdaptiveModel.from_experts(model, experts, self.router, tokenizer, mixing=self.mixing, fit=fit,
                                              negatives=self.negatives)
        if fit:
            self.fit_seconds = time.perf_counter() - started
        elif hasattr(self.router, "model"):
            self.router.model = adaptive
        adaptive.eval()
        return EditedModel(model=adaptive, restore=adaptive.svf_model.unload)


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
    from t2edit.routers import get_router

    if name == "oracle":
        return lambda: get_router("oracle", assignments=oracle_assignments(chunks, [(p, a, b) for _, p, a, b in cross]))
    return lambda: get_router(name)


def _score(editor, setup, records, cross_records, batch_size, progress):
    from t2edit.evaluation import evaluate_editor

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
    plot (composition.md, results.*) cover every K found in out_dir."""
    from t2edit.routers import FixedRouter

    edits = list(setup.edits)
    n = len(edits)
    negatives = negatives_for(setup, edits)
    batch_size = 64 if setup.world_report is not None else 16
    for k in ks:
        k = n if k in (0, -1) or k > n else k
        chunks = split_records(edits, k)
        dirs = train_experts(setup, chunks, Path(out_dir) / f"experts-k{k}", edits, base_config, progress)
        cross = cross_two_hop(chunks)
        if k == 1:
            rows = [("always", lambda: FixedRouter([1.0, 0.0])), ("embedding", _router_factory("embedding", chunks, []))]
        else:
            rows = [(name, _router_factory(name, chunks, cross)) for name in routers if not (name == "prompt" and k > 16)]
        results = []
        for name, factory in rows:
            label = f"K={k} {name}"
            editor = AdaptiveEditor(dirs, factory, label, negatives)
            started = time.perf_counter()
            results.append(_tag(_score(editor, setup, edits, [c for c, *_ in cross], batch_size, progress), k, label))
            print(f"[t2edit] {label}: {time.perf_counter() - started:.1f} s", flush=True)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            Path(out_dir, f"rows-k{k}.json").write_text(json.dumps([r.to_dict() for r in results], indent=1))
    return write_composition(out_dir, title or f"{setup.model_name}: {n} edits composed from K experts")


def write_composition(out_dir: str, title: str = "composition"):
    """Merge every rows-k*.json in out_dir into composition.md and results.{json,md,png}."""
    from t2edit.evaluation import write_results
    from t2edit.evaluation.runner import MethodResult

    results = []
    for path in sorted(Path(out_dir).glob("rows-k*.json"), key=lambda p: int(p.stem[6:])):
        results += [MethodResult(**row) for row in json.loads(path.read_text())]
    write_results(results, out_dir, title=title)
    table = composition_table(results)
    Path(out_dir, "composition.md").write_text(table + "\n")
    print(table)
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
                   experts_dir: str | Path | None = None):
    """Single-edit experts added one at a time; at each size of `sizes` (default `sequential_sizes(n, points)`)
    all edits so far are scored with every router (and the first 10 edits alone, to see whether they keep their
    scores). Experts train while earlier points are scored (`trained_experts`, `workers` CPU processes).

    Each point is appended to out_dir/sequential.json (and the plot redrawn) as soon as it is scored, so a run
    stopped early keeps every finished point. `deadline` (a time.perf_counter() value): no point is started after
    it, nor one that the time of the previous point says would end after it. The experts go to `experts_dir`
    (default out_dir/experts-single)."""
    from t2edit.evaluation import evaluate_editor

    edits = list(setup.edits)
    n = len(edits)
    chunks = split_records(edits, n)
    experts_dir = Path(experts_dir or Path(out_dir) / "experts-single")
    dirs = [str(_expert_run_dir(experts_dir, k) / "expert") for k in range(n)]
    sizes = sorted({s for s in (sizes or sequential_sizes(n, points)) if 1 <= s <= n})
    batch_size = batch_size or (64 if setup.world_report is not None else 16)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    curve: list[dict] = []
    loaded: dict = {}
    started = time.perf_counter()
    last_point_seconds, last_size = 0.0, 0
    ready = trained_experts(setup, chunks, experts_dir, edits, base_config, progress, workers)
    try:
        trained = 0
        for size in sizes:
            while trained < size and not _past(deadline):
                next(ready)
                trained += 1
            expected = last_point_seconds * size / max(1, last_size)  # scoring grows with the edits scored
            if _past(deadline, expected):
                print(f"[t2edit] sequential: deadline; stopping before {size} edits ({trained} experts trained, "
                      f"{len(curve)} rows kept)", flush=True)
                break
            point_started = time.perf_counter()
            so_far = edits[:size]
            negatives = negatives_for(setup, so_far)
            for name in routers:
                row_started = time.perf_counter()
                editor = AdaptiveEditor(dirs[:size], _router_factory(name, chunks[:size], []), f"{name}@{size}",
                                        negatives, loaded=loaded)
                result = evaluate_editor(editor, setup.model, setup.tokenizer, so_far, fluency=False,
                                         progress=False, batch_size=batch_size)
                first = evaluate_editor(editor, setup.model, setup.tokenizer, edits[:min(10, size)], fluency=False,
                                        progress=False, batch_size=batch_size)
                row = {"router": name, "edits": size, **{k: getattr(result, k) for k in (
                    "edit_success", "locality", "portability", "edit_success_em", "locality_em", "portability_em")},
                    "first10_edit_success": first.edit_success, "first10_edit_success_em": first.edit_success_em,
                    "negatives": len(negatives), "router_fit_seconds": round(editor.fit_seconds, 2),
                    "seconds": round(time.perf_counter() - row_started, 2),
                    "elapsed_seconds": round(time.perf_counter() - started, 1)}
                curve.append(row)
                print(f"[t2edit] sequential {name} {size:4d} edits: ES {row['edit_success']:.3f} "
                      f"Loc {row['locality']:.3f} Port {row['portability']:.3f} "
                      f"(first 10: ES {row['first10_edit_success']:.3f}) {row['seconds']:.1f} s", flush=True)
                _write_json(Path(out_dir) / "sequential.json", curve)
            plot_sequential(curve, Path(out_dir) / "sequential.png")
            last_point_seconds, last_size = time.perf_counter() - point_started, size
    finally:
        ready.close()  # stops the training workers if the curve ended early
    return curve


def _past(deadline: float | None, ahead: float = 0.0) -> bool:
    return deadline is not None and time.perf_counter() + ahead > deadline


def _write_json(path: Path, value):
    """Atomic: a run killed while writing leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def plot_sequential(curve: list[dict], path: Path):
    """One panel per router: the rates against the number of single-edit experts so far."""
    from t2edit.evaluation.report import plot_curves

    panels = []
    for name in dict.fromkeys(r["router"] for r in curve):
        rows = [r for r in curve if r["router"] == name]
        x = [r["edits"] for r in rows]
        panels.append((f"sequential single-edit experts, router {name}", [
            (key, x, [100 * (r[key] or 0) for r in rows], style)
            for key, style in (("edit_success", "o-"), ("locality", "s-"), ("portability", "^-"),
                               ("edit_success_em", "o--"), ("portability_em", "^--"))]))
    plot_curves(panels, path, xlabel="edits so far (one expert each)", ylabel="%", ylim=(0, 105), dpi=110)


__all__ = ["AdaptiveEditor", "ROW_ROUTERS", "composition_table", "cross_two_hop", "negatives_for",
           "oracle_assignments", "run_composition", "run_sequential", "sequential_sizes", "split_records",
           "train_experts", "train_one_expert", "trained_experts"]


def routing_rates(model, tokenizer, records: Sequence[EditRecord], negatives: Sequence[str],
                  held_out: Sequence[str], routers: Sequence[str] = ("embedding", "scope"), margin: float = 0.5,
                  router_kwargs: dict | None = None) -> dict:
    """Share of prompts each router sends to an expert (and to the right one), one placeholder expert per record
    (z neutral: routing needs no trained expert). Keys and thresholds come from the edit prompts and `negatives`
    (other records only); the records' locality / portability prompts are only scored."""
    from t2edit.adaptation import AdaptiveModel
    from t2edit.routers import annotate_expert, encode, get_router
    from t2edit.svf import apply_svf

    tokenizer.padding_side = "left"
    svf = apply_svf(model, progress=False) if not hasattr(model, "svf_layers") else model
    import torch.nn.functional as F

    from t2edit.routing import Router, encode_prompts

    # calibrate_router's keys and threshold per record, with the negatives encoded once for all records
    negative_states = F.normalize(encode_prompts(svf, tokenizer, list(negatives)), dim=-1)
    keys = F.normalize(encode_prompts(svf, tokenizer, [r.prompt for r in records]), dim=-1)
    experts = []
    for i, record in enumerate(records):
        closest = (negative_states @ keys[i]).max().item()
        router = Router(keys=keys[i:i + 1], threshold=min(closest + margin * (1 - closest), 1 - 1e-4))
        expert = Expert.from_model(svf, router=router, info={"name": record.subject})
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
