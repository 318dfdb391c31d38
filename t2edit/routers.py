"""Routers: pass 1 of `t2edit.adaptation.AdaptiveModel`. Each maps a batch of prompts to a weight per expert plus
"no expert" (the last column); all share one small interface:

    router = get_router("scope")
    router.fit(adaptive_model, tokenizer, negatives=[...])   # once, from the experts and training-side prompts
    router.weights(prompt_batch)                              # [batch, K + 1], rows sum to 1

| name       | decides from                                            | fitted on                                  |
|------------|---------------------------------------------------------|--------------------------------------------|
| embedding  | last-token state vs each expert's keys (nearest wins)    | the experts' own keys and thresholds       |
| scope      | the edited subject's and relation's tokens, soft-matched | edit prompts + subjects; negatives         |
| scope-split| scope, subject and relation parts calibrated apart      | edit prompts + subjects + targets; negatives |
| hybrid     | scope, else embedding                                    | both                                       |
| classifier | a linear probe on the last-token state, "none" class     | edit prompts (class k), negatives ("none") |
| prompt     | the model's own likelihood of each expert's description  | nothing (Transformer²'s first strategy)    |
| cem        | one mixture for all prompts, found by the cross-entropy method on a handful of labelled examples    |
| oracle     | the evaluation's own assignment of prompts to experts (a reference, never a product router)         |
| uniform    | 1/K on every expert                                      | nothing                                    |

Negatives are prompts the experts must leave alone that the evaluation does not score (other facts, and the
edited subjects asked about other relations): never an edited record's locality / portability / rephrase prompt.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from t2edit.adaptation import AdaptiveModel, PromptBatch
from t2edit.text import normalize_answer


class ExpertRouter:
    """The interface. `fit` may be a no-op; `weights` returns [batch, K + 1] (last column: no expert)."""

    name = "router"

    def fit(self, model: AdaptiveModel, tokenizer=None, negatives: Sequence[str] = (), **_) -> "ExpertRouter":
        self.num_experts = model.num_experts
        return self

    def weights(self, batch: PromptBatch) -> torch.Tensor:
        raise NotImplementedError


def one_hot_choice(choice: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[batch] of expert indices (−1: none) → [batch, K + 1] one-hot weights."""
    choice = torch.where(choice < 0, torch.full_like(choice, num_experts), choice)
    return F.one_hot(choice.long(), num_experts + 1).float()


def edits_of(expert) -> list[dict]:
    """An expert's edits as {"prompt", "subject", "target"}: the list `annotate_expert` writes, else its edit prompts
    alone (experts trained before the trainer wrote subjects stored only the number of edits under "edits")."""
    edits = expert.info.get("edits")
    if isinstance(edits, list):
        return list(edits)
    return [{"prompt": p} for p in expert.info.get("edit_prompts", [])]


def names_its_subject(subject: str | None, prompt: str) -> bool:
    """Whether an edit's subject is written inside its prompt: the span the scope routers key on."""
    return bool(subject) and subject in prompt


def expert_edits(model: AdaptiveModel) -> list[list[dict]]:
    """Per expert, its edits (`edits_of`)."""
    return [edits_of(expert) for expert in model.experts]


@torch.no_grad()
def encode(model: AdaptiveModel, tokenizer, prompts: Sequence[str], batch_size: int = 64,
           cache: dict | None = None, layers: Sequence[int] | None = None) -> list[PromptBatch]:
    """Pass 1 over prompts (no answers), in batches. `layers`: the hidden states the caller reads (−1: the last);
    the others are dropped (None), so thousands of negatives keep 1–2 layers, not all of them (SmolLM2: 31).
    `cache`: a dict the caller keeps for one unedited base model (pass 1 never sees the experts), so the same
    prompts run once: an evaluation in single mode fits a router per edit on the same negatives. Measured on
    SmolLM2-135M, scope-split, 3,776 negatives: fits 153 / 4.7 / 4.4 s and 13.6 GB peak memory before, 132 / 4.1 /
    4.1 s and 3.4 GB with both."""
    if tokenizer.padding_side != "left":
        raise ValueError("routing reads each prompt's last token; set tokenizer.padding_side = 'left'")
    key = (tuple(prompts), batch_size, None if layers is None else tuple(sorted(set(layers))))
    if cache is not None:
        hit = _cached_pass1(cache, key)
        if hit is not None:
            return hit
    batches = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(model.device)
        batch = model.pass1(enc["input_ids"], enc["attention_mask"])
        if layers is not None:
            keep = {layer % len(batch.hidden_states) for layer in layers}
            batch.hidden_states = tuple(h if i in keep else None for i, h in enumerate(batch.hidden_states))
        batches.append(batch)
    if cache is not None:
        cache[key] = batches
    return batches


