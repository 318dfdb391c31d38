"""Routers that do not read the prompt's meaning: one fixed mixture for all prompts, and the evaluation's oracle."""
from __future__ import annotations

from typing import Sequence

import torch

from t2edit.routing.base import ExpertRouter


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


__all__ = ["FixedRouter", "OracleRouter", "UniformRouter"]
