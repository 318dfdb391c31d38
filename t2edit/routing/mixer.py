"""Many SVF experts over one base model, chosen and mixed per prompt in two passes; one expert is K = 1.

Pass 1 runs the unedited model once over the prompt (the SVF layers bypassed) and hands its hidden states to a
router (`t2edit.routing`), which gives every row of the batch a weight per expert plus a weight for "no expert".
Pass 2 runs the model with, on each row, z_row = Σₖ wₖ zₖ + w_none · z_neutral, through the one mask function the
experts were trained with (`SVFLinear.singular_values_for`). Rows with different mixtures share one batch:

* "rows":   y = ((x V) ⊙ σ_row) Uᵀ — every row its own singular values through the shared factors;
* "groups": rows that share a mixture are run together through that mixture's U diag(σ) Vᵀ, built once per
  call (and per generate call, not per decoding step) and dropped afterwards (or kept: `keep_weights`);
* "auto":   per layer, whichever needs fewer multiply-adds for the batch at hand (see `_prefers_groups`).

Rows whose whole weight is on "no expert" always run the original layer, so they are the unedited model exactly.
The base weights are never copied per expert: an expert is its z vectors (a few KB), stacked here per layer.

    experts = [Expert.from_pretrained(d) for d in dirs]
    model = AdaptiveModel.from_experts(base_model, experts, get_router("embedding"))
    model.generate(**tokenizer(prompts, return_tensors="pt", padding=True))   # forward() too, like a HF model
    model.last_weights                                                         # [batch, K + 1] of the last call
    AdaptiveModel.with_own_router(svf_model, expert)                           # one expert, its own router
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from t2edit.experts import Expert, ExpertMismatchError
from t2edit.routing.embedding import EmbeddingRouter
from t2edit.routing.pass1 import PromptBatch, pass1
from t2edit.svf import SVFLinear, SVFModel, apply_svf, rows_planned

MIXING = ("auto", "rows", "groups")


class AdaptiveModel(nn.Module):
    """An SVF model with K experts behind a router; `forward` and `generate` work like a transformers model.

    `forward(..., prompt_end=[...])` gives the index of each row's last prompt token when the input also holds an
    answer (teacher forcing, as the evaluation does); without it the final position is the prompt's end.

    `keep_weights`: keep each mixture's recomposed weights (the "groups" path) across calls instead of building them
    per call: what one expert behind its own router wants (one mixture, reused by every batch)."""

    routes_on_prompt = True  # the evaluation passes prompt_end when it feeds prompt + answer

    def __init__(self, svf_model: SVFModel, experts: Sequence[Expert], router, tokenizer=None, mixing: str = "auto",
                 fit: bool = True, keep_weights: bool = False, **fit_kwargs):
        super().__init__()
        if not experts:
            raise ValueError("AdaptiveModel needs at least one expert directory")
        if mixing not in MIXING:
            raise ValueError(f"mixing={mixing!r}; choose one of {MIXING}")
        for expert in experts:
            expert.check_compatible(svf_model)
        self.svf_model, self.experts, self.router = svf_model, list(experts), router
        self.tokenizer, self.mixing = tokenizer, mixing
        self.neutral_z = svf_model.svf_config.neutral_z()
        # [K, rank] per layer: the experts' own z vectors, the only per-expert memory.
        self.z_stack = {name: torch.stack([e.z[name].float() for e in self.experts]).to(svf_model.device)
                        for name in svf_model.layer_names}
        self._layer_names = {id(layer): name for name, layer in svf_model.svf_layers().items()}
        self.last_weights: torch.Tensor | None = None
        self.kept_weights: dict | None = {} if keep_weights else None  # (layer, mixture) -> U diag(σ) Vᵀ
        if fit:
            router.fit(self, tokenizer, **fit_kwargs)

    @classmethod
    def from_experts(cls, base_model: nn.Module, experts: Sequence[Expert], router, tokenizer=None, **kwargs):
        """Wrap a plain base model in SVF with the experts' config (all must share it) and put the router on top."""
        experts = list(experts)
        if not experts:
            raise ValueError("AdaptiveModel needs at least one expert directory")
        first = experts[0]
        for other in experts[1:]:
            if other.svf_config != first.svf_config or set(other.z) != set(first.z):
                raise ExpertMismatchError(
                    f"expert {other.info.name or '?'} was trained with another SVF config or other layers "
                    f"than {first.info.name or '?'}; experts mixed together must share them")
        svf_model = base_model if isinstance(base_model, SVFModel) else apply_svf(base_model,
                                                                                  first.make_svf_config(),
                                                                                  progress=False)
        return cls(svf_model, experts, router, tokenizer, **kwargs)

    @classmethod
    def with_own_router(cls, svf_model: SVFModel, expert: Expert, tokenizer=None) -> "AdaptiveModel":
        """One expert behind the router it was saved with (K = 1): its keys and threshold as they are, its weights
        recomposed once and kept, so a routed row gets exactly what the expert alone gives."""
        if expert.router is None:
            raise ValueError(f"expert {expert.info.name or '?'} has no router of its own (a mixture, or trained "
                             f"without one); apply it to every prompt (method svf-always) or name a router")
        return cls(svf_model, [expert], EmbeddingRouter(), tokenizer, mixing="groups", keep_weights=True)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, expert_dirs: Sequence[str], router, tokenizer=None, **kwargs):
        return cls.from_experts(base_model, [Expert.from_pretrained(d) for d in expert_dirs], router, tokenizer,
                                **kwargs)

    # -- what a transformers model shows the evaluation and `generate` ---------------------------------------------
    @property
    def config(self):
        return self.svf_model.config

    @property
    def generation_config(self):
        return self.svf_model.base_model.generation_config

    @property
    def device(self):
        return self.svf_model.device

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_names(self) -> list[str]:
        return [e.info.name or f"expert-{k}" for k, e in enumerate(self.experts)]

    # -- pass 1 -------------------------------------------------------------------------------------------------
    def pass1(self, input_ids, attention_mask=None, prompt_end=None, layers=None) -> PromptBatch:
        """`layers`: the hidden states to keep (default: those the router reads, all if it does not say)."""
        layers = getattr(self.router, "layers", None) if layers is None else layers
        return pass1(self.svf_model, input_ids, attention_mask, prompt_end, self.tokenizer, layers)

    @torch.no_grad()
    def route(self, input_ids, attention_mask=None, prompt_end=None) -> torch.Tensor:
        """[batch, K + 1] weights (last column: no expert) for the prompts in `input_ids`."""
        weights = self.router.weights(self.pass1(input_ids, attention_mask, prompt_end))
        if weights.shape != (input_ids.shape[0], self.num_experts + 1):
            raise ValueError(f"router {getattr(self.router, 'name', self.router)!r} returned weights of shape "
                             f"{tuple(weights.shape)}, expected {(input_ids.shape[0], self.num_experts + 1)}")
        self.last_weights = weights.detach().float().cpu()
        return weights.float()

    # -- pass 2 -------------------------------------------------------------------------------------------------
    def plan(self, weights: torch.Tensor) -> "MixturePlan":
        return MixturePlan(self, weights.to(self.device), self.mixing)

    def forward(self, input_ids=None, attention_mask=None, prompt_end=None, weights=None, **kwargs):
        weights = self.route(input_ids, attention_mask, prompt_end) if weights is None else weights
        with rows_planned(self.svf_model, self.plan(weights)):
            return self.svf_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, weights=None, **kwargs):
        weights = self.route(input_ids, attention_mask) if weights is None else weights
        with rows_planned(self.svf_model, self.plan(weights)):  # one plan: mixtures built once per generate
            return self.svf_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _prefers_groups(n_groups: int, tokens: int, layer: SVFLinear) -> bool:
    """Multiply-adds of building n_groups weights U diag(σ) Vᵀ plus the plain matmul, against the factored
    per-row path ((x V) ⊙ σ) Uᵀ, for this layer and this many tokens."""
    out_features, rank = layer.U.shape
    in_features = layer.Vh.shape[1]
    grouped = n_groups * out_features * rank * in_features + tokens * out_features * in_features
    per_row = tokens * rank * (in_features + out_features)
    return grouped < per_row


