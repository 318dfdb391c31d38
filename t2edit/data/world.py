"""A fact world: a tiny causal LM pretrained on the facts of a KnowEdit-format file, so editors can be measured
on a CPU.

Before any edit the world model
  - answers each record's edit prompt, its locality prompts and its Subject_Aliasing prompts with the OLD answer;
  - already says every edit target somewhere: where a target is no answer of another fact in the file, one
    synthetic fact is added (the edit prompt's relation, an invented subject, answered by the target), because an
    editor that re-weighs what the model knows — SVF — can only edit towards answers the model already produces
    (an "LLM-like" world; see docs/data.md);
  - uses a fact put in its context (`t2edit.text.new_fact_context`) only when that fact is about the question's
    subject and relation, so prompt-based editing and IKE are fair comparisons: it is trained on "copy" examples
    (the question is the context's prompt or an alias of it, the answer is the context's object, a random known
    answer) and on hard negatives (same relation and another subject, or same subject and another relation: the
    question keeps its own answer), some with 1-4 IKE demonstrations in front. Besides the answer, the loss
    covers the restated question and the demonstrations' restated facts (`Example.echo_spans`): that signal makes
    the world far better at copying an in-context fact, and at keeping another subject's answer, for the same
    number of steps.

What the evaluation later expects only AFTER an edit is never taught: no record's target_new follows its edit
prompt, an alias prompt or a portability prompt anywhere in the training text (`training_texts` returns it all
for inspection).

    world = build_world("builtin")                   # cached under ~/.cache/t2edit/worlds/<key>
    world.model, world.tokenizer, world.records, world.report
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2edit.data.loaders import load_records, save_records
from t2edit.data.records import EditRecord
from t2edit.files import cache_dir
from t2edit.text import copy_demo, new_fact_context
from t2edit.tiny import build_tiny_model, build_tiny_tokenizer

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).resolve().parent / "builtin_facts.json"
WORLD_FILE = "world.json"
RECORDS_FILE = "records.json"
# Bump when the training recipe changes in a way the config does not capture, so cached worlds are rebuilt.
RECIPE_VERSION = 2


class WorldError(ValueError):
    """A world cannot be built or loaded from what the user passed."""


class WorldNotFoundError(FileNotFoundError):
    """The directory holds no world."""


@dataclass
class WorldConfig:
    """How a world model is built and pretrained. Defaults fit a world of ~120 records built in minutes on a CPU."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 512
    num_heads: int = 4
    steps: int | None = None  # None: `training_steps` picks from the number of facts
    lr: float = 3e-3
    warmup_steps: int = 50
    batch_size: int = 64
    in_context_fraction: float = 0.5  # share of each batch that is in-context examples (the rest: plain facts)
    copy_fraction: float = 0.5  # of in-context examples, share whose answer is copied from the context
    demo_fraction: float = 0.25  # of in-context examples, share with IKE demonstrations in front
    max_demos: int = 4
    same_relation_object_share: float = 0.5  # of new objects in context, share drawn from the fact's relation
    synthetic_targets: bool = True  # add a fact for each target no other fact answers (an "LLM-like" world)
    echo_loss_weight: float = 1.0  # weight of the loss on restated context (see `Example`); 0 = answers only
    tokens_per_microbatch: int = 512  # a batch is split by length into pieces of at most this many tokens (padded)

    @classmethod
    def tiny(cls) -> "WorldConfig":
        """For tests: a smaller, faster-built model for a 10-20 record world."""
        return cls(hidden_size=64, num_layers=2, intermediate_size=256, steps=300, lr=5e-3, batch_size=32,
                   warmup_steps=20)

    def training_steps(self, n_facts: int) -> int:
        """`steps`, or enough for `n_facts`: each fact is seen ~100 times at the default batch (1,500 steps for the
        ~450 facts of the built-in world; 2,600 for the first 200 records of KnowEdit's train_cf)."""
        return self.steps or max(1500, 3 * n_facts)

    def __post_init__(self):
        for name in ("in_context_fraction", "copy_fraction", "demo_fraction", "same_relation_object_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise WorldError(f"WorldConfig.{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "max_demos", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise WorldError(f"WorldConfig.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class World:
    """A built world: the pretrained model and its tokenizer, the records it was built from, the build report
    (world.json) and the directory it is saved in."""

    model: Any
    tokenizer: Any
    records: list[EditRecord]
    report: dict
    path: Path | None = None


# ---------------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class Fact:
    """One thing the world knows: `prompt` + " " + `answer`.

    `entity` and `relation` say what the fact is about, for in-context training: facts with the same entity and
    relation are the same question (an edit prompt and its alias prompts); `relation` is the prompt with the
    subject cut out ("The spouse of {} is"), or the prompt itself when the subject is not in it."""

    prompt: str
    answer: str
    group: str  # "edit", "alias", a locality kind ("relation_specificity", ...), or "synthetic"
    entity: str
    relation: str


@dataclass
class FactSet:
    facts: list[Fact]
    forbidden: set[tuple[str, str]]  # (prompt, answer) pairs the evaluation expects only after an edit
    dropped: dict[str, int] = field(default_factory=dict)  # why candidate facts were not taught, and how many


def _relation(prompt: str, subject: str) -> str:
    return prompt.replace(subject, "{}", 1) if subject and subject in prompt else prompt


def _post_edit_pairs(records: list[EditRecord]) -> set[tuple[str, str]]:
    """Every (prompt, answer) the evaluation scores as the result of an edit: the edit itself, its rephrases and
    every portability probe. Teaching any of them would pre-edit the world."""
    pairs = set()
    for record in records:
        pairs.update((record.prompt, target) for target in record.target_new)
        for probe in record.rephrase + [p for probes in record.portability.values() for p in probes]:
            pairs.update((probe.prompt, answer) for answer in probe.answers)
    return pairs


def _invented_name(rng: random.Random, taken: set[str]) -> str:
    """A person-like name made of syllables no real subject is likely to use ("Vorak Talmine")."""
    syllables = ["va", "ro", "ke", "lin", "tor", "mi", "sa", "dun", "el", "gra", "po", "ul", "zen", "ha", "bri",
                 "nos", "te", "qui", "mar", "od"]
    while True:
        parts = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(2)]
        name = " ".join(parts)
        if name not in taken:
            taken.add(name)
            return name


def world_facts(records: list[EditRecord], *, synthetic_targets: bool = True, seed: int = 0) -> FactSet:
    """The facts a world built from `records` is taught, in order: each record's edit prompt with its old answer,
    its Subject_Aliasing prompts with the old answer, its locality probes, then one synthetic fact per edit target
    that no other fact answers. A prompt is taught one answer only (the first seen); pairs the evaluation expects
    only after an edit are never taught."""
    forbidden = _post_edit_pairs(records)
    dropped: dict[str, int] = defaultdict(int)
    facts: list[Fact] = []
    taught_prompts: dict[str, str] = {}

    def add(prompt: str, answer: str, group: str, entity: str, relation: str):
        if (prompt, answer) in forbidden:
            dropped[f"{group}: answer expected only after an edit"] += 1
        elif prompt in taught_prompts:
            if taught_prompts[prompt] != answer:
                dropped[f"{group}: prompt already taught another answer"] += 1
        else:
            taught_prompts[prompt] = answer
            facts.append(Fact(prompt, answer, group, entity, relation))

    for record in records:
        relation = _relation(record.prompt, record.subject)
        if record.ground_truth:
            add(record.prompt, record.ground_truth[0], "edit", record.subject, relation)
            for probe in record.portability.get("subject_aliasing", []):
                add(probe.prompt, record.ground_truth[0], "alias", record.subject, relation)
        else:
            dropped["edit: no ground_truth"] += 1
    for record in records:
        for kind, probes in record.locality.items():
            for probe in probes:
                add(probe.prompt, probe.answer, kind, record.subject if record.subject in probe.prompt else "",
                    _relation(probe.prompt, record.subject))

    if synthetic_targets:
        rng = random.Random(f"synthetic-{seed}")
        answers = {fact.answer for fact in facts}
        taken = {record.subject for record in records}
        for record in records:
            if record.target in answers:
                continue
            relation = _relation(record.prompt, record.subject)
            name = _invented_name(rng, taken)
            prompt = relation.format(name) if "{}" in relation else f"The answer about {name} is"
            add(prompt, record.target, "synthetic", name, relation if "{}" in relation else prompt)
            answers.add(record.target)
    return FactSet(facts, forbidden, dict(dropped))


# ---------------------------------------------------------------------------------------------- training text
@dataclass(frozen=True)
class Example:
    """One training sequence `prefix answer`. The loss covers the answer (and the end of sequence), plus, with
    `WorldConfig.echo_loss_weight`, the `echo_spans` of the prefix: character spans that restate the context
    (the question after "Prompt:", and each demonstration's answer). Predicting those is the repeat-what-you-saw
    signal from which copying circuits form; the answer alone gives one such token per sequence."""

    prefix: str  # everything before the answer, e.g. "New Fact: p t\nPrompt: q"
    answer: str
    kind: str  # "fact", "copy", "keep"
    echo_spans: tuple[tuple[int, int], ...] = ()

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.answer}"


class InContextSampler:
    """Draws in-context examples over a fact set: copies (the question asks exactly what the context states,
    possibly through an alias of its subject) and hard negatives (same relation, another subject; or same
    subject, another relation), never pairing a prompt with an answer the evaluation expects after an edit."""

    def __init__(self, fact_set: FactSet, config: WorldConfig, rng: random.Random):
        self.facts, self.forbidden, self.config, self.rng = fact_set.facts, fact_set.forbidden, config, rng
        self.answers = sorted({f.answer for f in self.facts})
        self.by_relation: dict[str, list[Fact]] = defaultdict(list)
        self.by_entity: dict[str, list[Fact]] = defaultdict(list)
        self.same_question: dict[tuple[str, str], list[str]] = defaultdict(list)
        for fact in self.facts:
            self.by_relation[fact.relation].append(fact)
            if fact.entity:
                self.by_entity[fact.entity].append(fact)
            self.same_question[self._question_key(fact)].append(fact.prompt)
        self.relation_answers = {rel: sorted({f.answer for f in fs}) for rel, fs in self.by_relation.items()}

    @staticmethod
    def _question_key(fact: Fact) -> tuple[str, str]:
        return (fact.entity or fact.prompt, fact.relation)

    def _new_object(self, fact: Fact, questions: list[str]) -> str | None:
        """A known answer other than the fact's own, mostly one of the same relation (type-consistent, like real
        edits: a wrong-type object would make "does this fact answer the question?" too easy), that the
        evaluation does not expect after an edit of any of `questions`."""
        for _ in range(20):
            same_type = self.rng.random() < self.config.same_relation_object_share
            pool = self.relation_answers[fact.relation] if same_type else self.answers
            candidate = self.rng.choice(pool)
            if candidate != fact.answer and not any((q, candidate) in self.forbidden for q in questions):
                return candidate
        return None

    def demos(self) -> tuple[str, list[tuple[int, int]]]:
        """1..max_demos IKE demonstrations, and the spans of their restated part ("p t" after "Prompt:")."""
        k = self.rng.randint(1, self.config.max_demos)
        text, spans = "", []
        for _ in range(100 * k):
            if len(spans) == k:
                break
            fact = self.rng.choice(self.facts)
            new_object = self._new_object(fact, [fact.prompt])
            if new_object is not None:
                demo = copy_demo(fact.prompt, new_object)
                restated = len(text) + len(new_fact_context(fact.prompt, new_object))
                spans.append((restated, restated + len(fact.prompt) + 1 + len(new_object)))
                text += demo
        return text, spans

    def negative(self, fact: Fact, new_object: str) -> Fact | None:
        """A fact the context must not change: same relation and another subject, or same subject and another
        relation, or (rarely) anything else."""
        roll = self.rng.random()
        if roll < 0.45:
            pool = [f for f in self.by_relation[fact.relation] if self._question_key(f) != self._question_key(fact)]
        elif roll < 0.9 and fact.entity:
            pool = [f for f in self.by_entity[fact.entity] if f.relation != fact.relation]
        else:
            pool = self.facts
        pool = [f for f in pool if f.answer != new_object and self._question_key(f) != self._question_key(fact)]
        return self.rng.choice(pool) if pool else None

    def sample(self) -> Example:
        for _ in range(1000):
            fact = self.rng.choice(self.facts)
            questions = self.same_question[self._question_key(fact)]
            new_object = self._new_object(fact, questions)
            if new_object is None:
                continue
            if self.rng.random() < self.config.copy_fraction:
                question, answer, kind = self.rng.choice(questions), new_object, "copy"
            else:
                other = self.negative(fact, new_object)
                if other is None:
                    continue
                question, answer, kind = other.prompt, other.answer, "keep"
            demos, spans = self.demos() if self.rng.random() < self.config.demo_fraction else ("", [])
            prefix = demos + new_fact_context(fact.prompt, new_object) + question
            spans.append((len(prefix) - len(question), len(prefix)))
            return Example(prefix, answer, kind, tuple(spans))
        raise WorldError(f"cannot make in-context examples from these {len(self.facts)} facts: they need at least "
                         "two different answers and two different questions; add records or set "
                         "in_context_fraction=0")


def training_batches(fact_set: FactSet, config: WorldConfig, seed: int = 0) -> Iterator[list[Example]]:
    """The examples of each training step, deterministic in `seed`: plain facts, and in-context examples."""
    rng = random.Random(seed)
    sampler = InContextSampler(fact_set, config, rng)
    n_in_context = round(config.batch_size * config.in_context_fraction)
    if n_in_context:
        sampler.sample()  # fail now, with a clear message, if this fact set cannot make in-context examples
        rng.seed(seed)
    n_facts = config.batch_size - n_in_context
    facts = fact_set.facts
    for _ in range(config.training_steps(len(facts))):
        batch = [Example(f.prompt, f.answer, "fact") for f in rng.sample(facts, min(n_facts, len(facts)))]
        batch += [sampler.sample() for _ in range(n_in_context)]
        yield batch


def training_texts(records: list[EditRecord], config: WorldConfig | None = None, seed: int = 0) -> list[str]:
    """Every text the builder trains a world of `records` on (with its answer), for inspection."""
    config = config or WorldConfig()
    fact_set = world_facts(records, synthetic_targets=config.synthetic_targets, seed=seed)
    config = replace(config, steps=config.training_steps(len(fact_set.facts)))
    return [example.text for batch in training_batches(fact_set, config, seed) for example in batch]


def vocabulary_texts(records: list[EditRecord], fact_set: FactSet) -> list[str]:
    """Every string the world's tokenizer must spell: all prompts and answers of the records (also those only
    the evaluation uses), the synthetic facts and the in-context templates."""
    texts = [new_fact_context("x", "y") + copy_demo("x", "y")]
    for record in records:
        texts += [record.prompt, record.subject, *record.target_new, *record.ground_truth]
        for probe in record.rephrase + [p for ps in [*record.locality.values(), *record.portability.values()]
                                        for p in ps]:
            texts += [probe.prompt, *probe.answers]
    texts += [f"{fact.prompt} {fact.answer}" for fact in fact_set.facts]
    return texts


# ---------------------------------------------------------------------------------------------- training
NO_LOSS, ANSWER, ECHO = 0, 1, 2


def _encode(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """Token ids ([BOS] text [EOS]) and each token's role: ANSWER (the answer and EOS), ECHO (in an echo span)
    or NO_LOSS."""
    encoded = tokenizer([e.text for e in examples], return_offsets_mapping=True)
    result = []
    for example, ids, offsets in zip(examples, encoded["input_ids"], encoded["offset_mapping"]):
        answer_start = len(example.prefix) + 1
        roles = []
        for start, end in offsets:  # a word token's span includes the space before it
            if end == start:
                roles.append(NO_LOSS)  # <s>
            elif end > answer_start:
                roles.append(ANSWER)
            elif any(span_start < end <= span_end for span_start, span_end in example.echo_spans):
                roles.append(ECHO)
            else:
                roles.append(NO_LOSS)
        result.append((ids + [tokenizer.eos_token_id], roles + [ANSWER]))
    return result


def _microbatches(encoded: list[tuple[list[int], list[int]]], tokens_per_microbatch: int):
    """Split a batch, sorted by length, into pieces whose padded size stays under the token budget (IKE examples
    are several times longer than facts; padding every fact to their length would waste most of the step)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    piece: list[int] = []
    for i in order:
        if piece and (len(piece) + 1) * len(encoded[i][0]) > tokens_per_microbatch:
            yield [encoded[j] for j in piece]
            piece = []
        piece.append(i)
    if piece:
        yield [encoded[j] for j in piece]


def _batch_tensors(items: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """input_ids, roles and attention_mask of one microbatch. Right padding, so every sequence starts at
    position 0."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    roles = torch.zeros((len(items), width), dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, token_roles) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        roles[row, : len(ids)] = torch.tensor(token_roles)
        attention_mask[row, : len(ids)] = 1
    return input_ids, roles, attention_mask


def _loss_sums(model, tensors: tuple[torch.Tensor, ...]) -> dict[int, torch.Tensor]:
    """Summed cross-entropy of the ANSWER tokens and of the ECHO tokens of one microbatch, on the model's device
    (masked sums, not boolean indexing: indexing would make the GPU wait for the host at every microbatch)."""
    device = next(model.parameters()).device
    input_ids, roles, attention_mask = (t.to(device, non_blocking=True) for t in tensors)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1),
                                 reduction="none")
    roles = roles[:, 1:].reshape(-1)
    return {role: torch.where(roles == role, token_loss, 0.0).sum() for role in (ANSWER, ECHO)}


