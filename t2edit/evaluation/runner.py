"""Score an editor on records: one code path for every method (SVF, LoRA, FT-M, IKE, prompt, none).

Protocol. Pre-edit references (argmax answer tokens and greedy answers of the unedited model on every locality
probe) are computed once per model and reused by every later call with the same model and probes. Then
- mode="batch": `editor.edit(model, tokenizer, records)` once, score every record, `restore()`;
- mode="single": for each record, edit with [record], score that record, restore (EasyEdit's protocol);
- mode="sequential": edit chunk after chunk (`chunk_size` records per call) without restoring in between, as a
  deployed model is corrected one edit after the other; then score every record on the model that holds them all
  and restore last-first. Only editors with `sequential = True` take it.
Every scored input is `edited.context(prompt) + prompt` run on `edited.model`. After each restore the base model's
logits on the edit prompt are compared with those from before the edit, so a broken `restore()` cannot leak one
method's edit into the next method's numbers.

Aggregation is the EasyEdit KnowEdit runner's: per record, the mean over kinds of the mean over that kind's
probes; then the mean over the records that have the metric at all.

Split across processes (`procs`, under `accelerate launch --num_processes N`): process p scores records p, p + N,
... (in mode single it also edits only those); in modes batch and sequential every process makes the same edit of
all records. Each edit call starts from the same seeded random state, whatever ran before it, so every process
makes the edit one process would. The scored probes are gathered and aggregated as above, so the table equals the
one-process table. Fluency in modes batch and sequential samples one seeded stream over every record's prompt,
which a split would change: the main process samples it alone.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from t2edit.batching import check_fits_context
from t2edit.data.records import EditRecord
from t2edit.distributed import Processes, gather, share
from t2edit.editors.base import EditedModel, Editor
from t2edit.evaluation import metrics as M
from t2edit.text import answer_matches

AGGREGATION = ("EasyEdit KnowEdit runner: per record, mean over kinds of the mean over that kind's prompts; "
               "then mean over the records that have the metric")
FLUENCY_NOTE = ("EasyEdit scale: mean over records of the (2/3 x 2-gram, 4/3 x 3-gram) entropy in bits of a "
                "top-5 sample, x100")


class EditorRestoreError(ValueError):
    """An editor's restore() left the base model changed."""


@dataclass
class MethodResult:
    """One method's scores. Rates are fractions in [0, 1] (None where no record had the metric); fluency is on
    EasyEdit's scale (`FLUENCY_NOTE`). `seconds`: editing + scoring wall time (the shared pre-edit references are
    in `extra["pre_edit_seconds"]`, editing alone in `extra["edit_seconds"]`)."""

    method: str
    edit_success: float | None
    locality: float | None
    portability: float | None
    fluency: float | None
    edit_success_em: float | None
    locality_em: float | None
    portability_em: float | None
    portability_by_kind: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    n_records: int = 0
    seconds: float = 0.0
    mode: str = "batch"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _no_nan(asdict(self))


def _no_nan(value):
    """JSON has no NaN: missing numbers become None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- probes

@dataclass(frozen=True)
class _Job:
    record: int  # position in the records list
    family: str  # "edit_success" | "generalization" | "locality" | "portability"
    kind: str
    prompt: str
    answers: tuple[str, ...]


def _collect_jobs(records: Sequence[EditRecord]) -> tuple[list[list[_Job]], int]:
    """Every probe of every record, minus empty ones (KnowEdit has `""` and `[[]]`), which are counted."""
    jobs: list[list[_Job]] = []
    skipped = 0
    for r, record in enumerate(records):
        families = [("edit_success", "edit", [record.edit_probe]), ("generalization", "rephrase", record.rephrase)]
        families += [("locality", kind, probes) for kind, probes in record.locality.items()]
        families += [("portability", kind, probes) for kind, probes in record.portability.items()]
        mine = []
        for family, kind, probes in families:
            for probe in probes:
                answers = tuple(a for a in probe.answers if a and a.strip())
                if not probe.prompt.strip() or not answers:
                    skipped += 1
                    continue
                mine.append(_Job(r, family, kind.lower(), probe.prompt, answers))
        jobs.append(mine)
    return jobs, skipped


# ---------------------------------------------------------------------------------------------- pre-edit cache

_FINGERPRINT_TEXT = "The quick brown fox jumps over the lazy dog"


@dataclass
class PreEditReferences:
    tokenizer_id: int
    fingerprint: torch.Tensor
    argmax: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    greedy: dict[tuple[str, int], str] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The answers, for a file (a stream that is run again reads them back instead of recomputing them)."""
        return {"argmax": [[p, a, ids] for (p, a), ids in self.argmax.items()],
                "greedy": [[p, budget, text] for (p, budget), text in self.greedy.items()]}

    def add_json(self, raw: dict) -> "PreEditReferences":
        """Answers saved by `to_json` (for the same unedited model: the caller checks that)."""
        self.argmax.update(((p, a), list(ids)) for p, a, ids in raw["argmax"])
        self.greedy.update(((p, int(budget)), text) for p, budget, text in raw["greedy"])
        return self