class MixturePlan:
    """The per-row mixtures of one call, applied by every SVF layer (`SVFLinear.row_plan`)."""

    def __init__(self, model: AdaptiveModel, weights: torch.Tensor, mixing: str):
        self.model, self.weights, self.mixing = model, weights.float(), mixing
        k = model.num_experts
        pure_none = (self.weights[:, k] == 1) & (self.weights[:, :k] == 0).all(-1)
        self.routed = (~pure_none).nonzero().flatten()  # rows that need the experts
        self.all_routed = bool(len(self.routed) == len(self.weights))
        mixtures, self.group_of = (torch.unique(self.weights[self.routed], dim=0, return_inverse=True)
                                   if len(self.routed) else (self.weights[:0], self.routed))
        self.mixtures = mixtures
        self._cache: dict[tuple[int, str], object] = {}  # per layer: σ per row or weight per group (this call only)

    def _z(self, layer: SVFLinear, weights: torch.Tensor) -> torch.Tensor:
        name = self.model._layer_names[id(layer)]
        k = self.model.num_experts
        return weights[:, :k] @ self.model.z_stack[name] + weights[:, k:] * self.model.neutral_z

    def __call__(self, layer: SVFLinear, x: torch.Tensor) -> torch.Tensor:
        if not len(self.routed):
            return layer.base_layer(x)
        tokens = x[self.routed].numel() // x.shape[-1]
        use_groups = self.mixing == "groups" or (
            self.mixing == "auto" and _prefers_groups(len(self.mixtures), tokens, layer))
        if use_groups:
            routed_out = self._grouped(layer, x)
        else:
            key = (id(layer), "rows")
            if key not in self._cache:
                with torch.no_grad():
                    self._cache[key] = layer.singular_values_for(self._z(layer, self.weights[self.routed]))
            xs = x if self.all_routed else x[self.routed]
            routed_out = layer.forward_row_sigma(xs, self._cache[key])
        if self.all_routed:
            return routed_out
        out = layer.base_layer(x)  # unrouted rows: the original layer, exactly
        out[self.routed] = routed_out.to(out.dtype)
        return out

    def _group_weight(self, layer: SVFLinear, g: int) -> torch.Tensor:
        """U diag(σ) Vᵀ of mixture g, built once per call, or once per model when it keeps its weights."""
        key = (id(layer), f"group{g}")
        if key not in self._cache:
            kept = self.model.kept_weights
            kept_key = (id(layer), tuple(self.mixtures[g].tolist()))
            if kept is not None and kept_key in kept:
                self._cache[key] = kept[kept_key]
            else:
                # Full precision whatever autocast is active, as SVFLinear.merged_weight.
                with torch.no_grad(), torch.autocast(layer.U.device.type, enabled=False):
                    sigma = layer.singular_values_for(self._z(layer, self.mixtures[g:g + 1]))[0]
                    self._cache[key] = layer.weight_for(sigma)
                if kept is not None:
                    kept[kept_key] = self._cache[key]
        return self._cache[key]

    def _grouped(self, layer: SVFLinear, x: torch.Tensor) -> torch.Tensor:
        xs = x if self.all_routed else x[self.routed]
        bias = layer.base_layer.bias
        out = None
        for g in range(len(self.mixtures)):
            weight = self._group_weight(layer, g)
            if len(self.mixtures) == 1:
                y = xs @ weight.T
                return y + bias if bias is not None else y
            rows = (self.group_of == g).nonzero().flatten()
            y = xs[rows] @ weight.T
            y = y + bias if bias is not None else y
            if out is None:
                out = y.new_empty(xs.shape[:-1] + (y.shape[-1],))
            out[rows] = y
        return out


__all__ = ["AdaptiveModel", "MIXING", "MixturePlan"]
