"""SERAC (Mitchell et al., ICML 2022) from what t2edit has: a scope classifier in front of the unedited model, which
answers an in-scope prompt with the edit in its context.

The edits go to a memory. For each scored prompt a t2edit router (`t2edit.routing`) decides whether it falls in
the scope of an edit, and which: the `scope-split` router (the edit's subject and relation recognised in other
words, calibrated apart) when every edit names its subject inside its prompt, else the `embedding` router (the
unedited model's last-token state against each edit prompt's). The router is calibrated on training-side prompts
only — the neighbours and same-subject anchors of `t2edit.leakage.learning_pool(memory, train_records)`, never a
prompt the evaluation scores. In scope, the prompt gets `new_fact_context(edit prompt, edit target)` in front;
out of scope, nothing, so the unedited model answers as it always did. Each edit is one entry the router can
pick; sequential calls add entries and refit the router on the whole memory.

Differences from the paper (and EasyEdit's SERAC row, Llama-2-7b on KnowEdit): SERAC trains a cross-encoder
scope classifier (DistilBERT) on edit/neighbour pairs and a separate counterfactual model (a small Llama fine-tuned
to answer with the edit); here the scope classifier is a calibrated t2edit router with no training and no extra
model, and the counterfactual model is the base model itself reading the edit in context (as IKE/prompt editing
do).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F

from t2edit.data.records import EditRecord
from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records
from t2edit.editors.target_loss import model_device
from t2edit.experts import OwnRouter
from t2edit.leakage import learning_pool
from t2edit.routing import PromptBatch, get_router, last_states, names_its_subject, pass1
from t2edit.routing.base import edit_entries
from t2edit.text import new_fact_context

SCOPE_ROUTERS = ("auto", "scope-split", "embedding")


@dataclass
class SeracEditorConfig:
    # auto: scope-split when every edit names its subject inside its prompt, else embedding
    router: str = "auto"
    router_options: dict = field(default_factory=dict)  # passed to the router, e.g. {"margin": 0.2}

    def __post_init__(self):
        if self.router not in SCOPE_ROUTERS:
            raise EditInputError(f"SeracEditorConfig.router={self.router!r}; choose one of {', '.join(SCOPE_ROUTERS)}")


class EditScope:
    """What a t2edit router reads of a model: one "expert" per edit of the memory (its prompt, subject and
    target), and pass 1 — the unedited model's hidden states, run only as deep as the router reads."""

    def __init__(self, model, tokenizer, records: list[EditRecord], layers: Sequence[int] | None):
        self.model, self.tokenizer, self.layers = model, tokenizer, layers
        self.experts = [SimpleNamespace(info=SimpleNamespace(edits=edit_entries([r])), router=None) for r in records]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def device(self):
        return model_device(self.model)

    def expert_names(self) -> list[str]:
        return [f"edit-{k}" for k in range(len(self.experts))]

    def pass1(self, input_ids, attention_mask=None, prompt_end=None, layers=None) -> PromptBatch:
        return pass1(self.model, input_ids, attention_mask, prompt_end, self.tokenizer,
                     self.layers if layers is None else layers)


class SeracEditor(Editor):
    """Scope classifier + the unedited model with the edit in context. `train_records` (a training split, never the
    evaluated records) calibrate the scope classifier, through the leakage guard."""

    name = "serac"
    sequential = True

    def __init__(self, config: SeracEditorConfig | None = None, train_records: list[EditRecord] | None = None):
        self.config = config or SeracEditorConfig()
        self.train_records = list(train_records or [])
        if not self.train_records:
            raise EditInputError("SERAC needs prompts outside every edit's scope to calibrate its scope classifier: "
                                 "pass train_records=[...] (from a training split, never the evaluated records)")
        self._memories: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> edits in memory
        self.report: dict = {}
        self.last_negatives: list[str] = []  # the prompts the last call calibrated on

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        before = list(self._memories.get(model, []))
        memory = before + list(records)
        negatives = learning_pool(memory, self.train_records).router_negatives
        if not negatives:
            raise EditInputError("SERAC found no prompts to calibrate on: every train_records prompt is one the "
                                 "evaluation scores for these edits; pass other training records")
        router, scope = self._fit(model, tokenizer, memory, negatives)
        self._memories[model] = memory
        self.last_negatives = negatives
        self.report = {"memory_edits": len(memory), "scope_router": router.name, "calibration_prompts": len(negatives)}
        contexts: dict[str, str] = {}

        def context(prompt: str) -> str:
            if prompt not in contexts:
                encoded = tokenizer([prompt], return_tensors="pt", padding=True).to(scope.device)
                choice = int(router.weights(scope.pass1(encoded["input_ids"], encoded["attention_mask"]))[0].argmax())
                contexts[prompt] = "" if choice == len(memory) else \
                    new_fact_context(memory[choice].prompt, memory[choice].target)
            return contexts[prompt]

        def restore() -> None:
            if before:
                self._memories[model] = before
            else:
                self._memories.pop(model, None)

        return EditedModel(model=model, context=context, restore=restore)

    def _fit(self, model, tokenizer, memory: list[EditRecord], negatives: list[str]):
        kind = self.config.router
        named = all(names_its_subject(r.subject, r.prompt) for r in memory)
        if kind == "auto":
            kind = "scope-split" if named else "embedding"
        if kind == "scope-split" and not named:
            lacking = next(r for r in memory if not names_its_subject(r.subject, r.prompt))
            raise EditInputError(f"SERAC's scope-split router needs each edit's subject inside its prompt; "
                                 f"{lacking.prompt!r} does not contain {lacking.subject!r}: use router='embedding' "
                                 f"or 'auto'")
        try:
            router = get_router(kind, **self.config.router_options)
        except TypeError as error:
            raise EditInputError(f"SeracEditorConfig.router_options {self.config.router_options}: {error}") from None
        if kind == "embedding":
            scope = EditScope(model, tokenizer, memory, layers=None)
            keys = F.normalize(last_states(scope, tokenizer, [r.prompt for r in memory]), dim=-1)
            for expert, key in zip(scope.experts, keys):
                expert.router = OwnRouter(keys=key[None], threshold=-1.0)  # raised by the negatives in fit
        else:
            scope = EditScope(model, tokenizer, memory, layers=router.layers)
        router.fit(scope, tokenizer, negatives=negatives)
        return router, scope


__all__ = ["EditScope", "SeracEditor", "SeracEditorConfig"]
