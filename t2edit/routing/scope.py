"""The scope routers: recognise an edit's subject and relation in other words (aliases, two-hop questions).

`scope` keys on the tokens of each edit's subject and of the rest of its prompt (the relation); `scope-split`
calibrates the subject part and the relation part apart and vetoes prompts that hold the edit's new answer.
Both need each edit's subject inside its prompt (`annotate_expert`).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from t2edit.routing.base import ExpertRouter, expert_edits, names_its_subject, one_hot_choice, threshold_above
from t2edit.routing.pass1 import PromptBatch, encode
from t2edit.text import normalize_answer


class ScopeRouter(ExpertRouter):
    """Recognises an edit's subject and relation in other words (aliases, two-hop questions).

    For each edit, the tokens of its subject and the tokens of the rest of its prompt (the relation) are kept as
    vectors (layer `layer` of pass 1; 0 = the input embeddings), weighted by how rare each token is among the
    negatives (IDF, so "The … of … is" counts for little). A prompt's subject score is the weighted share of the
    subject's tokens that have a close token in the prompt (best cosine per token), likewise its relation score;
    an edit applies when min(subject, relation) passes a threshold calibrated on the negatives: `margin` of the
    way from the highest negative to 1 (other subjects fail on the subject, the edited subject asked about other
    relations fails on the relation). The best edit's expert wins; else no expert. Needs each edit's subject in
    the expert's info (`annotate_expert`)."""

    name = "scope"

    def __init__(self, layer: int = 0, margin: float = 0.1, threshold: float | None = None, quantile: float = 1.0,
                 subject_layer: int | None = None):
        # quantile < 1 calibrates on that quantile of the negatives' scores instead of the highest one: KnowEdit
        # repeats some (subject, relation) pairs across records, and one such negative scores 1.0.
        self.layer, self.margin, self.fixed_threshold, self.quantile = layer, margin, threshold, quantile
        # The subject's tokens may be keyed at another layer than the relation's (aliases share meaning, not tokens).
        self.subject_layer = layer if subject_layer is None else subject_layer

    @property
    def layers(self) -> tuple[int, int]:
        """The hidden states this router reads: pass 1 runs no deeper."""
        return self.layer, self.subject_layer

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **_):
        self._build_keys(model, tokenizer, negatives)
        if self.fixed_threshold is not None:
            self.threshold = self.fixed_threshold
        elif negatives:
            best = torch.cat([self._scores(b).max(-1).values
                              for b in encode(model, tokenizer, list(negatives), cache=pass1_cache,
                                              layers=self.layers)])
            self.threshold = threshold_above(best.quantile(self.quantile).item(), self.margin)
        else:
            self.threshold = 0.8  # without negatives: a default; calibrate for real use
        return self

    def _build_keys(self, model, tokenizer, negatives):
        """Each edit's subject and relation keys, with idf weights from the edit prompts and the negatives."""
        super().fit(model)
        if tokenizer is None:
            raise ValueError("the scope router needs the tokenizer")
        self.tokenizer = tokenizer
        edits = [(k, e) for k, es in enumerate(expert_edits(model)) for e in es]
        lacking = [e["prompt"] for _, e in edits if not names_its_subject(e.get("subject"), e["prompt"])]
        if lacking:
            raise ValueError(f"the scope router needs each edit's subject inside its prompt; {len(lacking)} edit(s) "
                             f"lack it, e.g. {lacking[0]!r}: write it with t2edit.routing.annotate_expert, or "
                             f"route with --router embedding (or, in t2edit eval, the expert's own: --router own)")
        corpus = [e["prompt"] for _, e in edits] + list(negatives)
        df = Counter(t for text in corpus for t in set(tokenizer(text)["input_ids"]))
        self.idf = lambda ids: torch.tensor([max(math.log((1 + len(corpus)) / (1 + df.get(i, 0))), 0.0) + 1e-3
                                             for i in ids])
        self.owner = torch.tensor([k for k, _ in edits])
        self.subject_keys, self.relation_keys = [], []  # per edit: (vectors [n, d] unit norm, weights [n])
        self._packed_cache = (None,)
        for (_, e), (ids, offsets, states, subject_states) in zip(
                edits, self._tokens(model, tokenizer, [e["prompt"] for _, e in edits])):
            start = e["prompt"].index(e["subject"])
            end = start + len(e["subject"])
            in_subject = torch.tensor([a < end and b > start for a, b in offsets], dtype=torch.bool)
            idf = self.idf(ids)
            self.subject_keys.append((subject_states[in_subject], idf[in_subject]))
            self.relation_keys.append((states[~in_subject], idf[~in_subject]))

    def _tokens(self, model, tokenizer, texts: Sequence[str]):
        """Per text, its real tokens (padding and special tokens dropped): (ids, character offsets, unit-norm pass-1
        states at `layer`, the same at `subject_layer`), on the CPU."""
        special = set(tokenizer.all_special_ids)
        for chunk in _chunks(list(texts), 64):
            enc = tokenizer(chunk, return_tensors="pt", padding=True, return_offsets_mapping=True)
            pb = model.pass1(enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device),
                             layers=self.layers)
            states = F.normalize(pb.hidden_states[self.layer].float(), dim=-1).cpu()
            subject_states = F.normalize(pb.hidden_states[self.subject_layer].float(), dim=-1).cpu()
            for row in range(len(chunk)):
                pos = [p for p, (i, m) in enumerate(zip(enc["input_ids"][row].tolist(),
                                                        enc["attention_mask"][row].tolist())) if m and i not in special]
                offsets = [tuple(o) for o in enc["offset_mapping"][row, pos].tolist()]
                yield enc["input_ids"][row, pos].tolist(), offsets, states[row, pos], subject_states[row, pos]

    def _packed(self, device) -> tuple:
        """Every edit's subject and relation keys padded into [edits, tokens, d] tensors (`_pad_keys`) on `device`:
        one einsum scores all K edits instead of 2K small ones per batch, whose overhead would grow with the number
        of experts."""
        if self._packed_cache[0] != device:
            self._packed_cache = (device, [_pad_keys(keys, device)
                                           for keys in (self.subject_keys, self.relation_keys)])
        return self._packed_cache[1]

    @staticmethod
    def _recall_all(vectors, weights, empty, query, mask, max_elements: int = 1 << 25) -> torch.Tensor:
        """Weighted share of each edit's key tokens matched in each query row, Σ w·max_j cos(key, q_j) / Σ w:
        [batch, edits] (1 where an edit has no such tokens)."""
        batch, length = query.shape[0], query.shape[1]
        step = max(1, max_elements // max(1, batch * length * vectors.shape[1]))
        out = []
        for start in range(0, vectors.shape[0], step):
            keys, w = vectors[start:start + step], weights[start:start + step]
            sims = torch.einsum("eld,btd->belt", keys, query).masked_fill(~mask[:, None, None, :], -1.0)
            recall = (sims.max(-1).values.clamp(min=0) * w).sum(-1) / w.sum(-1).clamp(min=1e-12)
            out.append(torch.where(empty[start:start + step], torch.ones_like(recall), recall))
        return torch.cat(out, -1)

    def _parts(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, n_edits] subject scores, [batch, n_edits] relation scores)."""
        query = F.normalize(batch.hidden_states[self.layer].float(), dim=-1)
        subject_query = F.normalize(batch.hidden_states[self.subject_layer].float(), dim=-1)
        mask = batch.prompt_mask().to(query.device)
        subject, relation = self._packed(query.device)
        return (self._recall_all(*subject, subject_query, mask).cpu(),
                self._recall_all(*relation, query, mask).cpu())

    def _scores(self, batch: PromptBatch) -> torch.Tensor:
        """[batch, n_edits] of min(subject score, relation score)."""
        return torch.minimum(*self._parts(batch))

    def weights(self, batch):
        scores = self._scores(batch)
        best_score, best_edit = scores.max(-1)
        choice = torch.where(best_score >= self.threshold, self.owner[best_edit], torch.tensor(-1))
        self.last_scores = best_score
        return one_hot_choice(choice, self.num_experts)


class SplitScopeRouter(ScopeRouter):
    """The scope router with its subject part and relation part calibrated apart, on the negatives that test each.

    One threshold on min(subject, relation) goes to its cap on KnowEdit: a negative that restates an
    edit's own question (KnowEdit repeats subject-relation pairs across records) scores 1.0 on both parts. Here,
    per (negative, edit) pair: pairs scoring ≥ `restated` on both parts restate the edit and calibrate nothing.

    Subject: how much of an edit's subject a prompt holds does not depend on the relation it asks, so every
    negative about another subject (subject score < `restated`) calibrates it, and each edit gets its own
    threshold, `margin` above the best such negative for that edit: a subject that shares its first name with
    many others ("Mark …") needs more of itself than one that shares nothing, and one look-alike subject ("canton
    of …") raises only its own edit's bar. Whatever the negatives, a prompt must hold more than `subject_floor` of
    the subject (the threshold starts from at least that): with few negatives, "Jorun Ostvik" would otherwise pass
    for "Jorun Zelholt" by a shared rare first name.

    Relation: one threshold, `relation_margin` above the best relation score of the negatives whose subject passes
    (the edited subject asked about another relation). So no kept negative routes, by construction.

    Answer veto: a prompt that asks an edit's question and holds its new answer ("…, which is not <new answer>,
    is": recall of the target's tokens ≥ `target_veto`, or its words in the prompt's text after answer
    normalisation, for tokenizers that glue punctuation to words: the built-in world's "Jorwick," is not
    "Jorwick") asks about the answer, not the fact, and goes to no expert at all (the answer may itself be another
    edit's subject); `target_veto=None` turns this off. Needs each edit's subject and target (`annotate_expert`)."""

    name = "scope-split"

    def __init__(self, layer: int = 0, subject_layer: int | None = None, margin: float = 0.1, quantile: float = 1.0,
                 restated: float = 0.98, target_veto: float | None = 0.9, relation_margin: float | None = 0.7,
                 subject_floor: float = 0.6):
        super().__init__(layer=layer, margin=margin, quantile=quantile, subject_layer=subject_layer)
        self.restated, self.target_veto, self.subject_floor = restated, target_veto, subject_floor
        # The evaluation asks the edited subject about relations no negative asked, and a relation that differs
        # from the edit's by one common word ("religion which …" / "country which …") keeps most of its weighted
        # tokens, so the relation wants more room than the subject (docs/routing.md).
        self.relation_margin = margin if relation_margin is None else relation_margin

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **_):
        self._build_keys(model, tokenizer, negatives)  # the parent's keys; the thresholds are this class's own
        edits = [e for es in expert_edits(model) for e in es]
        self.target_keys = None
        if self.target_veto is not None:
            if any(not e.get("target") for e in edits):
                raise ValueError("the scope-split router's target veto needs each edit's target in the expert's info "
                                 "(t2edit.routing.annotate_expert), or pass target_veto=None")
            self.target_keys = [(states, self.idf(ids)) for ids, _, states, _ in
                                self._tokens(model, tokenizer, [" " + e["target"] for e in edits])]
            self.target_words = [f" {normalize_answer(e['target'])} " for e in edits]
            self.subject_words = [f" {normalize_answer(e['subject'])} " for e in edits]
            self._target_cache = (None,)
        self.subject_threshold = torch.full((len(edits),), 0.8)  # without negatives: a default
        self.relation_threshold = 0.8
        self.dropped = 0
        if negatives:
            parts = [self._parts(b) for b in encode(model, tokenizer, list(negatives), cache=pass1_cache,
                                                    layers=self.layers)]
            subject, relation = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            restating = (subject >= self.restated) & (relation >= self.restated)
            self.dropped = int(restating.any(-1).sum())
            # A negative naming the edited subject is no other subject, even where its tokens differ (BPE splits a
            # name at the start of a prompt otherwise than after a space: "Martín Solares follows" falls short of 1).
            names = [e["subject"] for e in edits]
            same = torch.tensor([[name in text for name in names] for text in negatives], dtype=torch.bool)
            other_subject = torch.where((subject < self.restated) & ~same, subject,
                                        torch.full_like(subject, math.nan))
            self.subject_threshold = self._above(other_subject.clamp(min=self.subject_floor), self.margin)
            other_relation = relation[(subject >= self.subject_threshold) & ~restating]
            if len(other_relation):
                self.relation_threshold = float(self._above(other_relation, self.relation_margin))
        self.threshold = ([round(t, 4) for t in self.subject_threshold.tolist()], self.relation_threshold)
        return self

    def _above(self, scores: torch.Tensor, margin: float) -> torch.Tensor:
        """`margin` of the way from the `quantile` of `scores` (NaN: not counted; per column of a 2-D tensor) to
        1, capped below 1; where a column has no score, the quantile of all of them. Above torch.quantile's input
        limit (2**24 elements) the highest score stands in for any quantile."""
        def closest_of(values: torch.Tensor, dim=None) -> torch.Tensor:
            if values.numel() < 1 << 24:
                return values.nanquantile(self.quantile) if dim is None else values.nanquantile(self.quantile, dim)
            top = values.nan_to_num(nan=-math.inf)
            top = top.max() if dim is None else top.max(dim).values
            return top.masked_fill(top == -math.inf, math.nan)

        overall = closest_of(scores)
        overall = torch.tensor(0.8) if overall.isnan() else overall
        closest = closest_of(scores, 0) if scores.dim() == 2 else overall
        closest = torch.where(closest.isnan(), overall, closest)
        return threshold_above(closest, margin)

    def _target_scores(self, batch) -> torch.Tensor:
        query = F.normalize(batch.hidden_states[self.layer].float(), dim=-1)
        if self._target_cache[0] != query.device:
            self._target_cache = (query.device, _pad_keys(self.target_keys, query.device))
        vectors, weights, empty = self._target_cache[1]
        # An empty target never vetoes.
        recall = self._recall_all(vectors, weights, empty, query, batch.prompt_mask().to(query.device)).cpu()
        return torch.where(empty.cpu()[None], torch.zeros_like(recall), recall)

    def _answer_in_text(self, batch, asked: torch.Tensor, passing: torch.Tensor) -> torch.Tensor:
        """[batch, edits]: the prompt asks the edit's relation and its text holds the edit's new answer, with the
        edit's subject passing (or found as text). Each distinct answer is looked for once per prompt: many edits
        of one relation share answers ("English"), and one test per (prompt, edit) pair would mean ~10⁴ substring
        tests a batch at hundreds of edits."""
        found = torch.zeros_like(asked)
        edits = [e for e in asked.any(0).nonzero().flatten().tolist() if self.target_words[e].strip()]
        if not edits:
            return found
        texts = [f" {normalize_answer(t)} " for t in batch.texts]
        in_text = {words: torch.tensor([words in text for text in texts])
                   for words in {self.target_words[e] for e in edits}}
        found[:, edits] = asked[:, edits] & torch.stack([in_text[self.target_words[e]] for e in edits], 1)
        for row, edit in (found & ~passing).nonzero().tolist():  # subject not passing: found as text, or no veto
            found[row, edit] = self.subject_words[edit] in texts[row]
        return found

    def weights(self, batch):
        subject, relation = self._parts(batch)
        asked = relation >= self.relation_threshold
        passing = (subject >= self.subject_threshold) & asked
        if self.target_keys is not None:
            # A prompt that asks an edit's question and holds its new answer is about that answer, and is left
            # alone by every expert, not only that edit's: the answer may name another edited subject ("The spouse
            # of A, which is not B, is", B's spouse edited too). The subject may also be found as text: a tokenizer
            # may glue punctuation to it ("Norberg,").
            asks_answer = passing & (self._target_scores(batch) >= self.target_veto)
            asks_answer |= self._answer_in_text(batch, asked, passing)
            passing &= ~asks_answer.any(-1, keepdim=True)
        scores = torch.where(passing, torch.minimum(subject, relation), torch.full_like(subject, -1.0))
        best_score, best_edit = scores.max(-1)
        choice = torch.where(best_score >= 0, self.owner[best_edit], torch.tensor(-1))
        self.last_scores = best_score
        return one_hot_choice(choice, self.num_experts)


def _chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _pad_keys(keys: list[tuple[torch.Tensor, torch.Tensor]], device) -> tuple:
    """Per-edit (vectors [n, d], weights [n]) padded into ([edits, tokens, d], [edits, tokens], [edits] empty)
    on `device`; padding weighs 0, so it adds exactly nothing to a weighted recall."""
    width = max([1] + [len(k) for k, _ in keys])
    dim = next((k.shape[-1] for k, _ in keys if len(k)), 1)
    vectors, weights = torch.zeros(len(keys), width, dim), torch.zeros(len(keys), width)
    for e, (k, w) in enumerate(keys):
        vectors[e, :len(k)], weights[e, :len(k)] = k, w
    empty = torch.tensor([len(k) == 0 for k, _ in keys])
    return vectors.to(device), weights.to(device), empty.to(device)


__all__ = ["ScopeRouter", "SplitScopeRouter"]
