"""The prompt router: the model itself is asked which expert's topic a question is about."""
from __future__ import annotations

import torch

from t2edit.batching import left_pad, position_ids
from t2edit.routing.base import ExpertRouter, expert_edits, one_hot_choice
from t2edit.svf import model_bypassed


class PromptRouter(ExpertRouter):
    """Transformer²'s first strategy: the model itself is asked which expert's topic the question is about. Each
    expert is described by its edits' subjects (or prompts); the option whose description the model finds most
    likely after the question (mean log-probability per token) wins, "none of these" included. Costs K + 1
    extra forwards per batch; small models are poor at this (docs/routing.md)."""

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
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask = left_pad(rows, pad, self.model.device)
        with model_bypassed(self.model.svf_model):
            logits = self.model.svf_model(input_ids=ids, attention_mask=mask,
                                          position_ids=position_ids(mask)).logits.float()
        logp = logits[:, -len(cont) - 1:-1].log_softmax(-1)
        target = ids[:, -len(cont):]
        return logp.gather(-1, target[..., None])[..., 0].mean(-1).cpu()


__all__ = ["PromptRouter"]
