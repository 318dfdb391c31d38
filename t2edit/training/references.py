"""What the unedited model says, kept across the experts trained on one base model.

Every expert of a single-edit run or a stream anchors locality on much the same neighbour prompts, and its own
router is calibrated on much the same negatives; the unedited model's side of those is the same for every expert.
`UneditedModelCache` holds it, so it is computed once per base model rather than once per edit:

* each neighbour's greedy answer (the answer a neighbour keeps), as token ids at the largest budget asked so far;
  a smaller budget is served by cutting them (greedy decoding of n tokens is the first n of a longer decoding);
* the unedited log-probabilities at each neighbour answer's tokens (the KL anchor's reference), bounded in bytes,
  least recently used first out;
* each calibration negative's pass-1 state (`t2edit.routing.pass1.stored_last_states`).

A cache belongs to one base model and one precision: its owner drops it when either changes.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from t2edit.rollouts import HFRollouts

DEFAULT_LOGPROB_BYTES = 1 << 30


class UneditedModelCache:
    def __init__(self, max_logprob_bytes: int = DEFAULT_LOGPROB_BYTES):
        self.negative_states: dict = {}
        self._answer_ids: dict[str, tuple[int, list[int]]] = {}  # prompt -> (budget, greedy ids)
        self._logprobs: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._logprob_bytes, self.max_logprob_bytes = 0, max_logprob_bytes
        self.generated = 0  # prompts whose answers were generated (not served from the cache)
        self.computed = 0  # rows whose reference log-probabilities were computed

    # -- greedy answers -------------------------------------------------------------------------------------------
    def missing_answers(self, prompts, budget: int) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if self._answer_ids.get(p, (0, None))[0] < budget]

    def greedy_answers(self, model, tokenizer, prompts: list[str], budget: int, extra: list[str] = ()) -> list[str]:
        """The greedy answers of `model` (the caller bypasses the expert) within `budget` tokens; prompts not yet
        answered at this budget are generated in one call, together with those of `extra` (the prompts the next
        steps will ask for: on a CPU a call costs about the same for a few prompts as for a hundred)."""
        missing = self.missing_answers(prompts, budget)
        if missing:
            missing += [p for p in self.missing_answers(extra, budget) if p not in missing]
            groups = HFRollouts(model, tokenizer, batch_size=128).sample(missing, 1, 0.0, budget)
            self._answer_ids.update((p, (budget, list(g[0]))) for p, g in zip(missing, groups))
            self.generated += len(missing)
        return [tokenizer.decode(self._answer_ids[p][1][:budget], skip_special_tokens=True).strip()
                for p in prompts]

    # -- reference log-probabilities --------------------------------------------------------------------------------
    def logprobs(self, key: tuple) -> torch.Tensor | None:
        found = self._logprobs.get(key)
        if found is not None:
            self._logprobs.move_to_end(key)
        return found

    def keep_logprobs(self, key: tuple, value: torch.Tensor) -> None:
        self.computed += 1
        size = value.numel() * value.element_size()
        if size > self.max_logprob_bytes or key in self._logprobs:
            return
        self._logprobs[key] = value
        self._logprob_bytes += size
        while self._logprob_bytes > self.max_logprob_bytes:
            _, dropped = self._logprobs.popitem(last=False)
            self._logprob_bytes -= dropped.numel() * dropped.element_size()


__all__ = ["UneditedModelCache"]
