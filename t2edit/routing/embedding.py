"""The embedding router: each expert's own keys (the unedited model's last-token states of its edit prompts) and
threshold, as saved with the expert; and how an expert's own router is calibrated when it is trained.

The threshold is calibrated from prompts the expert must leave alone (the neighbours and same-subject anchors of
training, never the evaluation's prompts): `margin` of the way from the most similar of them to a perfect match.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from t2edit.experts import OwnRouter
from t2edit.routing.base import ExpertRouter, one_hot_choice, threshold_above
from t2edit.routing.pass1 import last_states, stored_last_states


def calibrate_own_router(svf_model, tokenizer, edit_prompts: Sequence[str], negative_prompts: Sequence[str],
                         margin: float = 0.5, negative_states: dict | None = None) -> OwnRouter:
    """Keys from the edit prompts; threshold `margin` of the way from the closest negative prompt to 1.
    `negative_states`: a prompt -> state store kept for one base model (`stored_last_states`), so a stream of
    experts encodes each negative once."""
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"route_margin={margin} must lie in [0, 1] (0: just above the closest neighbour, 1: "
                         f"only the edit prompts themselves)")
    router = OwnRouter(keys=F.normalize(last_states(svf_model, tokenizer, list(edit_prompts)), dim=-1),
                       threshold=-1.0)
    states = last_states(svf_model, tokenizer, list(negative_prompts)) if negative_states is None else \
        stored_last_states(svf_model, tokenizer, list(negative_prompts), negative_states)
    closest = router.similarity(states).max().item() if negative_prompts else 0.0
    router.threshold = threshold_above(closest, margin)
    return router


class EmbeddingRouter(ExpertRouter):
    """A `t2edit.routing.ExpertRouter` for K experts: each expert's keys (the unedited model's last-token states
    of its edit prompts) and calibrated threshold, saved with the expert. A prompt goes to the expert with the
    nearest key among those whose threshold it passes; below every threshold, to no expert.

    Each expert's threshold was calibrated on that expert's own training neighbours only; with many experts a
    prompt may sit close to another expert's keys. Given `negatives`, each threshold is raised (never lowered)
    to `margin` of the way from the closest negative to 1. Without negatives (one
    expert answering alone) the saved thresholds are used as they are."""

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
            states = F.normalize(last_states(model, tokenizer, list(negatives), cache=pass1_cache), dim=-1)
            closest = self._per_expert_max(states @ self.all_keys.T).max(0).values
            self.thresholds = torch.maximum(self.thresholds, threshold_above(closest, self.margin))
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


__all__ = ["EmbeddingRouter", "calibrate_own_router"]
