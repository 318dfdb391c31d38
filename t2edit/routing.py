"""Two-pass inference: decide per prompt whether an expert applies, then answer with it or without it.

Pass 1 runs the unedited model (SVF layers bypassed) and takes its last hidden state at the prompt's last token.
The expert applies when that state lies within the router's cosine threshold of one of its keys: the same state
for each edit prompt the expert was trained on (keys as in GRACE; two passes as in Transformer²). Pass 2 answers,
with the expert on the routed rows of the batch only.

The threshold is calibrated when the expert is trained, from prompts the expert must leave alone — the neighbour
prompts and same-subject anchors of training, never the evaluation's prompts: it sits `margin` of the way from
the most similar of those to a perfect match.

    router = calibrate_router(svf_model, tokenizer, edit_prompts, negative_prompts)
    routed = RoutedModel(svf_model, router)      # drop-in for the evaluation: forward() and generate()
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2edit.svf import SVFModel, model_bypassed, rows_routed


@dataclass
class Router:
    keys: torch.Tensor  # [n_edits, hidden], unit norm
    threshold: float

    def similarity(self, states: torch.Tensor) -> torch.Tensor:
        """Highest cosine similarity of each state to any key."""
        keys = self.keys.to(states.device, torch.float32)
        return (F.normalize(states.float(), dim=-1) @ keys.T).max(-1).values

    def applies(self, states: torch.Tensor) -> torch.Tensor:
        return self.similarity(states) >= self.threshold


@torch.no_grad()
def prompt_states(model: SVFModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  last: torch.Tensor | None = None) -> torch.Tensor:
    """The unedited model's last hidden state at position `last` of each row (default: the final position, the
    prompt's end in a left-padded batch)."""
    if last is None:
        last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count from each row's first token
    with model_bypassed(model):  # logits_to_keep=1: the router needs hidden states, not a vocabulary per position
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def encode_prompts(model: SVFModel, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    if tokenizer.padding_side != "left":
        raise ValueError("routing reads the state at each prompt's last token; set tokenizer.padding_side = 'left'")
    states = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
        states.append(prompt_states(model, batch["input_ids"], batch["attention_mask"]).float().cpu())
    return torch.cat(states) if states else torch.zeros(0, model.config.hidden_size)


def calibrate_router(model: SVFModel, tokenizer, edit_prompts: list[str], negative_prompts: list[str],
                     margin: float = 0.5) -> Router:
    """Keys from the edit prompts; threshold `margin` of the way from the closest negative prompt to 1."""
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"route_margin={margin} must lie in [0, 1] (0: just above the closest neighbour, 1: "
                         f"only the edit prompts themselves)")
    keys = F.normalize(encode_prompts(model, tokenizer, edit_prompts), dim=-1)
    router = Router(keys=keys, threshold=-1.0)
    closest = router.similarity(encode_prompts(model, tokenizer, negative_prompts)).max().item() \
        if negative_prompts else 0.0
    # Capped just below 1 so the edit prompts themselves always route (their similarity is 1 up to rounding).
    router.threshold = min(closest + margin * (1.0 - closest), 1.0 - 1e-4)
    return router


class TwoPassModel(nn.Module):
    """What a two-pass wrapper around `self.svf_model` shows the evaluation and `generate`: the attributes a
    transformers model has. Shared by `RoutedModel` (one expert) and `t2edit.adaptation.AdaptiveModel` (K)."""

    routes_on_prompt = True  # the evaluation passes prompt_end when it feeds prompt + answer
    svf_model: SVFModel

    @property
    def config(self):
        return self.svf_model.config

    @property
    def generation_config(self):
        return self.svf_model.base_model.generation_config

    @property
    def device(self):
        return self.svf_model.device


class RoutedModel(TwoPassModel):
    """An SVF model behind a router: each row of a batch runs with the expert only if the router picks its prompt.

    `forward(..., prompt_end=[...])` gives the index of each row's last prompt token when the input also holds
    an answer (teacher forcing); without it the final position is the prompt's end (generation)."""

    def __init__(self, svf_model: SVFModel, router: Router):
        super().__init__()
        self.svf_model, self.router = svf_model, router
        self.last_gate: torch.Tensor | None = None  # which rows the last call routed (for inspection)

    def _gate(self, input_ids, attention_mask, prompt_end=None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.last_gate = self.router.applies(prompt_states(self.svf_model, input_ids, attention_mask, prompt_end))
        return self.last_gate

    def forward(self, input_ids=None, attention_mask=None, prompt_end=None, **kwargs):
        with rows_routed(self.svf_model, self._gate(input_ids, attention_mask, prompt_end)):
            return self.svf_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        with rows_routed(self.svf_model, self._gate(input_ids, attention_mask)):
            return self.svf_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
