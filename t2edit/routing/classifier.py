"""The classifier router: a linear probe on the unedited model's last-token state."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from t2edit.routing.base import ExpertRouter, expert_edits, one_hot_choice
from t2edit.routing.pass1 import last_states


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
        states = torch.cat([last_states(model, tokenizer, prompts),
                            last_states(model, tokenizer, list(negatives), cache=pass1_cache)])
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


__all__ = ["ClassifierRouter"]
