"""Read knowledge-editing data sets into `EditRecord`s, and write them back in KnowEdit's format.

Supported shapes (detected from each file's keys, one format per file):
  knowedit    KnowEdit splits (WikiData_counterfact, ZsRE, ...): {subject, prompt, target_new, ground_truth,
              rephrase_prompt?, portability{Kind: [{prompt, ground_truth}]}, locality{Kind: [...]}}; EasyEdit's
              flat CounterFact files ({..., rephrase_prompt, locality_prompt, locality_ground_truth}) are the
              same shape with one "neighborhood" locality probe, so one parser reads both.
  zsre_mend   MEND's zsRE: {subject, src, alt, answers, rephrase, loc, loc_ans, portability?{New Question, ...}}
  rome        ROME's CounterFact: {requested_rewrite{prompt with "{}", subject, target_new{str}, target_true{str}},
              paraphrase_prompts, neighborhood_prompts, portability?{New Question, New Answer}}.
              Attribute and generation prompts are not read (they have no gold answers).

Answers may be a string, a list of aliases or a list of alias lists, and may be empty: they are flattened to
non-empty aliases. Probes with an empty prompt or no answer are skipped and counted in `LoadStats`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2edit.files import atomic_write

from .records import EditRecord, Probe

if TYPE_CHECKING:  # datasets is imported lazily: reading a JSON file should not pay for it
    import datasets

logger = logging.getLogger(__name__)

SKIP_BAD_HINT = ("pass --skip-bad (t2edit eval / train / world build; skip_bad=True in Python) to skip such "
                 "records")


class DataFormatError(ValueError):
    """A data file (or one record in it) does not have a shape this module reads."""


class DataSourceNotFoundError(FileNotFoundError):
    """The source is neither an existing file nor a loadable hub dataset."""


@dataclass
class LoadStats:
    """What a load kept and what it dropped. Pass one in to `load_records(stats=...)`; it accumulates."""

    format: str = ""
    records: int = 0
    skipped_records: int = 0
    skipped_items: Counter = field(default_factory=Counter)  # e.g. {"locality.forgetfulness: empty answers": 2}
    problems: list[str] = field(default_factory=list)  # messages of the records skipped under skip_bad

    def summary(self) -> str:
        items = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_items.items())) or "none"
        return (f"{self.records} records ({self.format or 'no format'}); {self.skipped_records} bad records "
                f"skipped; probes skipped: {items}")


class _BadRecord(Exception):
    """Internal: the problem with one record, turned into a DataFormatError with file and index by the caller."""


# ---------------------------------------------------------------------------------------------- field readers
def _text(raw: dict, key: str, *, required: bool = False, where: str = "") -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise _BadRecord(f"missing '{where}{key}'")
        return ""
    if not isinstance(value, str):
        raise _BadRecord(f"'{where}{key}' must be a string, got {type(value).__name__} {value!r:.60}")
    return value.strip()


def _check_unicode(value: Any, where: str = "") -> None:
    """Text a tokenizer cannot take (a lone surrogate, from a "\\ud800" escape) is one clear error, not a crash
    deep inside the tokenizer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadRecord(f"'{where or 'a field'}' holds text that is not valid Unicode (a lone surrogate): "
                             f"{value!r:.60}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item, where)


def _aliases(value: Any, what: str) -> list[str]:
    """Flatten a string / list of aliases / list of alias lists into unique non-empty aliases, order kept."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if not isinstance(value, list):
        raise _BadRecord(f"{what} must be a string or a list of strings, got {type(value).__name__} {value!r:.60}")
    flat: list[str] = []
    for element in value:  # an alias, or one alias group of a multi-valued answer
        flat.extend(_aliases(element, what))
    return list(dict.fromkeys(flat))


def _kind(name: str) -> str:
    """'Subject_Aliasing', 'subject aliasing', 'Recalled Relation' -> 'subject_aliasing', 'recalled_relation'."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def _probe(prompt: str, answers: list[str], where: str, skipped: Counter) -> Probe | None:
    """A probe, or None (counted under e.g. "locality.forgetfulness: empty answers") when the source left its
    prompt or answers empty."""
    if not prompt:
        skipped[f"{where}: empty prompt"] += 1
        return None
    if not answers:
        skipped[f"{where}: empty answers"] += 1
        return None
    return Probe(prompt, answers)


def _probe_sections(value: Any, section: str, skipped: Counter) -> dict[str, list[Probe]]:
    """KnowEdit's {Kind: [{prompt, ground_truth}]} -> {kind: [Probe]}; kinds differing only in case merge."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadRecord(f"'{section}' must be an object {{kind: [{{prompt, ground_truth}}]}}, "
                         f"got {type(value).__name__}")
    sections: dict[str, list[Probe]] = {}
    for name, items in value.items():
        kind, where = _kind(name), f"{section}.{name}"
        items = [items] if isinstance(items, dict) else items or []  # a lone item, or null for none
        if not isinstance(items, list):
            raise _BadRecord(f"'{where}' must be a list of {{prompt, ground_truth}}, got {type(items).__name__}")
        for item in items:
            if not isinstance(item, dict) or "prompt" not in item or "ground_truth" not in item:
                raise _BadRecord(f"'{where}' items must be objects with 'prompt' and 'ground_truth', "
                                 f"got {item!r:.80}")
            prompt = _text(item, "prompt", where=f"{where}.")
            answers = _aliases(item["ground_truth"], f"'{where}.ground_truth'")
            probe = _probe(prompt, answers, f"{section}.{kind}", skipped)
            if probe:
                sections.setdefault(kind, []).append(probe)
    return sections


def _one_hop(value: Any, skipped: Counter) -> dict[str, list[Probe]]:
    """The GPT-4 one-hop portability of the MEND/ROME files: {Recalled Relation, New Question, New Answer}."""
    if value is None:
        return {}
    items = value if isinstance(value, list) else [value]
    probes = []
    for item in items:
        if not isinstance(item, dict):
            raise _BadRecord("'portability' must be an object with 'New Question' and 'New Answer'")
        probe = _probe(_text(item, "New Question"), _aliases(item.get("New Answer"), "'New Answer'"),
                       "portability.one_hop", skipped)
        if probe:
            probes.append(probe)
    return {"one_hop": probes} if probes else {}


def _prompt_list(raw: dict, key: str) -> list[str]:
    """A field holding one prompt or a list of prompts."""
    value = raw.get(key)
    prompts = [value] if isinstance(value, str) else value or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _BadRecord(f"'{key}' must be a string or a list of strings")
    return [p.strip() for p in prompts]


def _probes(prompts: list[str], answers: list[str], where: str, skipped: Counter) -> list[Probe]:
    return [p for p in (_probe(prompt, answers, where, skipped) for prompt in prompts) if p]


# ---------------------------------------------------------------------------------------------- record parsers
def _parse_knowedit(raw: dict, skipped: Counter) -> EditRecord:
    target_new = _aliases(raw.get("target_new"), "'target_new'")
    locality = _probe_sections(raw.get("locality"), "locality", skipped)
    if "locality_prompt" in raw:  # EasyEdit's flat CounterFact: one neighbourhood prompt
        answers = _aliases(raw.get("locality_ground_truth"), "'locality_ground_truth'")
        neighbours = _probes(_prompt_list(raw, "locality_prompt"), answers, "locality.neighborhood", skipped)
        if neighbours:
            locality.setdefault("neighborhood", []).extend(neighbours)
    return EditRecord(
        subject=_text(raw, "subject"), prompt=_text(raw, "prompt", required=True), target_new=target_new,
        ground_truth=_aliases(raw.get("ground_truth"), "'ground_truth'"),
        locality=locality, portability=_probe_sections(raw.get("portability"), "portability", skipped),
        rephrase=_probes(_prompt_list(raw, "rephrase_prompt"), target_new, "rephrase", skipped))


def _parse_zsre_mend(raw: dict, skipped: Counter) -> EditRecord:
    target_new = _aliases(raw.get("alt"), "'alt'")
    # MEND prefixes its Natural Questions locality prompts with "nq question: "; the answer follows the question.
    loc_prompt = re.sub(r"^nq question:\s*", "", _text(raw, "loc"))
    neighbours = _probes([loc_prompt], _aliases(raw.get("loc_ans"), "'loc_ans'"), "locality.nq", skipped) \
        if "loc" in raw else []
    return EditRecord(
        subject=_text(raw, "subject"), prompt=_text(raw, "src", required=True), target_new=target_new,
        ground_truth=_aliases(raw.get("answers"), "'answers'"),
        locality={"nq": neighbours} if neighbours else {}, portability=_one_hop(raw.get("portability"), skipped),
        rephrase=_probes(_prompt_list(raw, "rephrase"), target_new, "rephrase", skipped))


def _parse_rome(raw: dict, skipped: Counter) -> EditRecord:
    rewrite = raw.get("requested_rewrite")
    if isinstance(rewrite, list) and len(rewrite) == 1:  # MEMIT's multi-rewrite form with a single rewrite
        rewrite = rewrite[0]
    if not isinstance(rewrite, dict):
        raise _BadRecord("'requested_rewrite' must be an object {prompt, subject, target_new, target_true}")
    subject = _text(rewrite, "subject", required=True)
    targets = {key: rewrite.get(key) for key in ("target_new", "target_true")}
    target_new, target_true = (  # ROME stores each target as {"str": ..., "id": ...}
        _aliases(value.get("str") if isinstance(value, dict) else value, f"'requested_rewrite.{key}'")
        for key, value in targets.items())
    # Neighbourhood subjects share the edited subject's true object, so their gold answer is target_true.
    neighbours = _probes(_prompt_list(raw, "neighborhood_prompts"), target_true, "locality.neighborhood", skipped)
    return EditRecord(
        subject=subject, prompt=_text(rewrite, "prompt", required=True).replace("{}", subject),
        target_new=target_new, ground_truth=target_true,
        locality={"neighborhood": neighbours} if neighbours else {},
        portability=_one_hop(raw.get("portability"), skipped),
        rephrase=_probes(_prompt_list(raw, "paraphrase_prompts"), target_new, "rephrase", skipped))


_PARSERS = {"knowedit": _parse_knowedit, "counterfact": _parse_knowedit, "zsre_mend": _parse_zsre_mend,
            "rome": _parse_rome}


def _detect_format(rows: list) -> str | None:
    """The format of the first record that has a format's signature keys."""
    for raw in rows:
        if isinstance(raw, dict):
            if "requested_rewrite" in raw:
                return "rome"
            if "src" in raw and "alt" in raw:
                return "zsre_mend"
            if "prompt" in raw and "target_new" in raw:
                return "counterfact" if "locality_prompt" in raw else "knowedit"
    return None


# ---------------------------------------------------------------------------------------------- reading sources
# Record files shipped with the package, by name. "real-facts": 36 counterfactual edits of facts a small pretrained
# LLM knows (capitals, authors, founders...), KnowEdit format; the first 20 are the demo's edits, the rest its
# training pool (neighbours, IKE demonstrations, router negatives).
SHIPPED_DATA = {"real-facts": Path(__file__).resolve().parent / "real_facts.json",
                "builtin": Path(__file__).resolve().parent / "builtin_facts.json"}


def _read_rows(source: str | os.PathLike, split: str) -> tuple[list, str]:
    """The raw records of a JSON / JSONL file or a hub dataset, and a name for messages."""
    path = SHIPPED_DATA.get(str(source), Path(source))
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                                  "pass a JSON or JSONL file") from None
        if path.suffix == ".jsonl":
            rows = []
            for line_number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataFormatError(f"{path}: line {line_number} is not valid JSON ({err.msg}); "
                                              "a .jsonl file holds one JSON record per line") from None
            return rows, str(path)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                                  "fix the file, or name it .jsonl if it holds one record per line") from None
        if not isinstance(rows, list):
            raise DataFormatError(f"{path} holds a JSON {type(rows).__name__}, expected a list of edit records")
        return rows, str(path)
    if path.suffix in (".json", ".jsonl") or path.exists():
        raise DataSourceNotFoundError(f"data file {path} not found (or not a file); check the path")
    import datasets

    try:
        hub = datasets.load_dataset(str(source), split=split)
    except Exception as err:  # offline, unknown name, bad split: all mean "cannot use this source"
        raise DataSourceNotFoundError(
            f"{source!s} is neither a local file nor a reachable hub dataset ({type(err).__name__}: {err}); "
            "pass a path to a .json/.jsonl file, or a hub dataset name and split that exist") from None
    return list(hub), f"{source}[{split}]"


