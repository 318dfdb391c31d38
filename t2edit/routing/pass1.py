"""Pass 1 of two-pass inference: the unedited model's hidden states over a batch of prompts.

Every router reads a `PromptBatch`: the prompts' token ids (left-padded), where each prompt ends, and the hidden
states of the unedited model (the SVF layers bypassed) at every layer. `encode` runs pass 1 over a list of prompts
in batches, keeping only the layers a router reads, and can cache it for one base model. A router that reads only
early layers (the scope routers key on the input embeddings) gets a pass 1 that stops at the deepest of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from t2edit.batching import position_ids
from t2edit.svf import SVFModel, model_bypassed


@dataclass
class PromptBatch:
    """What pass 1 hands to a router: the prompts of a batch and the unedited model's hidden states over them."""

    input_ids: torch.Tensor  # [batch, seq], left-padded
    attention_mask: torch.Tensor
    last: torch.Tensor  # [batch]: index of each row's last prompt token (answer tokens may follow it)
    hidden_states: tuple[torch.Tensor | None, ...]  # per layer [batch, seq, hidden]; 0 = input embeddings
    tokenizer: object = None
    _texts: list[str] | None = field(default=None, repr=False)

    @property
    def last_state(self) -> torch.Tensor:
        """Last layer, last prompt token: the state the embedding router keys on."""
        final = self.hidden_states[-1]
        return final[torch.arange(final.shape[0], device=final.device), self.last.to(final.device)]

    def prompt_mask(self) -> torch.Tensor:
        """[batch, seq] True on the prompt's own tokens (no padding, nothing after the prompt's end)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return self.attention_mask.bool() & (positions[None, :] <= self.last[:, None].to(positions.device))

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            if self.tokenizer is None:
                raise ValueError("this router reads the prompts' text; give AdaptiveModel a tokenizer")
            mask = self.prompt_mask()
            self._texts = [self.tokenizer.decode(ids[m], skip_special_tokens=True).strip()
                           for ids, m in zip(self.input_ids.cpu(), mask.cpu())]
        return self._texts


class _Reached(Exception):
    """Raised by a pre-hook once the deepest decoder layer a caller reads has its input: the rest is not run."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks in order (the module list as long as its config's layer count; [] if none is):
    hidden_states[k] of a transformers model is the input of block k."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return list(module)
    return []


