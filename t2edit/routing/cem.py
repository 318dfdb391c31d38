"""The CEM router: Transformer²'s third strategy, one mixture for all prompts found by the cross-entropy method."""
from __future__ import annotations

import math

import torch

from t2edit.batching import left_pad, position_ids
from t2edit.rollouts import greedy_answers
from t2edit.routing.base import expert_edits
from t2edit.routing.fixed import FixedRouter
from t2edit.svf import model_bypassed


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
        generator = torch.Generator().manual_seed(self.seed)
        edits = [e for es in expert_edits(model) for e in es if e.get("target")]
        if not edits:
            raise ValueError("the cem router needs each edit's target in the expert's info (annotate_expert)")
        picked = [edits[i] for i in torch.randperm(len(edits), generator=generator)[:self.shots].tolist()]
        examples = [(e["prompt"], e["target"]) for e in picked]
        negs = [negatives[i] for i in torch.randperm(len(negatives), generator=generator)[:self.shots].tolist()] \
            if negatives else []
        if negs:
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
        prompts = [p for p, _ in examples]
        rows = [tokenizer(p)["input_ids"] + tokenizer(" " + a, add_special_tokens=False)["input_ids"]
                for p, a in examples]
        ends = [len(tokenizer(p)["input_ids"]) - 1 for p in prompts]
        width = max(map(len, rows))
        offset = [width - len(r) for r in rows]
        ids, mask = left_pad(rows, tokenizer.pad_token_id or 0, model.device)
        weights = torch.cat([alpha, 1 - alpha.sum(0, keepdim=True)])[None].expand(len(rows), -1)
        logits = model(input_ids=ids, attention_mask=mask, weights=weights.to(model.device),
                       position_ids=position_ids(mask)).logits.float()
        logp = logits.log_softmax(-1)
        total = []
        for row, (o, e, r) in enumerate(zip(offset, ends, rows)):
            positions = torch.arange(o + e, o + len(r) - 1, device=logits.device)
            total.append(logp[row, positions, ids[row, positions + 1]].mean())
        return torch.stack(total).mean().item()


__all__ = ["CEMRouter"]
