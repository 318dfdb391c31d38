"""IKE (in-context knowledge editing): the weights stay; the new fact and k demonstrations go in front of the
question.

Each demonstration is a "copy" demo built from a training-pool record — `new_fact_context(p, t) + p + " " + t` —
the only kind KnowEdit records yield (EasyEdit's update/retain demos need rephrase and locality prompts, which
here belong to the evaluation). The query context is the demos followed by `new_fact_context(prompt, target)`
of the edit. Demos are ordered least to most similar, so the closest example sits next to the question.

Retrieval is BM25 over words rather than the base model's mean-pooled hidden states, because:
  - it needs no download and no forward pass over the pool (a 1,427-record pool on a 7B model is not free);
  - the signal that ties a question to its fact is word overlap with the subject and relation, which BM25
    weights by rarity (a subject name counts, "the" does not), while mean-pooled states of a causal LM that
    was never trained as an encoder share a few dominant directions, so their cosines crowd together;
  - it is deterministic and independent of the model, so every model sees the same demonstrations.
EasyEdit instead ranks by a sentence-embedding model, which would be a download.

Batch mode: with many edits at once, a question gets the context of the edited fact BM25 ranks highest for
the question text alone (top-1), never anything from the evaluation's labels.
"""
from __future__ import annotations

import math
import re
from collections import Counter

from t2edit.data.records import EditRecord
from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records
from t2edit.leakage import learning_pool
from t2edit.text import copy_demo, new_fact_context

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75) over lower-cased words, with the non-negative IDF
    log(1 + (N - n + 0.5) / (n + 0.5)) so that a word shared by most of a small collection never counts
    against a match."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.term_counts = [Counter(_words(doc)) for doc in documents]
        self.lengths = [sum(counts.values()) for counts in self.term_counts]
        self.mean_length = (sum(self.lengths) / len(self.lengths)) if self.lengths else 0.0
        document_frequency = Counter(word for counts in self.term_counts for word in counts)
        n = len(documents)
        self.idf = {word: math.log(1 + (n - df + 0.5) / (df + 0.5)) for word, df in document_frequency.items()}

    def scores(self, query: str) -> list[float]:
        query_words = _words(query)
        scores = []
        for counts, length in zip(self.term_counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.mean_length) if self.mean_length else self.k1
            scores.append(sum(self.idf[w] * counts[w] * (self.k1 + 1) / (counts[w] + norm)
                              for w in query_words if counts[w]))
        return scores

    def ranked(self, query: str, exclude: set[int] = frozenset()) -> list[int]:
        """Document indices, best first; ties keep document order."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [i for i in order if i not in exclude]


def fact_text(prompt: str, target: str) -> str:
    """What the retriever indexes and queries for a fact: the new-fact sentence."""
    return f"{prompt} {target}"


class IKEEditor(Editor):
    """In-context editing with `k` copy demonstrations retrieved from `train_records`.

    `train_records` must come from a training split or the world's other facts. At edit time the leakage guard
    (t2edit.leakage.learning_pool) decides which of them may be shown: no record whose prompt the evaluation scores
    for the edited records (edit, rephrase, locality, portability). Only `prompt` and `target_new` are shown."""

    name = "ike"

    def __init__(self, train_records: list[EditRecord] | None = None, k: int = 4):
        if k < 0:
            raise EditInputError(f"IKE needs k >= 0 demonstrations, got k={k}")
        self.train_records = list(train_records or [])
        pool = [(r.prompt, r.target) for r in self.train_records if r.target_new and r.prompt.strip()]
        if k > 0 and not pool:
            raise EditInputError("IKE needs a pool of training records for its demonstrations: pass "
                                 "train_records=[...] (from a training split, never the evaluated records), "
                                 "or use k=0 (the 'prompt' editor)")
        self.k = k
        self.pool = pool
        self.pool_index = BM25([fact_text(p, t) for p, t in pool])  # over the whole pool: rankings do not shift

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        excluded: set[int] = set()
        if self.k > 0:  # the guard decides which pool records may be shown
            allowed = set(learning_pool(records, self.train_records, anchors_per_edit=0).demonstrations)
            excluded = {i for i, demo in enumerate(self.pool) if demo not in allowed}
        contexts = [self.demonstrations(r.prompt, r.target, excluded) + new_fact_context(r.prompt, r.target)
                    for r in records]
        if len(contexts) == 1:
            only = contexts[0]
            return EditedModel(model=model, context=lambda prompt: only)
        fact_index = BM25([fact_text(r.prompt, r.target) for r in records])
        return EditedModel(model=model, context=lambda prompt: contexts[fact_index.ranked(prompt)[0]])

    def demonstrations(self, prompt: str, target: str, excluded: set[int]) -> str:
        if self.k == 0:
            return ""
        best_first = self.pool_index.ranked(fact_text(prompt, target), exclude=excluded)[: self.k]
        return "".join(copy_demo(*self.pool[i]) for i in reversed(best_first))
