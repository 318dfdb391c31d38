"""Two-pass inference: pass 1 reads the unedited model's states over a prompt, a router weighs the experts, the
mixer answers with them (`AdaptiveModel`). One expert is the K = 1 case.

| name        | decides from                                             | fitted on                                  |
|-------------|----------------------------------------------------------|--------------------------------------------|
| embedding   | last-token state vs each expert's keys (nearest wins)    | the experts' own keys and thresholds       |
| scope       | the edited subject's and relation's tokens, soft-matched | edit prompts + subjects; negatives         |
| scope-split | scope, subject and relation parts calibrated apart       | edit prompts + subjects + targets; negatives |
| hybrid      | scope, else embedding                                    | both                                       |
| classifier  | a linear probe on the last-token state, "none" class     | edit prompts (class k), negatives ("none") |
| prompt      | the model's own likelihood of each expert's description  | nothing (Transformer²'s first strategy)    |
| cem         | one mixture for all prompts, by the cross-entropy method | a handful of labelled examples             |
| uniform     | 1/K on every expert                                      | nothing                                    |
| oracle      | the evaluation's own assignment (a reference, never a product router) | —                             |

Negatives are prompts the experts must leave alone that the evaluation does not score (`t2edit.leakage`).

    router = get_router("scope-split")
    model = AdaptiveModel.from_experts(base_model, experts, router, tokenizer, negatives=[...])
"""
from __future__ import annotations

from t2edit.routing.base import (ExpertRouter, annotate_expert, expert_edits, names_its_subject, one_hot_choice,
                                 threshold_above)
from t2edit.routing.cem import CEMRouter
from t2edit.routing.classifier import ClassifierRouter
from t2edit.routing.embedding import EmbeddingRouter, calibrate_own_router
from t2edit.routing.fixed import FixedRouter, OracleRouter, UniformRouter
from t2edit.routing.hybrid import HybridRouter
from t2edit.routing.mixer import MIXING, AdaptiveModel, MixturePlan
from t2edit.routing.pass1 import PromptBatch, encode, last_states, pass1
from t2edit.routing.prompt import PromptRouter
from t2edit.routing.scope import ScopeRouter, SplitScopeRouter

ROUTERS = {"embedding": EmbeddingRouter, "scope": ScopeRouter, "scope-split": SplitScopeRouter,
           "hybrid": HybridRouter, "classifier": ClassifierRouter, "prompt": PromptRouter, "cem": CEMRouter,
           "uniform": UniformRouter, "oracle": OracleRouter}
AUTOMATIC = ("embedding", "scope", "scope-split", "hybrid", "classifier", "prompt", "cem")  # fitted, no labels
OWN_ROUTER = "own"  # an expert's own router (its saved keys and threshold): `AdaptiveModel.with_own_router`


def get_router(name: str, **kwargs) -> ExpertRouter:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(sorted(ROUTERS))}")
    return ROUTERS[name](**kwargs)


def default_router(edits: list[dict], world: bool) -> str | None:
    """The router two-pass SVF uses when none is named. On a real model `scope-split`, which recognises the edited
    subject and relation in other words, when every edit names its subject inside its prompt (which it keys on);
    otherwise, and on a fact world, None: the expert's own router (one expert) or `embedding` (many)."""
    named = bool(edits) and all(names_its_subject(e.get("subject"), e["prompt"]) for e in edits)
    return "scope-split" if named and not world else None


__all__ = ["AUTOMATIC", "MIXING", "OWN_ROUTER", "ROUTERS", "AdaptiveModel", "CEMRouter", "ClassifierRouter",
           "EmbeddingRouter", "ExpertRouter", "FixedRouter", "HybridRouter", "MixturePlan", "OracleRouter",
           "PromptBatch", "PromptRouter", "ScopeRouter", "SplitScopeRouter", "UniformRouter", "annotate_expert",
           "calibrate_own_router", "default_router", "encode", "expert_edits", "get_router", "last_states",
           "names_its_subject", "one_hot_choice", "pass1", "threshold_above"]