def prepared_batches(tokenizer, batches: Iterator[list[Example]], config: WorldConfig):
    """Each step's token counts per role and its microbatches as tensors: the host-side work of a step."""
    for batch in batches:
        encoded = _encode(tokenizer, batch)
        counts = {role: max(1, sum(r.count(role) for _, r in encoded)) for role in (ANSWER, ECHO)}
        yield counts, [_batch_tensors(piece, tokenizer.pad_token_id)
                       for piece in _microbatches(encoded, config.tokens_per_microbatch)]


class _PreparedSteps(torch.utils.data.IterableDataset):
    """`prepared_batches` of a fact set, rebuilt inside a DataLoader worker (deterministic: one worker)."""

    def __init__(self, tokenizer, fact_set: FactSet, config: WorldConfig, seed: int):
        self.tokenizer, self.fact_set, self.config, self.seed = tokenizer, fact_set, config, seed

    def __iter__(self):
        return prepared_batches(self.tokenizer, training_batches(self.fact_set, self.config, self.seed), self.config)


def _steps(tokenizer, batches, config: WorldConfig, prefetch: bool):
    """The prepared steps; with `prefetch` (a `_PreparedSteps` only) from a background worker process, so that
    sampling and tokenizing the next steps overlap the current one on a GPU (on a CPU they would only compete with
    it for the cores)."""
    if not isinstance(batches, _PreparedSteps):
        return prepared_batches(tokenizer, batches, config)
    if prefetch:
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=1, prefetch_factor=16,
                                           pin_memory=torch.cuda.is_available())
    return iter(batches)


