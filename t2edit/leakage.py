"""The no-leakage guard: the one place that decides what an editor may learn from besides the edits themselves.

An editor may see the edit (prompt, target) and anything from a training pool (other records, a fact world's other
facts). It never sees what the evaluation scores for the edited records: their edit, rephrase, locality and
portability prompts. `learning_pool` builds, from the edits and a training pool, everything an editor learns from —
SVF neighbour prompts, same-subject anchors, IKE demonstrations, and the router's calibration negatives (the
neighbours and anchors) — and drops every prompt that is, after the metrics' answer normalisation (case,
punctuation, articles, whitespace), one the evaluation scores for the edited records. SVFEditor, `run_training` and
IKEEditor all call it; none filters on its own.

`check_expert_may_score` is the same rule at evaluation time, for an expert trained elsewhere: it refuses records that
are not the expert's edits, and scored prompts the expert trained or calibrated on (the expert stores hashes of
them, `expert_prompt_info`).
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence
from dataclasses import dataclass, field

from t2edit.data.records import EditRecord
from t2edit.text import normalize_answer


class LeakageError(ValueError):
    """An evaluation would score prompts an editor learned from."""


def prompt_key(prompt: str) -> str:
    """The form in which two prompts count as the same question (the metrics' normalisation of answers)."""
    return normalize_answer(prompt)


def scored_prompt_keys(edits: list[EditRecord]) -> set[str]:
    """Every prompt the evaluation scores for these edits — edit, rephrase, locality, portability — as keys."""
    keys = set()
    for record in edits:
        keys.add(prompt_key(record.prompt))
        keys.update(prompt_key(p) for p in record.scored_prompts())
    return keys


@dataclass
class LearningPool:
    """What an editor may learn from for one set of edits; nothing in it is scored for those edits."""

    neighbour_prompts: list[str] = field(default_factory=list)  # other facts: locality training (SVF)
    subject_prompts: list[str] = field(default_factory=list)  # same-subject anchors: other relations of edited subjects
    demonstrations: list[tuple[str, str]] = field(default_factory=list)  # (prompt, target) of other records (IKE)

    @property
    def router_negatives(self) -> list[str]:
        """The prompts a router is calibrated to leave alone: the neighbours and the anchors."""
        return self.neighbour_prompts + self.subject_prompts


def learning_pool(edits: list[EditRecord], others: list[EditRecord] = (), extra_prompts=(),
                  anchors_per_edit: int = 8) -> LearningPool:
    """Everything an editor may learn from: built from `others` (records not edited) and `extra_prompts` (e.g. a fact
    world's facts, which do hold the edited records' locality and alias prompts), minus every prompt the
    evaluation scores for `edits`. A record of `others` whose own prompt is scored for the edits is dropped whole.
    `anchors_per_edit=0` skips the same-subject anchors (IKE needs only the demonstrations)."""
    scored = scored_prompt_keys(edits)
    others = [r for r in others if prompt_key(r.prompt) not in scored]
    candidates = list(extra_prompts)
    for record in others:
        candidates.append(record.prompt)
        candidates += [p.prompt for probes in record.locality.values() for p in probes]
    return LearningPool(neighbour_prompts=_unscored(candidates, scored),
                        subject_prompts=_subject_anchors(edits, others, scored, anchors_per_edit)
                        if anchors_per_edit > 0 else [],
                        demonstrations=[(r.prompt, r.target) for r in others if r.target_new and r.prompt.strip()])


def _unscored(prompts, scored: set[str], limit: int | None = None) -> list[str]:
    """`prompts` in order, minus empty ones, scored ones and repeats (as keys), at most `limit`."""
    seen, kept = set(), []
    for prompt in prompts:
        key = prompt_key(prompt)
        if key and key not in scored and key not in seen:
            seen.add(key)
            kept.append(prompt)
            if limit is not None and len(kept) == limit:
                break
    return kept


SUBJECT_SLOT = "\x00subject\x00"  # a placeholder no prompt contains (prompts may hold literal braces)


def relation_templates(records: list[EditRecord], with_locality: bool = True) -> dict[str, set[str]]:
    """subject → the relation templates ("The spouse of {} is") asked about it in these records' edit prompts (and
    locality prompts). Only prompts that contain the subject verbatim give a template."""
    asked: dict[str, set[str]] = {}
    for record in records:
        if not record.subject:
            continue
        prompts = [record.prompt] + ([p.prompt for probes in record.locality.values() for p in probes]
                                     if with_locality else [])
        for prompt in prompts:
            if record.subject in prompt:
                asked.setdefault(record.subject, set()).add(prompt.replace(record.subject, SUBJECT_SLOT, 1))
    return asked


def _subject_anchors(edits: list[EditRecord], others: list[EditRecord], scored: set[str], per_edit: int) -> list[str]:
    """Same-subject anchors: each edited subject asked about relations other than the edited one.

    An edit should change (subject, relation) and nothing else the model says about the subject (ROME anchors the
    subject's "essence" the same way). The relations come from the *other* records: first those asked about other
    subjects that were also asked the edited relation (people get spouse / occupation / employer, rivers get
    mouth / country ...), then those asked together with these, then the most frequent ones (the other edits'
    relations included)."""
    frequency: dict[str, int] = {}
    co_occurring: dict[str, dict[str, int]] = {}
    # The edited relations themselves are fair questions about the *other* edited subjects.
    for templates in relation_templates(edits, with_locality=False).values():
        for template in templates:
            frequency[template] = frequency.get(template, 0) + 1
    for templates in relation_templates(others).values():
        for template in templates:
            frequency[template] = frequency.get(template, 0) + 1
            counts = co_occurring.setdefault(template, {})
            for other in templates - {template}:
                counts[other] = counts.get(other, 0) + 1
    rankings: dict[str, list[str]] = {}  # edited relation → candidate relations, best first (shared by its edits)

    def ranked(edited: str) -> list[str]:
        if edited not in rankings:
            together = co_occurring.get(edited, {})
            two_hops = {t: sum(co_occurring[c].get(t, 0) for c in together) for t in frequency}
            rankings[edited] = sorted(frequency, key=lambda t: (-together.get(t, 0), -two_hops[t], -frequency[t], t))
        return rankings[edited]

    taken: set[str] = set()
    pool: list[str] = []
    for record in edits:
        if not record.subject or record.subject not in record.prompt:
            continue
        edited = record.prompt.replace(record.subject, SUBJECT_SLOT, 1)
        prompts = [t.replace(SUBJECT_SLOT, record.subject, 1) for t in ranked(edited)]
        fresh = _unscored(prompts, scored | taken, per_edit)
        taken.update(prompt_key(p) for p in fresh)
        pool += fresh
    return pool


# ------------------------------------------------------------------------------------ many experts, one edited set

def template_prompts(records: Sequence[EditRecord], blocked: set[str], limit: int = 400, seed: int = 0) -> list[str]:
    """Other questions nobody scores: the edit prompts' relation templates asked about every entity the records
    name (subjects, old and new objects), minus the blocked prompts (as `t2edit.leakage.prompt_key`s); a seeded
    sample of `limit`. When every fact of a world is some record's scored prompt (the built-in world with all
    records edited), these are the prompts left for locality training and router calibration."""
    stripped = [EditRecord(subject=r.subject, prompt=r.prompt, target_new=r.target_new) for r in records]
    templates = sorted({t for ts in relation_templates(stripped, with_locality=False).values() for t in ts})
    entities = sorted({r.subject for r in records} | {a for r in records for a in r.target_new + r.ground_truth})
    prompts = sorted(p for p in {t.replace(SUBJECT_SLOT, e, 1) for t in templates for e in entities}
                     if prompt_key(p) not in blocked)
    return random.Random(seed).sample(prompts, min(limit, len(prompts)))


def training_pools(setup, edited: Sequence[EditRecord], chunk: Sequence[EditRecord]) -> tuple[list[str], list[str]]:
    """Neighbour prompts and same-subject anchors for one expert (`t2edit.leakage.learning_pool` for the chunk),
    minus every prompt scored for any edited record."""
    scored = scored_prompt_keys(list(edited))
    # Other edits lend their relation templates (edit prompts only: their scored prompts stay unseen).
    in_chunk = {id(r) for r in chunk}
    stripped = [EditRecord(subject=r.subject, prompt=r.prompt, target_new=r.target_new) for r in edited
                if id(r) not in in_chunk]
    pool = learning_pool(list(chunk), list(setup.other_records) + stripped, setup.extra_neighbour_prompts)
    return ([p for p in pool.neighbour_prompts if prompt_key(p) not in scored],
            [p for p in pool.subject_prompts if prompt_key(p) not in scored])


def router_negatives(setup, edited: Sequence[EditRecord]) -> list[str]:
    """What routers are fitted on besides the experts: other facts and the edited subjects asked about other
    relations (training-side prompts only)."""
    pool, subject = training_pools(setup, edited, edited)
    blocked = scored_prompt_keys(list(edited)) | {prompt_key(p) for p in pool + subject}
    # Template questions only calibrate routers: as training neighbours they drown single edits.
    return pool + subject + template_prompts(list(edited) + list(setup.other_records), blocked)


def negatives_from_edits(edits: list[dict]) -> list[str]:
    """Prompts no expert should take, built from the experts' own edits ({"prompt", "subject", "target"}) when no
    other facts are at hand: each edit's relation asked about the other edits' subjects and objects, and each edited
    subject asked about the other relations (what `scope-split` calibrates on), minus the edits."""
    records = [EditRecord(subject=e["subject"], prompt=e["prompt"], target_new=[e["target"]]) for e in edits
               if e.get("target") and e.get("subject") and e["subject"] in e["prompt"]]
    return template_prompts(records, {prompt_key(e["prompt"]) for e in edits}, limit=800)


# ------------------------------------------------------------------------------------ experts trained elsewhere

def prompt_hashes(prompts) -> list[str]:
    """Sorted SHA-256 digests (16 hex digits) of the prompts' keys: enough to recognise a prompt, not to read it."""
    return sorted({hashlib.sha256(prompt_key(p).encode("utf-8")).hexdigest()[:16] for p in prompts})


def expert_prompt_info(edit_prompts: list[str], learned_prompts: list[str]) -> dict:
    """What an expert records about its training prompts (merged into Expert.info): hashes of its edit prompts and
    of every other prompt it trained on or calibrated its router against."""
    return {"edit_prompt_hashes": prompt_hashes(edit_prompts), "learned_prompt_hashes": prompt_hashes(learned_prompts)}


def check_expert_may_score(info, edits: list[EditRecord], expert_dir: str = "the expert") -> None:
    """Refuse (LeakageError) to score `edits` with an expert that was not trained for them, or that trained or
    calibrated on a prompt the evaluation scores for them. `info`: the expert's ExpertInfo (or its dict)."""
    info = info.prompt_hashes() if hasattr(info, "prompt_hashes") else dict(info)
    if info.get("edit_prompt_hashes") is None or info.get("learned_prompt_hashes") is None:
        raise LeakageError(f"{expert_dir} does not record which prompts it was trained on (an older or hand-made "
                           f"expert), so scoring it could count training prompts as held out; retrain it with this "
                           f"t2edit")
    own_edits = set(info["edit_prompt_hashes"])
    foreign = [r for r in edits if prompt_hashes([r.prompt])[0] not in own_edits]
    if foreign:
        raise LeakageError(f"{len(foreign)} of the {len(edits)} records to score are not edits of {expert_dir} "
                           f"(first: {foreign[0].prompt!r}); score only its {len(own_edits)} edits (the --start / "
                           f"--n it was trained with)")
    learned = set(info["learned_prompt_hashes"])
    seen = sorted(p for r in edits for p in r.scored_prompts() if prompt_hashes([p])[0] in learned)
    if seen:
        raise LeakageError(f"{len(seen)} prompts this evaluation scores were among the training or router-calibration "
                           f"prompts of {expert_dir} (first: {seen[0]!r}); retrain the expert on these records with "
                           f"this t2edit, which keeps them out")