def _subject_as_written(subject: str, prompt: str) -> str:
    """The subject spelled as the prompt spells it where only letter case differs ("Water" in "The chemical formula
    of water is"): the scope routers and the leakage guard find a subject in a prompt by its text."""
    if not subject or subject in prompt:
        return subject
    found = re.search(re.escape(subject), prompt, flags=re.IGNORECASE)
    return found.group(0) if found else subject


def load_records(source: str | os.PathLike, *, limit: int | None = None, start: int = 0, skip_bad: bool = False,
                 stats: LoadStats | None = None, split: str = "train") -> list[EditRecord]:
    """Edit records from a KnowEdit / CounterFact / zsRE (MEND) / ROME file, or from a hub dataset `split`.

    `start` and `limit` select source records (so the same slice of the file whatever is skipped); each record's
    `index` is its position in the source. A malformed record raises `DataFormatError`, or is skipped and
    counted in `stats` under `skip_bad`.
    """
    if start < 0 or (limit is not None and limit < 0):
        raise ValueError(f"start ({start}) and limit ({limit}) must not be negative")
    rows, name = _read_rows(source, split)
    rows = rows[start:] if limit is None else rows[start:start + limit]
    if not rows:
        return []
    data_format = _detect_format(rows)
    if data_format is None:
        raise DataFormatError(f"{name}: no record has the keys of a known format (KnowEdit/CounterFact: prompt + "
                              "target_new; zsRE MEND: src + alt; ROME: requested_rewrite); check the file")
    this_load = LoadStats(format=data_format)
    records = []
    for index, raw in enumerate(rows, start=start):
        record_skips: Counter = Counter()  # kept only if the record itself is good
        try:
            if not isinstance(raw, dict):
                raise _BadRecord(f"a record must be a JSON object, got {type(raw).__name__}")
            _check_unicode(raw)
            record = _PARSERS[data_format](raw, record_skips)
            if not record.prompt:
                raise _BadRecord("the edit prompt is empty")
            if not record.target_new:
                raise _BadRecord("target_new is missing or empty")
        except _BadRecord as problem:
            message = f"{name}: record {index}: {problem}"
            if not skip_bad:
                raise DataFormatError(f"{message}; fix the record or {SKIP_BAD_HINT}") from None
            this_load.skipped_records += 1
            this_load.problems.append(message)
            continue
        record.index = index
        record.subject = _subject_as_written(record.subject, record.prompt)
        records.append(record)
        this_load.skipped_items.update(record_skips)
    this_load.records = len(records)
    if this_load.skipped_records or this_load.skipped_items:
        logger.warning("%s: %s", name, this_load.summary())
    if stats is not None:
        stats.format = data_format
        stats.records += this_load.records
        stats.skipped_records += this_load.skipped_records
        stats.skipped_items.update(this_load.skipped_items)
        stats.problems.extend(this_load.problems)
    return records