# Keyed by the model object; each entry is also checked against the model's current logits, so a model trained
# further between calls never reuses stale references (EasyEdit reused its pre-edit file if the count matched).
_PRE_EDIT: "weakref.WeakKeyDictionary[torch.nn.Module, PreEditReferences]" = weakref.WeakKeyDictionary()


def _prompt_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = torch.tensor([M._encode(tokenizer, prompt)], device=M._device(model))
    with torch.inference_mode(), M.eval_mode(model):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out if isinstance(out, torch.Tensor) else out.logits).float().cpu()


def _same_logits(after: torch.Tensor, before: torch.Tensor, tolerance: float) -> tuple[bool, float]:
    diff = (after - before).abs().max().item()
    return diff <= tolerance * max(1.0, before.abs().max().item()), diff


def _pre_edit_references(model, tokenizer, jobs: list[_Job], batch_size: int, progress: bool) -> PreEditReferences:
    fingerprint = _prompt_logits(model, tokenizer, _FINGERPRINT_TEXT)
    cache = _PRE_EDIT.get(model)
    if (cache is None or cache.tokenizer_id != id(tokenizer) or cache.fingerprint.shape != fingerprint.shape
            or not _same_logits(fingerprint, cache.fingerprint, 1e-5)[0]):
        cache = PreEditReferences(id(tokenizer), fingerprint)
        _PRE_EDIT[model] = cache
    todo = [key for key in dict.fromkeys((j.prompt, j.answers[0]) for j in jobs) if key not in cache.argmax]
    if todo:
        ids = M.answer_argmax_tokens(model, tokenizer, [p for p, _ in todo], [a for _, a in todo],
                                     batch_size=batch_size, progress=progress)
        cache.argmax.update(zip(todo, ids))
    keyed = {(j.prompt, M.answer_token_budget(tokenizer, j.answers)) for j in jobs}
    todo_greedy = sorted(k for k in keyed if k not in cache.greedy)
    if todo_greedy:
        texts = M.greedy_completions(model, tokenizer, [p for p, _ in todo_greedy], [b for _, b in todo_greedy],
                                     batch_size=batch_size, progress=progress)
        cache.greedy.update(zip(todo_greedy, texts))
    return cache


def pre_edit_references(model, tokenizer, records: Sequence[EditRecord], batch_size: int = M.DEFAULT_BATCH_SIZE,
                        progress: bool = False, known: dict | None = None) -> PreEditReferences:
    """The unedited model's answers to every locality probe of `records` (for `evaluate_editor(references=...)`).
    `known`: answers of this same model saved earlier (`PreEditReferences.to_json`); only the others are computed."""
    if known is not None:
        _PRE_EDIT[model] = PreEditReferences(id(tokenizer), _prompt_logits(model, tokenizer, _FINGERPRINT_TEXT)) \
            .add_json(known)
    jobs, _ = _collect_jobs(list(records))
    return _pre_edit_references(model, tokenizer, [j for mine in jobs for j in mine if j.family == "locality"],
                                batch_size, progress)


# ---------------------------------------------------------------------------------------------- scoring

def _score_jobs(edited: EditedModel, tokenizer, jobs: list[_Job], refs: PreEditReferences, batch_size: int,
                progress: bool) -> list[tuple[_Job, float, float]]:
    """(job, EasyEdit score, strict score) for each job, all families in shared batches."""
    contexts = [edited.context(j.prompt) for j in jobs]
    prompts = [j.prompt for j in jobs]
    pairs = M.teacher_forced_predictions(edited.model, tokenizer, prompts, [j.answers[0] for j in jobs], contexts,
                                         batch_size, progress)
    budgets = [M.answer_token_budget(tokenizer, j.answers) for j in jobs]
    said = M.greedy_completions(edited.model, tokenizer, [c + p for c, p in zip(contexts, prompts)], budgets,
                                batch_size, progress)
    scored = []
    for job, (preds, gold), completion, budget in zip(jobs, pairs, said, budgets):
        if job.family == "locality":
            token_score = M.argmax_agreement(preds, refs.argmax[(job.prompt, job.answers[0])])
            strict = M.same_answer(completion, refs.greedy[(job.prompt, budget)])
        else:
            token_score = M.token_accuracy(preds, gold)
            strict = float(answer_matches(completion, list(job.answers)))
        scored.append((job, token_score, strict))
    return scored