def pretrain(model, tokenizer, batches, config: WorldConfig, progress: bool = True,
             prefetch: bool | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay to 10%; returns the mean answer loss per step. Trains on the
    model's device; `batches` are lists of Examples, or a `_PreparedSteps` (prefetched in a worker process when
    `prefetch`; default: on a GPU)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_fraction = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    if prefetch is None:
        prefetch = next(model.parameters()).device.type == "cuda"
    losses: list[torch.Tensor] = []  # on the device; read back every 25 steps, not every step
    bar = tqdm(_steps(tokenizer, batches, config, prefetch), total=config.steps, desc="pretraining world",
               disable=not progress)
    for counts, pieces in bar:
        optimizer.zero_grad(set_to_none=True)
        answer_loss = 0.0
        for piece in pieces:
            sums = _loss_sums(model, piece)
            loss = sums[ANSWER] / counts[ANSWER]
            if config.echo_loss_weight:
                loss = loss + config.echo_loss_weight * sums[ECHO] / counts[ECHO]
            loss.backward()
            answer_loss = answer_loss + sums[ANSWER].detach() / counts[ANSWER]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(answer_loss)
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{torch.stack(losses[-25:]).mean().item():.3f}")
    model.eval()
    losses = torch.stack(losses).float().cpu().tolist() if losses else []
    return losses