# ---------------------------------------------------------------------------------------------- datasets.Dataset
def _dataset_features() -> "datasets.Features":
    from datasets import Features, List, Value

    aliases = List(Value("string"))
    kinded = List({"kind": Value("string"), "prompt": Value("string"), "answers": aliases})
    return Features({"index": Value("int64"), "subject": Value("string"), "prompt": Value("string"),
                     "target_new": aliases, "ground_truth": aliases,
                     "rephrase": List({"prompt": Value("string"), "answers": aliases}),
                     "locality": kinded, "portability": kinded})


def _flat_probes(sections: dict[str, list[Probe]]) -> list[dict]:
    return [{"kind": kind, "prompt": p.prompt, "answers": p.answers} for kind, probes in sections.items()
            for p in probes]


def records_to_dataset(records: list[EditRecord]) -> "datasets.Dataset":
    """One row per record; locality/portability as lists of {kind, prompt, answers} (a fixed schema)."""
    from datasets import Dataset

    rows = [{"index": r.index, "subject": r.subject, "prompt": r.prompt, "target_new": r.target_new,
             "ground_truth": r.ground_truth,
             "rephrase": [{"prompt": p.prompt, "answers": p.answers} for p in r.rephrase],
             "locality": _flat_probes(r.locality), "portability": _flat_probes(r.portability)} for r in records]
    return Dataset.from_list(rows, features=_dataset_features())