def _cached_pass1(cache: dict, key: tuple) -> list[PromptBatch] | None:
    """A cached pass 1 over the same prompts that kept every layer `key` asks for (it may have kept more: the
    hybrid router runs one pass for the layers of both its halves)."""
    if key in cache:
        return cache[key]
    prompts, batch_size, layers = key
    for (other_prompts, other_size, _), batches in cache.items():
        if other_prompts != prompts or other_size != batch_size or not batches:
            continue
        kept = {i for i, h in enumerate(batches[0].hidden_states) if h is not None}
        count = len(batches[0].hidden_states)
        if layers is not None and {layer % count for layer in layers} <= kept:
            return batches
    return None


# ---------------------------------------------------------------------------------------------------- embedding

class EmbeddingRouter(ExpertRouter):
    """Today's `t2edit.routing.Router` for K experts: each expert's keys (the unedited model's last-token states
    of its edit prompts) and calibrated threshold, saved with the expert. A prompt goes to the expert with the
    nearest key among those whose threshold it passes; below every threshold, to no expert.

    Each expert's threshold was calibrated on that expert's own training neighbours only; with many experts a
    prompt may sit close to another expert's keys. Given `negatives`, each threshold is raised (never lowered)
    to `margin` of the way from the closest negative to 1 (measured on 100 single-edit experts: locality
    83.4 → see README). Without negatives (one expert, as `RoutedModel`) the saved thresholds are used as they are."""

    name = "embedding"

    def __init__(self, margin: float = 0.5):
        self.margin = margin

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **_):
        super().fit(model)
        missing = [n for n, e in zip(model.expert_names(), model.experts) if e.router is None]
        if missing:
            raise ValueError(f"expert(s) {missing[:3]} have no router keys (mixtures, or trained by an older t2edit); "
                             f"use --router scope / classifier, or retrain them")
        self.keys = [e.router.keys.float() for e in model.experts]
        # All experts' keys in one matrix and the expert each row belongs to: one matmul per batch, whatever K.
        self.all_keys = torch.cat(self.keys)
        self.key_owner = torch.cat([torch.full((len(k),), i) for i, k in enumerate(self.keys)])
        self.thresholds = torch.tensor([e.router.threshold for e in model.experts])
        if negatives:
            states = F.normalize(torch.cat([b.last_state.float().cpu() for b in encode(
                model, tokenizer, list(negatives), cache=pass1_cache, layers=[-1])]), dim=-1)
            closest = self._per_expert_max(states @ self.all_keys.T).max(0).values
            self.thresholds = torch.maximum(self.thresholds, (closest + self.margin * (1 - closest)).clamp(
                max=1 - 1e-4))
        return self

    def _per_expert_max(self, sims: torch.Tensor) -> torch.Tensor:
        """[rows, all keys] → [rows, K]: each expert's highest similarity among its own keys."""
        out = torch.full((sims.shape[0], len(self.keys)), -math.inf)
        return out.scatter_reduce(1, self.key_owner.expand(sims.shape[0], -1), sims, "amax")

    def similarities(self, batch) -> torch.Tensor:
        states = F.normalize(batch.last_state.float(), dim=-1).cpu()
        return self._per_expert_max(states @ self.all_keys.T)

    def weights(self, batch):
        sims = self.similarities(batch)
        passing = sims >= self.thresholds
        best = torch.where(passing, sims, torch.full_like(sims, -math.inf)).argmax(-1)
        return one_hot_choice(torch.where(passing.any(-1), best, -1), self.num_experts)


