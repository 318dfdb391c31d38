"""What every router shares: the interface, the threshold formula, and the edits an expert holds."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

THRESHOLD_CAP = 1 - 1e-4  # below 1: the keys' own prompts (similarity 1 up to rounding) always pass


def threshold_above(closest, margin: float):
    """`margin` of the way from the closest score of the prompts a router must leave alone to a perfect match,
    capped just below 1. Works on floats and tensors alike."""
    value = closest + margin * (1 - closest)
    return value.clamp(max=THRESHOLD_CAP) if isinstance(value, torch.Tensor) else min(value, THRESHOLD_CAP)


class ExpertRouter:
    """The interface. `fit` may be a no-op; `weights` returns [batch, K + 1] (last column: no expert)."""

    name = "router"

    def fit(self, model, tokenizer=None, negatives: Sequence[str] = (), **_) -> "ExpertRouter":
        self.num_experts = model.num_experts
        return self

    def weights(self, batch) -> torch.Tensor:
        raise NotImplementedError


def one_hot_choice(choice: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[batch] of expert indices (−1: none) → [batch, K + 1] one-hot weights."""
    choice = torch.where(choice < 0, torch.full_like(choice, num_experts), choice)
    return F.one_hot(choice.long(), num_experts + 1).float()


def names_its_subject(subject: str | None, prompt: str) -> bool:
    """Whether an edit's subject is written inside its prompt: the span the scope routers key on."""
    return bool(subject) and subject in prompt


def expert_edits(model) -> list[list[dict]]:
    """Per expert of an AdaptiveModel, its edits ({"prompt", "subject", "target"})."""
    return [list(expert.info.edits) for expert in model.experts]


def edit_entries(records) -> list[dict]:
    """Each edit as an expert records it: its prompt, subject and target (never an evaluation prompt)."""
    return [{"prompt": r.prompt, "subject": r.subject, "target": r.target} for r in records]


def annotate_expert(expert, records) -> None:
    """Record each edit in the expert's info (what the scope / cem / prompt routers read)."""
    expert.info.edits = edit_entries(records)


__all__ = ["ExpertRouter", "THRESHOLD_CAP", "annotate_expert", "edit_entries", "expert_edits", "names_its_subject",
           "one_hot_choice", "threshold_above"]