def dataset_to_records(dataset: "datasets.Dataset") -> list[EditRecord]:
    """The inverse of `records_to_dataset`."""
    def grouped(rows: list[dict]) -> dict[str, list[Probe]]:
        sections: dict[str, list[Probe]] = {}
        for row in rows:
            sections.setdefault(row["kind"], []).append(Probe(row["prompt"], list(row["answers"])))
        return sections

    return [EditRecord(subject=row["subject"], prompt=row["prompt"], target_new=list(row["target_new"]),
                       ground_truth=list(row["ground_truth"]), locality=grouped(row["locality"]),
                       portability=grouped(row["portability"]),
                       rephrase=[Probe(p["prompt"], list(p["answers"])) for p in row["rephrase"]], index=row["index"])
            for row in dataset]


def load_edit_dataset(source: str | os.PathLike, **load_kwargs: Any) -> "datasets.Dataset":
    """`load_records(source, **load_kwargs)` as a `datasets.Dataset`."""
    return records_to_dataset(load_records(source, **load_kwargs))


# ---------------------------------------------------------------------------------------------- writing
def _answer_field(answers: list[str]) -> str | list[str]:
    """KnowEdit writes a lone answer as a string; keep that, and keep every alias when there are several."""
    return answers[0] if len(answers) == 1 else list(answers)