# ---------------------------------------------------------------------------------------------------- scope

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
        # repeats some (subject, relation) pairs across records, and one such negative scores 1.0 (measured).
        self.layer, self.margin, self.fixed_threshold, self.quantile = layer, margin, threshold, quantile
        # The subject's tokens may be keyed at another layer than the relation's (aliases share meaning, not tokens).
        self.subject_layer = layer if subject_layer is None else subject_layer

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **_):
        self._build_keys(model, tokenizer, negatives)
        if self.fixed_threshold is not None:
            self.threshold = self.fixed_threshold
        elif negatives:
            best = torch.cat([self._scores(b).max(-1).values
                              for b in encode(model, tokenizer, list(negatives), cache=pass1_cache,
                                              layers=[self.layer, self.subject_layer])])
            closest = best.quantile(self.quantile).item()
            self.threshold = min(closest + self.margin * (1 - closest), 1 - 1e-4)
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
                             f"lack it, e.g. {lacking[0]!r}: write it with t2edit.routers.annotate_expert, or "
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
            pb = model.pass1(enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device))
            states = F.normalize(pb.hidden_states[self.layer].float(), dim=-1).cpu()
            subject_states = F.normalize(pb.hidden_states[self.subject_layer].float(), dim=-1).cpu()
            for row in range(len(chunk)):
                pos = [p for p, (i, m) in enumerate(zip(enc["input_ids"][row].tolist(),
                                                        enc["attention_mask"][row].tolist())) if m and i not in special]
                offsets = [tuple(o) for o in enc["offset_mapping"][row, pos].tolist()]
                yield enc["input_ids"][row, pos].tolist(), offsets, states[row, pos], subject_states[row, pos]

    def _packed(self, device) -> tuple:
        """Every edit's subject and relation keys padded into [edits, tokens, d] tensors (`_pad_keys`) on `device`:
        one einsum scores all K edits instead of 2K small ones per batch (what made routing cost grow with the
        number of experts)."""
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

    One threshold on min(subject, relation) went to its cap on KnowEdit (README): a negative that restates an
    edit's own question (KnowEdit repeats subject-relation pairs across records) scores 1.0 on both parts. Here,
    per (negative, edit) pair: pairs scoring ≥ `restated` on both parts restate the edit and calibrate nothing.

    Subject: how much of an edit's subject a prompt holds does not depend on the relation it asks, so every
    negative about another subject (subject score < `restated`) calibrates it, and each edit gets its own
    threshold, `margin` above the best such negative for that edit: a subject that shares its first name with
    many others ("Mark …") needs more of itself than one that shares nothing, and one look-alike subject ("canton
    of …") raises only its own edit's bar. Whatever the negatives, a prompt must hold more than `subject_floor` of
    the subject (the threshold starts from at least that): with few negatives, "Jorun Ostvik" would otherwise pass
    for "Jorun Zelholt" by a shared rare first name (measured on the built-in world's sequential curve).

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
        # tokens, so the relation wants more room than the subject (README, "Routing on SmolLM2-135M").
        self.relation_margin = margin if relation_margin is None else relation_margin

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **_):
        self._build_keys(model, tokenizer, negatives)  # the parent's keys; the thresholds are this class's own
        edits = [e for es in expert_edits(model) for e in es]
        self.target_keys = None
        if self.target_veto is not None:
            if any(not e.get("target") for e in edits):
                raise ValueError("the scope-split router's target veto needs each edit's target in the expert's info "
                                 "(t2edit.routers.annotate_expert), or pass target_veto=None")
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
                                                    layers=[self.layer, self.subject_layer])]
            subject, relation = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            restating = (subject >= self.restated) & (relation >= self.restated)
            self.dropped = int(restating.any(-1).sum())
            # A negative naming the edited subject is no other subject, even where its tokens differ (BPE splits a
            # name at the start of a prompt otherwise than after a space: "Martín Solares follows" scores 0.95).
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
        return (closest + margin * (1 - closest)).clamp(max=1 - 1e-4)

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
        of one relation share answers ("English"), and one test per (prompt, edit) pair cost ~10⁴ substring tests
        a batch at hundreds of edits."""
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


class HybridRouter(ExpertRouter):
    """Scope first (subject + relation in other words: two-hop questions), else the embedding router (its keys
    catch near-copies of the edit prompt, e.g. aliases that change one token)."""

    name = "hybrid"

    def __init__(self, scope: dict | None = None, embedding: dict | None = None):
        self.scope, self.embedding = ScopeRouter(**(scope or {})), EmbeddingRouter(**(embedding or {}))

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **kwargs):
        super().fit(model)
        # One pass 1 over the negatives for both halves: the layers the scope half keys on and the last one, which
        # the embedding half reads; each half then finds them in the cache.
        cache = {} if pass1_cache is None else pass1_cache
        if negatives:
            encode(model, tokenizer, list(negatives), cache=cache,
                   layers=[self.scope.layer, self.scope.subject_layer, -1])
        self.scope.fit(model, tokenizer, negatives, pass1_cache=cache, **kwargs)
        self.embedding.fit(model, tokenizer, negatives, pass1_cache=cache, **kwargs)
        return self

    def weights(self, batch):
        scope = self.scope.weights(batch)
        return torch.where(scope[:, -1:] == 1, self.embedding.weights(batch), scope)


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


# ---------------------------------------------------------------------------------------------------- classifier

class ClassifierRouter(ExpertRouter):
    """A linear probe on the unedited model's last-token state (centred on the negatives' mean, unit norm), with
    K + 1 classes: expert k from its edit prompts, "none" from the negatives; classes weighted to balance."""

    name = "classifier"

    def __init__(self, steps: int = 300, lr: float = 0.05, min_confidence: float = 0.5):
        self.steps, self.lr, self.min_confidence = steps, lr, min_confidence

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **_):
        super().fit(model)
        if not negatives:
            raise ValueError("the classifier router needs negative prompts (other facts) to learn 'none'")
        prompts, labels = [], []
        for k, edits in enumerate(expert_edits(model)):
            prompts += [e["prompt"] for e in edits]
            labels += [k] * len(edits)
        labels += [model.num_experts] * len(negatives)
        # Edit prompts and negatives in separate passes: the negatives' states are the same for every fit.
        states = torch.cat([b.last_state.float().cpu() for b in encode(model, tokenizer, prompts, layers=[-1])
                            + encode(model, tokenizer, list(negatives), cache=pass1_cache, layers=[-1])])
        self.centre = states[len(prompts):].mean(0)
        x = F.normalize(states - self.centre, dim=-1)
        y = torch.tensor(labels)
        counts = torch.bincount(y, minlength=model.num_experts + 1).float().clamp(min=1)
        probe = torch.nn.Linear(x.shape[1], model.num_experts + 1)
        optimizer = torch.optim.Adam(probe.parameters(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = F.cross_entropy(probe(x) * 10, y, weight=1.0 / counts)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.probe = probe.eval()
        return self

    @torch.no_grad()
    def weights(self, batch):
        x = F.normalize(batch.last_state.float().cpu() - self.centre, dim=-1)
        probs = (self.probe(x) * 10).softmax(-1)
        confidence, choice = probs.max(-1)
        choice = torch.where((choice < self.num_experts) & (confidence >= self.min_confidence), choice, -1)
        return one_hot_choice(choice, self.num_experts)


# ---------------------------------------------------------------------------------------------------- prompt

class PromptRouter(ExpertRouter):
    """Transformer²'s first strategy: the model itself is asked which expert's topic the question is about. Each
    expert is described by its edits' subjects (or prompts); the option whose description the model finds most
    likely after the question (mean log-probability per token) wins, "none of these" included. Costs K + 1
    extra forwards per batch; small models are poor at this (measured, README)."""

    name = "prompt"
    TEMPLATE = "Question: {prompt}\nThe question is about:"
    NONE = "none of these"

    def fit(self, model, tokenizer=None, negatives=(), **_):
        super().fit(model)
        self.model, self.tokenizer = model, tokenizer
        self.descriptions = [", ".join(dict.fromkeys(e.get("subject") or e["prompt"] for e in edits))
                             for edits in expert_edits(model)] + [self.NONE]
        return self

    @torch.no_grad()
    def weights(self, batch):
        questions = [self.TEMPLATE.format(prompt=t) for t in batch.texts]
        scores = torch.stack([self._loglik(questions, " " + d) for d in self.descriptions], -1)
        choice = scores.argmax(-1)
        return one_hot_choice(torch.where(choice == self.num_experts, -1, choice), self.num_experts)

    def _loglik(self, contexts: list[str], continuation: str) -> torch.Tensor:
        tok = self.tokenizer
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        rows = [tok(c)["input_ids"] + cont for c in contexts]
        width = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.model.device)
        with model_bypassed_ctx(self.model):
            logits = self.model.svf_model(input_ids=ids, attention_mask=mask,
                                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
        logp = logits[:, -len(cont) - 1:-1].log_softmax(-1)
        target = ids[:, -len(cont):]
        return logp.gather(-1, target[..., None])[..., 0].mean(-1).cpu()


def model_bypassed_ctx(model: AdaptiveModel):
    from t2edit.svf import model_bypassed

    return model_bypassed(model.svf_model)


# ---------------------------------------------------------------------------------------------------- fixed mixes

class FixedRouter(ExpertRouter):
    """The same weights for every prompt."""

    name = "fixed"

    def __init__(self, weights: Sequence[float] | None = None):
        self.fixed = None if weights is None else torch.tensor(list(weights), dtype=torch.float32)

    def weights(self, batch):
        return self.fixed[None, :].expand(batch.input_ids.shape[0], -1).clone()


class UniformRouter(FixedRouter):
    """1/K on every expert, nothing on "none": the reference for mixing without routing."""

    name = "uniform"

    def fit(self, model, tokenizer=None, negatives=(), **_):
        super().fit(model)
        k = model.num_experts
        self.fixed = torch.tensor([1.0 / k] * k + [0.0])
        return self


class CEMRouter(FixedRouter):
    """Transformer²'s third strategy: one mixture α for all prompts, searched by the cross-entropy method to
    maximise the mean log-probability of the right answers on a handful of labelled examples. z = z_neutral +
    Σ αₖ (zₖ − z_neutral), through the same mask function as training (Transformer²'s code applies no sigmoid
    here). Examples: up to `shots` edit prompts with their targets, and as many negatives with the unedited
    model's own answers."""

    name = "cem"

    def __init__(self, shots: int = 8, population: int = 16, elites: int = 4, iterations: int = 6, seed: int = 0):
        self.shots, self.population, self.elites, self.iterations, self.seed = shots, population, elites, iterations, seed

    def fit(self, model, tokenizer=None, negatives=(), **_):
        super().fit(model)
        from t2edit.training import greedy_answers

        generator = torch.Generator().manual_seed(self.seed)
        edits = [e for es in expert_edits(model) for e in es if e.get("target")]
        if not edits:
            raise ValueError("the cem router needs each edit's target in the expert's info (annotate_expert)")
        picked = [edits[i] for i in torch.randperm(len(edits), generator=generator)[:self.shots].tolist()]
        examples = [(e["prompt"], e["target"]) for e in picked]
        negs = [negatives[i] for i in torch.randperm(len(negatives), generator=generator)[:self.shots].tolist()] \
            if negatives else []
        if negs:
            from t2edit.svf import model_bypassed

            with model_bypassed(model.svf_model):
                answers = greedy_answers(model.svf_model, tokenizer, negs, 8)
            examples += [(p, a) for p, a in zip(negs, answers) if a]
        k = model.num_experts
        mean, std = torch.full((k,), 1.0 / k), torch.full((k,), 0.5)
        best, best_score = mean.clone(), -math.inf
        for _ in range(self.iterations):
            samples = mean + std * torch.randn(self.population, k, generator=generator)
            scores = torch.tensor([self._fitness(model, tokenizer, examples, a) for a in samples])
            top = scores.topk(self.elites).indices
            if scores[top[0]] > best_score:
                best_score, best = scores[top[0]].item(), samples[top[0]].clone()
            mean, std = samples[top].mean(0), samples[top].std(0) + 1e-3
        self.alpha = best
        self.fixed = torch.cat([best, 1 - best.sum(0, keepdim=True)])
        return self

    @staticmethod
    @torch.no_grad()
    def _fitness(model, tokenizer, examples, alpha) -> float:
        from t2edit.evaluation.metrics import teacher_forced_predictions  # noqa: F401  (same scoring family)

        prompts = [p for p, _ in examples]
        rows = [tokenizer(p)["input_ids"] + tokenizer(" " + a, add_special_tokens=False)["input_ids"]
                for p, a in examples]
        ends = [len(tokenizer(p)["input_ids"]) - 1 for p in prompts]
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id or 0
        offset = [width - len(r) for r in rows]
        ids = torch.tensor([[pad] * o + r for o, r in zip(offset, rows)], device=model.device)
        mask = torch.tensor([[0] * o + [1] * len(r) for o, r in zip(offset, rows)], device=model.device)
        weights = torch.cat([alpha, 1 - alpha.sum(0, keepdim=True)])[None].expand(len(rows), -1)
        logits = model(input_ids=ids, attention_mask=mask, weights=weights.to(model.device),
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
        logp = logits.log_softmax(-1)
        total = []
        for row, (o, e, r) in enumerate(zip(offset, ends, rows)):
            positions = torch.arange(o + e, o + len(r) - 1, device=logits.device)
            total.append(logp[row, positions, ids[row, positions + 1]].mean())
        return torch.stack(total).mean().item()


# ---------------------------------------------------------------------------------------------------- oracle

class OracleRouter(ExpertRouter):
    """Evaluation only: each scored prompt goes where the evaluation says (the expert holding its record's edit;
    no expert for locality prompts). `assignments` maps prompt text → {expert index: weight} (empty: none)."""

    name = "oracle"

    def __init__(self, assignments: dict[str, dict[int, float]]):
        self.assignments = {k.strip(): v for k, v in assignments.items()}

    def weights(self, batch):
        out = torch.zeros(len(batch.texts), self.num_experts + 1)
        for row, text in enumerate(batch.texts):
            mix = self.assignments.get(text.strip(), {})
            if not mix:
                out[row, -1] = 1.0
            for k, w in mix.items():
                out[row, k] = w
            if mix:
                out[row, -1] = 1.0 - sum(mix.values())
        return out


ROUTERS = {"embedding": EmbeddingRouter, "scope": ScopeRouter, "scope-split": SplitScopeRouter, "hybrid": HybridRouter, "classifier": ClassifierRouter,
           "prompt": PromptRouter, "cem": CEMRouter, "uniform": UniformRouter, "oracle": OracleRouter}
AUTOMATIC = ("embedding", "scope", "scope-split", "hybrid", "classifier", "prompt", "cem")


def get_router(name: str, **kwargs) -> ExpertRouter:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    return ROUTERS[name](**kwargs)


def annotate_expert(expert, records) -> None:
    """Record each edit's subject, prompt and target in the expert's info (what the scope / cem / prompt routers
    read). Only the edit itself is written: never an evaluation prompt."""
    expert.info["edits"] = [{"prompt": r.prompt, "subject": r.subject, "target": r.target} for r in records]


__all__ = ["AUTOMATIC", "CEMRouter", "ClassifierRouter", "EmbeddingRouter", "ExpertRouter", "FixedRouter", "HybridRouter",
           "OracleRouter", "PromptRouter", "ROUTERS", "ScopeRouter", "SplitScopeRouter", "UniformRouter", "annotate_expert",
           "edits_of", "expert_edits", "get_router", "names_its_subject", "one_hot_choice"]