def layer_inputs(model: nn.Module, blocks: Sequence[nn.Module], depths, **inputs) -> dict[int, torch.Tensor]:
    """The hidden states entering each of the decoder `blocks` (`decoder_layers(model)`) numbered in `depths`
    (hidden_states[d] for d < the layer count), the model run only up to the deepest of them."""
    deepest, captured = max(depths), {}

    def capture(depth):
        def hook(module, args, kwargs):
            captured[depth] = args[0] if args else kwargs["hidden_states"]
            if depth == deepest:
                raise _Reached
        return hook

    hooks = [blocks[d].register_forward_pre_hook(capture(d), with_kwargs=True) for d in set(depths)]
    try:
        model(**inputs)
    except _Reached:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def pass1(svf_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
          prompt_end: torch.Tensor | None = None, tokenizer=None, layers: Sequence[int] | None = None) -> PromptBatch:
    """One forward of the unedited model (an SVF model's layers bypassed; a plain model as it is) over a left-padded
    batch. `prompt_end`: each row's last prompt token when answer tokens follow (teacher forcing); default the final
    position. `layers`: the hidden states the caller reads (−1: the last; None: all); the others are None, and the
    forward stops at the deepest one read."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    last = prompt_end if prompt_end is not None else \
        torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    count = svf_model.config.num_hidden_layers + 1
    depths = None if layers is None else {layer % count for layer in layers}
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}
    with model_bypassed(svf_model) if isinstance(svf_model, SVFModel) else contextlib.nullcontext():
        blocks = decoder_layers(svf_model) if depths and max(depths) < count - 1 else []
        if blocks:
            found = layer_inputs(svf_model, blocks, depths, **inputs)
            states = tuple(found.get(i) for i in range(count))
        else:  # logits_to_keep=1: routers read hidden states, not a vocabulary per position
            states = svf_model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states
            if depths is not None:
                states = tuple(h if i in depths else None for i, h in enumerate(states))
    return PromptBatch(input_ids, attention_mask, last.to(input_ids.device), states, tokenizer)


@torch.no_grad()
def encode(model, tokenizer, prompts: Sequence[str], batch_size: int = 64, cache: dict | None = None,
           layers: Sequence[int] | None = None) -> list[PromptBatch]:
    """Pass 1 over prompts (no answers), in batches. `model`: an SVF model or anything holding one as `svf_model`.
    `layers`: the hidden states the caller reads (−1: the last); the others are dropped, so thousands of negatives
    keep one or two layers, not all of them. `cache`: a dict the caller keeps for one unedited base model (pass 1
    never sees the experts), so the same prompts run once, e.g. when a router is fitted per edit on the same
    negatives."""
    if tokenizer.padding_side != "left":
        raise ValueError("routing reads each prompt's last token; set tokenizer.padding_side = 'left'")
    svf_model = getattr(model, "svf_model", model)
    # An AdaptiveModel runs pass 1 through its own method (which also hands routers its tokenizer).
    run = model.pass1 if hasattr(model, "pass1") else \
        (lambda ids, mask, layers=None: pass1(svf_model, ids, mask, tokenizer=tokenizer, layers=layers))
    key = (tuple(prompts), batch_size, None if layers is None else tuple(sorted(set(layers))))
    if cache is not None:
        hit = _cached_pass1(cache, key)
        if hit is not None:
            return hit
    batches = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
        enc = enc.to(svf_model.device)
        batches.append(run(enc["input_ids"], enc["attention_mask"], layers=layers))  # pass 1 keeps only `layers`
    if cache is not None:
        cache[key] = batches
    return batches


def last_states(model, tokenizer, prompts: Sequence[str], batch_size: int = 64, cache: dict | None = None):
    """[len(prompts), hidden] float32 on the CPU: the last layer's state at each prompt's last token."""
    batches = encode(model, tokenizer, prompts, batch_size, cache=cache, layers=[-1])
    if not batches:
        svf_model = getattr(model, "svf_model", model)
        return torch.zeros(0, svf_model.config.hidden_size)
    return torch.cat([b.last_state.float().cpu() for b in batches])


def stored_last_states(model, tokenizer, prompts: Sequence[str], store: dict[str, torch.Tensor],
                       batch_size: int = 64) -> torch.Tensor:
    """`last_states` through `store` (prompt -> state), a dict the caller keeps for one unedited base model: only
    prompts not in it run pass 1, so experts trained one after another on overlapping negatives encode each once."""
    missing = [p for p in dict.fromkeys(prompts) if p not in store]
    if missing:
        store.update(zip(missing, last_states(model, tokenizer, missing, batch_size)))
    if not prompts:
        return last_states(model, tokenizer, [], batch_size)
    return torch.stack([store[p] for p in prompts])


def _cached_pass1(cache: dict, key: tuple) -> list[PromptBatch] | None:
    """A cached pass 1 over the same prompts that kept every layer `key` asks for (it may have kept more: the
    hybrid router runs one pass for the layers of both its halves)."""
    if key in cache:
        return cache[key]
    prompts, batch_size, layers = key
    for (other_prompts, other_size, _), batches in cache.items():
        if other_prompts != prompts or other_size != batch_size or not batches:
            continue
        kept = {i for i, h in enumerate(batches[0].hidden_states) if h is not None}
        count = len(batches[0].hidden_states)
        if layers is not None and {layer % count for layer in layers} <= kept:
            return batches
    return None


__all__ = ["PromptBatch", "decoder_layers", "encode", "last_states", "layer_inputs", "pass1", "stored_last_states"]