# ---------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 128) -> list[bool]:
    """Whether greedy decoding after each prompt starts with the answer: argmax correct at every answer token
    (teacher-forced, which is the same test as greedy generation, in one forward pass)."""
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        encoded = [(ids[:-1], roles[:-1]) for ids, roles in  # the EOS is not part of the answer
                   _encode(tokenizer, [Example(p, a, "") for p, a in chunk])]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        device = next(model.parameters()).device
        predicted = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        predicted = predicted.argmax(-1).cpu()
        for row, (ids, roles) in enumerate(encoded):
            answer_start = roles.index(ANSWER)
            gold = torch.tensor(ids[answer_start:])
            results.append(bool((predicted[row, answer_start - 1: len(ids) - 1] == gold).all()))
    return results


def _rate(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def pre_edit_recall(model, tokenizer, fact_set: FactSet) -> dict[str, dict]:
    """Exact-match recall of the taught facts, per group, plus "locality" over every locality kind."""
    hits = exact_match(model, tokenizer, [(f.prompt, f.answer) for f in fact_set.facts])
    groups: dict[str, list[bool]] = defaultdict(list)
    for fact, hit in zip(fact_set.facts, hits):
        groups[fact.group].append(hit)
        if fact.group not in ("edit", "alias", "synthetic"):
            groups["locality"].append(hit)
    groups["all"] = hits
    return {group: {"recall": _rate(h), "n": len(h)} for group, h in sorted(groups.items())}


def in_context_rates(model, tokenizer, records: list[EditRecord], fact_set: FactSet, seed: int = 0,
                     n_demos: int = 2) -> dict[str, dict]:
    """How the world uses a new fact in its context, on the records' own edits — combinations training never
    shows (no record's target follows its prompt anywhere in the training text):
      copy_edit / copy_alias:  context(prompt, target) + prompt / alias prompt -> target
      keep_same_subject:       context(prompt, target) + a locality prompt of that record -> its answer
      keep_other_subject:      context(prompt, target) + another record's edit prompt (same relation when one
                               exists) -> that record's old answer (the fraction NOT leaking)
      *_with_demos:            the same with `n_demos` IKE demonstrations of other records' edits in front."""
    rng = random.Random(seed)
    known = {(f.prompt, f.answer) for f in fact_set.facts}  # only score "keep" where the world knows the answer
    by_relation: dict[str, list[EditRecord]] = defaultdict(list)
    for record in records:
        by_relation[_relation(record.prompt, record.subject)].append(record)
    cases: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for record in records:
        context = new_fact_context(record.prompt, record.target)
        others = [r for r in records if r is not record]
        demos = "".join(copy_demo(r.prompt, r.target) for r in rng.sample(others, min(n_demos, len(others))))
        same_relation = [r for r in by_relation[_relation(record.prompt, record.subject)] if r is not record]
        other = rng.choice(same_relation or others) if others else None
        for prefix, suffix in (("", ""), (demos, "_with_demos")):
            cases["copy_edit" + suffix].append((prefix + context + record.prompt, record.target))
            for probe in record.portability.get("subject_aliasing", []):
                cases["copy_alias" + suffix].append((prefix + context + probe.prompt, record.target))
            for probes in record.locality.values():
                for probe in probes:
                    if (probe.prompt, probe.answer) in known:
                        cases["keep_same_subject" + suffix].append((prefix + context + probe.prompt, probe.answer))
            if other is not None and other.ground_truth and (other.prompt, other.ground_truth[0]) in known:
                cases["keep_other_subject" + suffix].append((prefix + context + other.prompt, other.ground_truth[0]))
    return {name: {"rate": _rate(exact_match(model, tokenizer, pairs)), "n": len(pairs)}
            for name, pairs in sorted(cases.items())}


def _targets_known(records: list[EditRecord], fact_set: FactSet) -> float | None:
    """Fraction of records whose target is the answer of some taught fact (never the record's own edit prompt,
    which `world_facts` guarantees)."""
    answers = {f.answer for f in fact_set.facts}
    return _rate([record.target in answers for record in records])


# ---------------------------------------------------------------------------------------------- build / load
def _resolve_data(data: str | os.PathLike) -> Path:
    if str(data) == BUILTIN:
        return BUILTIN_PATH
    path = Path(data).expanduser()
    if not path.is_file():
        raise WorldError(f"data file {path} not found; pass a KnowEdit-format JSON file or 'builtin'")
    return path.resolve()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def world_key(data_sha256: str, config: WorldConfig, seed: int, limit: int | None) -> str:
    """What a world depends on: the data, the config, the seed, the record slice and the recipe version."""
    payload = json.dumps({"data": data_sha256, "config": asdict(config), "seed": seed, "limit": limit,
                          "recipe": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_world_dir(key: str) -> Path:
    return cache_dir("worlds", key)


def load_world(out_dir: str | os.PathLike) -> World:
    """A world saved by `build_world`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir).expanduser()
    if not (out_dir / WORLD_FILE).is_file():
        raise WorldNotFoundError(f"{out_dir} holds no world ({WORLD_FILE} missing); build one with "
                                 f"`t2edit world build --data FILE --out {out_dir}`")
    report = json.loads((out_dir / WORLD_FILE).read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.padding_side = "left"
    records = load_records(out_dir / RECORDS_FILE)
    return World(model=model, tokenizer=tokenizer, records=records, report=report, path=out_dir)


def _cached(out_dir: Path, key: str) -> bool:
    try:
        return json.loads((out_dir / WORLD_FILE).read_text(encoding="utf-8")).get("key") == key
    except (OSError, ValueError):
        return False


def _check_out_dir(out_dir: Path):
    """Refuse, before any training, to replace anything but an older world or an empty directory."""
    if out_dir.exists() and not (out_dir / WORLD_FILE).is_file():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise WorldError(f"{out_dir} exists and is not a t2edit world; choose another --out or empty it")


def _install(built: Path, out_dir: Path):
    """Move the finished world to out_dir, replacing an older world there."""
    if out_dir.exists():
        _check_out_dir(out_dir)  # again: it may have changed while the world trained
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(built, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, out_dir)


def build_world(data: str | os.PathLike = BUILTIN, out_dir: str | os.PathLike | None = None, *,
                limit: int | None = None, config: WorldConfig | None = None, seed: int = 0,
                progress: bool = True, force: bool = False, skip_bad: bool = False,
                device: str | torch.device | None = None, prefetch: bool | None = None) -> World:
    """Pretrain a world model on the facts of `data` (a KnowEdit-format file, or "builtin") and save it to
    `out_dir` (default: the cache, ~/.cache/t2edit/worlds/<key>). Returns the saved world at once if `out_dir`
    already holds one built from the same data, config, seed and limit, unless `force`. `device`: where to
    pretrain and measure (default: the CPU); the world is saved and returned on the CPU either way. `prefetch`:
    prepare the steps in a worker process (default: on a GPU; see `pretrain`)."""
    config = config or WorldConfig()
    path = _resolve_data(data)
    data_sha256 = _sha256(path)
    key = world_key(data_sha256, config, seed, limit)
    out_dir = Path(out_dir).expanduser() if out_dir is not None else default_world_dir(key)
    if not force and _cached(out_dir, key):
        logger.info("world cache hit: %s", out_dir)
        return load_world(out_dir)

    _check_out_dir(out_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    records = load_records(path, limit=limit, skip_bad=skip_bad)
    if not records:
        raise WorldError(f"{path} gave no records (limit={limit}); a world needs at least one")
    fact_set = world_facts(records, synthetic_targets=config.synthetic_targets, seed=seed)
    if len(fact_set.facts) < 2:
        raise WorldError(f"{path}: only {len(fact_set.facts)} teachable fact(s); records need ground_truth answers")
    trained = replace(config, steps=config.training_steps(len(fact_set.facts)))
    tokenizer = build_tiny_tokenizer(vocabulary_texts(records, fact_set))
    model = build_tiny_model(tokenizer, arch=config.arch, hidden_size=config.hidden_size,
                             num_layers=config.num_layers, intermediate_size=config.intermediate_size,
                             num_heads=config.num_heads, seed=seed)
    torch.manual_seed(seed)
    model.to(device or "cpu")
    train_started = time.perf_counter()
    losses = pretrain(model, tokenizer, _PreparedSteps(tokenizer, fact_set, trained, seed), trained, progress,
                      prefetch=prefetch)
    train_seconds = time.perf_counter() - train_started

    groups = defaultdict(int)
    for fact in fact_set.facts:
        groups[fact.group] += 1
    report = {
        "key": key, "source": BUILTIN if str(data) == BUILTIN else str(path), "data_sha256": data_sha256,
        "limit": limit, "seed": seed, "recipe_version": RECIPE_VERSION, "config": asdict(trained),
        "records": len(records), "facts": dict(sorted(groups.items())), "facts_dropped": fact_set.dropped,
        "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
        "targets_known": _targets_known(records, fact_set),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "pre_edit_recall": pre_edit_recall(model, tokenizer, fact_set),
        "in_context": in_context_rates(model, tokenizer, records, fact_set, seed),
        "train_seconds": round(train_seconds, 1),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    # CPU time as well: on a shared machine wall time says more about the neighbours than about the build.
    report["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    report["torch_threads"] = torch.get_num_threads()
    report["device"] = str(next(model.parameters()).device)
    model.cpu()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(temp_dir)
        tokenizer.save_pretrained(temp_dir)
        save_records(records, temp_dir / RECORDS_FILE)
        (temp_dir / WORLD_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _install(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return World(model=model, tokenizer=tokenizer, records=records, report=report, path=out_dir)


# ---------------------------------------------------------------------------------------------- command line
def format_report(report: dict) -> str:
    """The report as a few plain-text lines (what `t2edit world build` prints)."""
    recall = report["pre_edit_recall"]
    lines = [f"world {report['key']}  source={report['source']}  records={report['records']}  "
             f"facts={sum(report['facts'].values())} {report['facts']}",
             f"model: {report['config']['arch']} hidden={report['config']['hidden_size']} "
             f"layers={report['config']['num_layers']} params={report['parameters']:,} vocab={report['vocab_size']}  "
             f"steps={report['config']['steps']}  built in {report['seconds']} s "
             f"(training {report['train_seconds']} s, {report['cpu_seconds']} CPU s)",
             "pre-edit recall (greedy exact match): " + "  ".join(
                 f"{group}={value['recall']} (n={value['n']})" for group, value in recall.items()),
             "in context: " + "  ".join(f"{name}={value['rate']} (n={value['n']})"
                                        for name, value in report["in_context"].items()),
             f"targets already known as answers: {report['targets_known']}"]
    if report.get("facts_dropped"):
        lines.append(f"facts not taught: {report['facts_dropped']}")
    return "\n".join(lines)