def _knowedit_mean(per_record: list[dict[str, list[float]]]) -> float | None:
    """Per record: mean over kinds of the mean over that kind's values (NaNs dropped); then mean over records."""
    record_means = []
    for kinds in per_record:
        kind_means = [sum(v) / len(v) for v in ([x for x in vals if not math.isnan(x)] for vals in kinds.values()) if v]
        if kind_means:
            record_means.append(sum(kind_means) / len(kind_means))
    return sum(record_means) / len(record_means) if record_means else None


def _tables(scored: list[tuple[_Job, float, float]], n_records: int) -> dict[str, list[dict[str, list[float]]]]:
    """metric -> per record -> kind -> values."""
    tables: dict[str, list[dict[str, list[float]]]] = {}
    for job, token_score, strict in scored:
        for metric, value in ((job.family, token_score), (job.family + "_em", strict)):
            rows = tables.setdefault(metric, [{} for _ in range(n_records)])
            rows[job.record].setdefault(job.kind, []).append(value)
    return tables


def _by_kind(tables, family: str) -> dict[str, dict[str, float | int | None]]:
    kinds = sorted({kind for row in tables.get(family, []) for kind in row})
    out = {}
    for kind in kinds:
        token = [{kind: row[kind]} for row in tables[family] if kind in row]
        strict = [{kind: row[kind]} for row in tables[family + "_em"] if kind in row]
        out[kind] = {family: _knowedit_mean(token), family + "_em": _knowedit_mean(strict), "n_records": len(token)}
    return out


# ---------------------------------------------------------------------------------------------- the runner

MODES = ("batch", "single", "sequential")


def _edit_in_sequence(editor: Editor, model, tokenizer, records: list[EditRecord], chunk_size: int) -> EditedModel:
    """Edit chunk after chunk, each call on the model the previous one returned; one restore undoes them all,
    last-first. The scored context is the last call's (a sequential editor's context covers every edit so far)."""
    calls: list[EditedModel] = []
    try:
        current = model
        for start in range(0, len(records), chunk_size):
            edited = editor.edit(current, tokenizer, records[start: start + chunk_size])
            if not isinstance(edited, EditedModel):
                raise M.EvaluationInputError(f"editor {editor.name!r} returned {type(edited).__name__} from edit(); "
                                             "it must return t2edit.editors.EditedModel")
            calls.append(edited)
            current = edited.model
    except BaseException:
        for edited in reversed(calls):
            edited.restore()
        raise

    def restore_all() -> None:
        for edited in reversed(calls):
            edited.restore()

    return EditedModel(model=calls[-1].model, context=calls[-1].context, restore=restore_all)


