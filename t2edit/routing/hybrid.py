"""The hybrid router: scope first, else the embedding router."""
from __future__ import annotations

import torch

from t2edit.routing.base import ExpertRouter
from t2edit.routing.embedding import EmbeddingRouter
from t2edit.routing.pass1 import encode
from t2edit.routing.scope import ScopeRouter


class HybridRouter(ExpertRouter):
    """Scope first (subject + relation in other words: two-hop questions), else the embedding router (its keys
    catch near-copies of the edit prompt, e.g. aliases that change one token)."""

    name = "hybrid"

    def __init__(self, scope: dict | None = None, embedding: dict | None = None):
        self.scope, self.embedding = ScopeRouter(**(scope or {})), EmbeddingRouter(**(embedding or {}))

    @property
    def layers(self) -> tuple[int, ...]:
        return (*self.scope.layers, -1)

    def fit(self, model, tokenizer=None, negatives=(), pass1_cache: dict | None = None, **kwargs):
        super().fit(model)
        # One pass 1 over the negatives for both halves: the layers the scope half keys on and the last one, which
        # the embedding half reads; each half then finds them in the cache.
        cache = {} if pass1_cache is None else pass1_cache
        if negatives:
            encode(model, tokenizer, list(negatives), cache=cache,
                   layers=self.layers)
        self.scope.fit(model, tokenizer, negatives, pass1_cache=cache, **kwargs)
        self.embedding.fit(model, tokenizer, negatives, pass1_cache=cache, **kwargs)
        return self

    def weights(self, batch):
        scope = self.scope.weights(batch)
        return torch.where(scope[:, -1:] == 1, self.embedding.weights(batch), scope)


__all__ = ["HybridRouter"]