def _sections_field(sections: dict[str, list[Probe]]) -> dict[str, list[dict]]:
    # Title_Case kinds, as KnowEdit spells them ("relation_specificity" -> "Relation_Specificity").
    return {"_".join(w.capitalize() for w in kind.split("_")): [
        {"prompt": p.prompt, "ground_truth": _answer_field(p.answers)} for p in probes]
        for kind, probes in sections.items() if probes}


def record_to_knowedit(record: EditRecord) -> dict:
    """One record as a KnowEdit JSON object (rephrases as `rephrase_prompt`, as in KnowEdit's ZsRE split)."""
    raw: dict[str, Any] = {"subject": record.subject, "prompt": record.prompt,
                           "target_new": _answer_field(record.target_new),
                           "ground_truth": _answer_field(record.ground_truth) if record.ground_truth else "",
                           "portability": _sections_field(record.portability),
                           "locality": _sections_field(record.locality)}
    if record.rephrase:
        rephrases = [p.prompt for p in record.rephrase]
        raw["rephrase_prompt"] = rephrases[0] if len(rephrases) == 1 else rephrases
    return raw


def save_records(records: list[EditRecord], path: str | os.PathLike) -> Path:
    """Write records in KnowEdit format (a JSON list, or one object per line for .jsonl), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = [record_to_knowedit(r) for r in records]
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects)
    else:
        text = json.dumps(objects, ensure_ascii=False, indent=2) + "\n"
    return atomic_write(path, text)