def evaluate_editor(editor: Editor, model: torch.nn.Module, tokenizer, records: Sequence[EditRecord],
                    mode: str = "batch", batch_size: int = M.DEFAULT_BATCH_SIZE, fluency: bool = True,
                    progress: bool = True, *, fluency_max_new_tokens: int = 100, seed: int = 0,
                    restore_tolerance: float = 1e-3, chunk_size: int = 1,
                    procs: Processes | None = None, references: PreEditReferences | None = None) -> MethodResult:
    """Edit `model` with `editor` (all records at once, one at a time, or in sequence), score every record,
    restore. `procs` (`t2edit.distributed.processes()` under a launch): split the records across the launched
    processes, each of which must call this with the same arguments; every process gets the whole result.
    `references`: the unedited model's answers to the locality probes, from `pre_edit_references` (a stream scores a
    model that already holds earlier edits; its locality is still measured against the unedited model's)."""
    procs = procs or Processes()
    if mode not in MODES:
        raise M.EvaluationInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    records = list(records)
    if not records:
        raise M.EvaluationInputError("evaluate_editor got no records; load some with t2edit.data first")
    name = getattr(editor, "name", type(editor).__name__)
    if mode == "sequential" and not getattr(editor, "sequential", False):
        raise M.EvaluationInputError(f"method {name!r} does not edit sequentially (its edits replace each other); "
                                     "use mode batch or single for it")
    if chunk_size < 1:
        raise M.EvaluationInputError(f"chunk_size must be at least 1 edit per call, got {chunk_size}")
    started = time.perf_counter()
    jobs, skipped = _collect_jobs(records)
    try:  # the scored text plus the strict metrics' greedy budget must fit what the model reads
        check_fits_context(model, tokenizer, [
            (f"record {records[j.record].index if records[j.record].index >= 0 else j.record}'s {j.family} prompt",
             f"{j.prompt} {max(j.answers, key=len)}") for mine in jobs for j in mine], M.STRICT_EXTRA_TOKENS)
    except ValueError as error:
        raise M.EvaluationInputError(str(error)) from None
    scored_here = set(share(range(len(records)), procs))  # the records this process scores
    progress = progress and procs.is_main
    locality_jobs = [j for i in sorted(scored_here) for j in jobs[i] if j.family == "locality"]
    refs = references if references is not None else \
        _pre_edit_references(model, tokenizer, locality_jobs, batch_size, progress and mode != "single")
    pre_edit_seconds = time.perf_counter() - started

    groups = [[i] for i in sorted(scored_here)] if mode == "single" else [list(range(len(records)))]
    inner_progress = progress and mode != "single"
    scored: list[tuple[_Job, float, float]] = []
    fluency_bits: list[tuple[int, list[float]]] = []  # (first record of the edit call, its records' bits)
    # Batch and sequential fluency is one seeded stream over every record's prompt: sampled whole, by one process.
    fluency_here = fluency and (mode == "single" or procs.is_main)
    edit_seconds = 0.0
    device = M._device(model)
    cuda = [device] if device.type == "cuda" else []
    for group in tqdm(groups, desc=f"{name}: edit, score, restore", disable=not progress or mode != "single"):
        edit_records = [records[i] for i in group]
        guard_prompt = edit_records[0].prompt
        before = _prompt_logits(model, tokenizer, guard_prompt)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=cuda):  # each edit call from the same random state, in any process
            torch.manual_seed(seed * 1_000_003 + group[0])
            edited = (_edit_in_sequence(editor, model, tokenizer, edit_records, chunk_size) if mode == "sequential"
                      else editor.edit(model, tokenizer, edit_records))
        edit_seconds += time.perf_counter() - t0
        if not isinstance(edited, EditedModel):
            raise M.EvaluationInputError(f"editor {name!r} returned {type(edited).__name__} from edit(); "
                                         "it must return t2edit.editors.EditedModel")
        try:
            scored += _score_jobs(edited, tokenizer, [j for i in group if i in scored_here for j in jobs[i]], refs,
                                  batch_size, inner_progress)
            if fluency_here:
                prompts = [r.prompt for r in edit_records]
                fluency_bits.append((group[0], M.fluency_scores(
                    edited.model, tokenizer, prompts, [edited.context(p) for p in prompts], fluency_max_new_tokens,
                    seed=seed, batch_size=batch_size, progress=inner_progress)))
        finally:
            edited.restore()
        unchanged, diff = _same_logits(_prompt_logits(model, tokenizer, guard_prompt), before, restore_tolerance)
        if not unchanged:
            raise EditorRestoreError(
                f"editor {name!r} ({type(editor).__name__}): after restore() the base model's logits on "
                f"{guard_prompt!r} differ from before the edit by up to {diff:.3g}, so the edit was not undone; "
                "fix its EditedModel.restore so it puts back every weight, hook and adapter it changed")

    if procs.launched:  # every process's probes and fluency, in record order
        shares = gather((scored, fluency_bits), procs)
        scored = sorted((row for part, _ in shares for row in part), key=lambda row: row[0].record)
        fluency_bits = sorted(call for _, part in shares for call in part)
    fluency_bits = [bits for _, call in fluency_bits for bits in call]
    tables = _tables(scored, len(records))
    n_unscorable = sum(1 for _, token_score, _ in scored if math.isnan(token_score))
    extra: dict = {
        "aggregation": AGGREGATION,
        "fluency_scale": FLUENCY_NOTE,
        "locality_by_kind": _by_kind(tables, "locality"),
        "n_probes_scored": len(scored) - n_unscorable,
        "n_probes_skipped": skipped + n_unscorable,
        "edit_seconds": edit_seconds,
        "pre_edit_seconds": pre_edit_seconds,
        **getattr(editor, "report", {}),  # what an editor says about its own edit (e.g. SVF: expert loaded)
    }
    if "generalization" in tables:
        extra["generalization"] = _knowedit_mean(tables["generalization"])
        extra["generalization_em"] = _knowedit_mean(tables["generalization_em"])

    def mean_of(metric: str) -> float | None:
        return _knowedit_mean(tables[metric]) if metric in tables else None

    return MethodResult(
        method=name,
        edit_success=mean_of("edit_success"),
        locality=mean_of("locality"),
        portability=mean_of("portability"),
        fluency=M.FLUENCY_SCALE * sum(fluency_bits) / len(fluency_bits) if fluency_bits else None,
        edit_success_em=mean_of("edit_success_em"),
        locality_em=mean_of("locality_em"),
        portability_em=mean_of("portability_em"),
        portability_by_kind=_by_kind(tables, "portability"),
        n_records=len(records),
        seconds=time.perf_counter() - started - pre_edit_seconds,
        mode=mode,
        extra=extra,
    )
