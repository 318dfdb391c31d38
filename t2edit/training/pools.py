"""What the trainer may learn from besides the edits: neighbour prompts of other facts and same-subject anchors.
The no-leakage rule lives here: nothing the evaluation scores for the edited records gets in."""
from __future__ import annotations

from t2edit.data.records import EditRecord


def forbidden_prompts(edits: list[EditRecord]) -> set[str]:
    """What the evaluation scores for these edits besides the edit prompt: never trained on."""
    forbidden = set()
    for record in edits:
        forbidden |= record.scored_prompts()
    return forbidden


def neighbour_candidates(edits: list[EditRecord], others: list[EditRecord], extra_prompts=()) -> list[str]:
    """Prompts of *other* facts: other records' edit, locality and portability prompts, plus extra prompts (e.g. a
    fact world's other facts), minus every prompt the evaluation scores for the edited records and minus the edit
    prompts themselves."""
    blocked = forbidden_prompts(edits) | {r.prompt for r in edits}
    seen, pool = set(), []
    candidates = list(extra_prompts)
    for record in others:
        candidates.append(record.prompt)
        for probes in record.locality.values():
            candidates += [p.prompt for p in probes]
    for prompt in candidates:
        if prompt and prompt not in blocked and prompt not in seen:
            seen.add(prompt)
            pool.append(prompt)
    return pool


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


def subject_neighbour_candidates(edits: list[EditRecord], others: list[EditRecord], per_edit: int = 8) -> list[str]:
    """Same-subject anchors: each edited subject asked about relations other than the edited one.

    An edit should change (subject, relation) and nothing else the model says about the subject (ROME anchors the
    subject's "essence" the same way). The relations come from the *other* records: first those asked about other
    subjects that were also asked the edited relation (people get spouse / occupation / employer, rivers get
    mouth / country ...), then those asked together with these, then the most frequent ones (the other edits'
    relations included). Prompts the evaluation scores for the edited records are
    removed, so the edited records' own locality prompts are never among them."""
    blocked = forbidden_prompts(edits) | {r.prompt for r in edits}
    asked = relation_templates(others)
    frequency: dict[str, int] = {}
    co_occurring: dict[str, dict[str, int]] = {}
    # The edited relations themselves are fair questions about the *other* edited subjects.
    for templates in relation_templates(edits, with_locality=False).values():
        for template in templates:
            frequency[template] = frequency.get(template, 0) + 1
    for templates in asked.values():
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

    seen, pool = set(), []
    for record in edits:
        if not record.subject or record.subject not in record.prompt:
            continue
        edited = record.prompt.replace(record.subject, SUBJECT_SLOT, 1)
        prompts = [t.replace(SUBJECT_SLOT, record.subject, 1) for t in ranked(edited)]
        fresh = [p for p in prompts if p not in blocked and p not in seen][:per_edit]
        seen.update(fresh)
        pool += fresh
    return pool
