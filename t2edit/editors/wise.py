"""WISE (Wang et al., NeurIPS 2024): edits live in a side copy of one MLP output (value) matrix; a router picks,
per prompt, the side memory or the untouched main one.

Routing: the activation score of a prompt is Δ_act(x) = ‖A(x)(W_side − W_main)ᵀ‖₂ per token (A(x): the matrix's
input activations), averaged over the prompt's tokens (EasyEdit's mean); above the threshold ε the whole row
runs through the side memory, else through the main matrix, so an unrouted prompt gets exactly the unedited
logits. ε = act_ratio × the lowest score an edit prompt had when its edit finished (EasyEdit's rule).

Training, per edit (one after another, as the paper's lifelong stream): SGD on the side matrix for `n_iter` steps
against cross-entropy on the target tokens through the side memory, plus the routing margins on the edit x_e and
irrelevant prompts x_i: max(0, Δ(x_i) − α) + max(0, β − Δ(x_e)) + max(0, γ − (Δ(x_e) − Δ(x_i))). Gradients pass
through a random mask of `mask_ratio` of the entries (knowledge sharding: each shard of `save_freq` edits has its
own mask and starts from the round's side memory); entries stay within ±`norm_constraint` of the main matrix.
Every `merge_freq` edits the round's shards are merged into one side memory with TIES (trim each shard's change
to its top `density` by magnitude, elect each entry's sign by the summed trimmed changes, average the changes that
agree): W_side = W_main + weight · TIES(W_shard_i − W_main).

The irrelevant prompts come only from `train_records` through the leakage guard (`learning_pool`), never a prompt
the evaluation scores: `irrelevant_samples` drawn at random from its neighbours and anchors (the paper's random
irrelevant samples), plus, optionally, `subject_anchors` of the edited subject asked about other relations — the
prompts a router keyed on the subject most easily takes for the edit.

Differences from the paper: one side memory (WISE-Merge; no WISE-Retrieve, no replay); between merges the side
memory that routes and answers is the TIES merge of the round's shards so far (a single shard as it is), so no
edit waits for a merge to count; the routing score reads the prompt's tokens only (the evaluation says where the
prompt ends), not the answer's; irrelevant samples are prompts without their answers; restore() keeps one copy of
the side matrix per call (on the CPU) to undo it exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from t2edit.data.records import EditRecord
from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records
from t2edit.editors.grace import MemoryAdaptor, MemoryModel, memory_layer, memory_model_of, read_layer
from t2edit.editors.target_loss import (check_precision, encode_targets, masked_target_loss, model_device,
                                          requires_grad_snapshot, restore_requires_grad)
from t2edit.leakage import LearningPool, learning_pool
from t2edit.precision import autocast_context


def ties_merge(base: torch.Tensor, weights: list[torch.Tensor], density: float, scale: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023) of `weights` fine-tuned from `base`: trim each change to its top
    `density` fraction by magnitude, elect each entry's sign as that of the summed trimmed changes, average the
    trimmed changes that agree with it (disjoint mean), add `scale` × that to `base`."""
    changes = torch.stack([w.float() - base.float() for w in weights])
    flat = changes.reshape(len(weights), -1)
    keep = max(1, round(density * flat.shape[1]))
    cutoff = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= cutoff, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (base.float() + scale * merged.reshape(base.shape)).to(base.dtype)


def activation_scores(x: torch.Tensor, mask: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """[batch] Δ_act: the mean over each row's masked tokens of ‖x_t (W_side − W_main)ᵀ‖₂."""
    norms = torch.linalg.vector_norm(F.linear(x.to(difference.dtype), difference), dim=-1)
    mask = mask.to(norms.dtype)
    return (norms * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def routing_margins(edit_score: torch.Tensor, irrelevant_scores: torch.Tensor, alpha: float, beta: float,
                    gamma: float) -> torch.Tensor:
    """WISE's routing loss: irrelevant prompts below alpha, the edit above beta, the edit above each irrelevant
    prompt by gamma (hinges, averaged over the irrelevant prompts)."""
    return (F.relu(irrelevant_scores - alpha).mean() + F.relu(beta - edit_score).mean()
            + F.relu(gamma - (edit_score - irrelevant_scores)).mean())


@dataclass
class SideMemory:
    """The side memory's state. Tensors are replaced rather than changed in place, except `current` while it
    trains (each call trains a fresh copy), so a shallow copy is a snapshot."""

    round_start: torch.Tensor  # the side memory this round's shards started from (W_main until the first merge)
    current: torch.Tensor  # the shard being written
    mask: torch.Tensor  # its gradient mask
    shards: list[torch.Tensor] = field(default_factory=list)  # finished shards of this round
    shard_edits: int = 0
    round_edits: int = 0
    shards_made: int = 1
    edit_scores: list[float] = field(default_factory=list)
    records: list[EditRecord] = field(default_factory=list)

    def copy(self) -> SideMemory:
        return SideMemory(self.round_start, self.current, self.mask, list(self.shards), self.shard_edits,
                          self.round_edits, self.shards_made, list(self.edit_scores), list(self.records))


class WiseAdaptor(MemoryAdaptor):
    """Routes each prompt to the side or the main memory at the hooked layer; while an edit trains, every row
    goes through the side memory being trained."""

    def __init__(self, module: nn.Module, config: WiseEditorConfig):
        super().__init__()
        self.main_weight = _out_in_weight(module).detach()
        self.config = config
        start = self.main_weight.float()
        self.memory = SideMemory(round_start=start, current=start.clone(), mask=self._new_mask(0))
        self.training_weight: torch.Tensor | None = None
        self.difference = torch.zeros_like(start)  # W_side − W_main of the side memory that answers
        self.threshold = float("inf")
        self.last_scores: torch.Tensor | None = None
        self.last_routed: torch.Tensor | None = None  # [batch] rows of the last prompt pass sent to side memory

    def _new_mask(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 7919 + index)
        return (torch.rand(self.main_weight.shape, generator=generator) < self.config.mask_ratio).to(
            self.main_weight.device)

    def settle(self) -> None:
        """Recompute what answers and routes from the memory's state: the merge of the round's shards so far,
        and the threshold."""
        memory = self.memory
        side = memory.current if not memory.shards else ties_merge(
            self.main_weight.float(), memory.shards + [memory.current], self.config.density, self.config.merge_weight)
        self.difference = (side - self.main_weight.float()).detach()
        self.threshold = self.config.act_ratio * min(memory.edit_scores) if memory.edit_scores else float("inf")

    def on_prompt(self, x, output, span):
        if self.training_weight is not None:
            return output + F.linear(x.to(self.training_weight.dtype),
                                     self.training_weight - self.main_weight.float()).to(output.dtype)
        scores = activation_scores(x, span.mask, self.difference)
        routed = scores > self.threshold
        self.last_scores, self.last_routed = scores, routed
        return self._side_rows(x, output, routed)

    def after_prompt(self, x, output):
        if self.last_routed is None or len(self.last_routed) != x.shape[0]:
            return output
        return self._side_rows(x, output, self.last_routed)

    def _side_rows(self, x, output, routed):
        if not routed.any():
            return output
        replaced = output.clone()
        replaced[routed] = (output[routed].float() + F.linear(x[routed].float(), self.difference)).to(output.dtype)
        return replaced


@dataclass
class WiseEditorConfig:
    layer: int | None = None  # decoder layer whose MLP output matrix gets a side copy; None: the middle one
    module_name: str | None = None  # a full module name overrides `layer`
    lr: float = 1.0  # SGD on the side matrix (EasyEdit's edit_lr)
    n_iter: int = 70
    alpha: float = 5.0  # irrelevant prompts' activation score kept below this
    beta: float = 20.0  # edit prompts' activation score pushed above this
    gamma: float = 10.0  # the gap kept between them
    act_ratio: float = 0.88  # ε = act_ratio × the lowest edit score
    mask_ratio: float = 0.2  # fraction of the matrix each shard may change
    norm_constraint: float | None = 1.0  # entries stay within ± this of the main matrix; None: unbounded
    save_freq: int = 500  # edits per shard
    merge_freq: int = 1000  # edits per merge of the round's shards
    density: float = 0.53  # TIES: fraction of each shard's change kept by magnitude
    merge_weight: float = 1.0  # TIES: scale of the merged change
    irrelevant_samples: int = 1  # irrelevant prompts per edit, drawn at random from the learning pool
    subject_anchors: int = 0  # and this many of the pool's same-subject anchors (the subject, other relations)
    precision: str = "fp32"
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)
        if self.lr <= 0 or self.n_iter < 1:
            raise EditInputError(f"WiseEditorConfig needs lr > 0 and n_iter >= 1, got lr={self.lr}, "
                                 f"n_iter={self.n_iter}")
        for name in ("mask_ratio", "density", "act_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise EditInputError(f"WiseEditorConfig.{name}={getattr(self, name)} must lie in (0, 1]")
        if self.save_freq < 1 or self.merge_freq < self.save_freq:
            raise EditInputError(f"WiseEditorConfig needs 1 <= save_freq <= merge_freq (edits per shard, edits per "
                                 f"merge), got save_freq={self.save_freq}, merge_freq={self.merge_freq}")
        if self.irrelevant_samples < 1 or self.subject_anchors < 0:
            raise EditInputError("WiseEditorConfig.irrelevant_samples must be at least 1 (the routing margins "
                                 "need irrelevant prompts) and subject_anchors at least 0")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise EditInputError(f"WiseEditorConfig.norm_constraint={self.norm_constraint}: use a bound > 0 or None")


class WiseEditor(Editor):
    """Side-memory editing with a learned activation router. `train_records` (a training split, never the evaluated
    records) supply the irrelevant prompts, through the leakage guard (t2edit.leakage.learning_pool)."""

    name = "wise"
    sequential = True

    def __init__(self, config: WiseEditorConfig | None = None, train_records: list[EditRecord] | None = None):
        self.config = config or WiseEditorConfig()
        self.train_records = list(train_records or [])
        if not self.train_records:
            raise EditInputError("WISE needs irrelevant prompts to learn its router: pass train_records=[...] "
                                 "(from a training split, never the evaluated records)")
        self.report: dict = {}
        self.last_irrelevant: list[str] = []  # every irrelevant prompt the last call trained on

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        config = self.config
        wrapped = memory_model_of(model, WiseAdaptor)
        if wrapped is None:
            name = memory_layer(model, config.layer, config.module_name, "WiseEditorConfig")
            wrapped = MemoryModel(model, name, WiseAdaptor(model.get_submodule(name), config))
        adaptor: WiseAdaptor = wrapped.adaptor
        before = adaptor.memory.copy()
        before.current = before.current.to("cpu")  # the pre-call shard, kept off the accelerator until restore
        adaptor.memory.current = adaptor.memory.current.clone()  # this call trains a copy
        pool = learning_pool(adaptor.memory.records + list(records), self.train_records)
        if not pool.router_negatives:
            self._restore(wrapped, model, before)
            raise EditInputError("WISE found no irrelevant prompts: every train_records prompt is one the "
                                 "evaluation scores for these edits; pass other training records")
        self.last_irrelevant = []
        try:
            for record in records:
                self._edit_one(wrapped.base_model, tokenizer, adaptor, record, pool)
            adaptor.settle()
        except BaseException:
            self._restore(wrapped, model, before)
            raise
        self.report = {"side_memory_edits": len(adaptor.memory.records), "threshold": round(adaptor.threshold, 4),
                       "shards_made": adaptor.memory.shards_made}
        return EditedModel(model=wrapped, restore=lambda: self._restore(wrapped, model, before))

    @staticmethod
    def _restore(wrapped: MemoryModel, model, before: SideMemory) -> None:
        if wrapped is not model:  # the first call: the hook goes, the base model is unedited again
            wrapped.remove()
            return
        adaptor: WiseAdaptor = wrapped.adaptor  # a later call of a sequence: the memory as it was before it
        adaptor.memory = before.copy()
        adaptor.memory.current = before.current.to(adaptor.main_weight.device)
        adaptor.settle()

    def _edit_one(self, model, tokenizer, adaptor: WiseAdaptor, record: EditRecord, pool: LearningPool) -> None:
        config, memory = self.config, adaptor.memory
        if memory.shard_edits == config.save_freq:  # the shard is full: the next starts from the round's start
            memory.shards.append(memory.current)
            memory.current, memory.mask = memory.round_start.clone(), adaptor._new_mask(memory.shards_made)
            memory.shards_made += 1
            memory.shard_edits = 0
        device = model_device(model)
        draw = random.Random(config.seed + len(memory.records))
        negatives = pool.router_negatives
        anchors = [p for p in pool.subject_prompts if record.subject and record.subject in p]
        irrelevant = draw.sample(negatives, min(config.irrelevant_samples, len(negatives)))
        irrelevant += [p for p in anchors[:config.subject_anchors] if p not in irrelevant]
        self.last_irrelevant += irrelevant
        batch = encode_targets(tokenizer, [record.prompt], [record.target], device)
        n_target = int((batch["labels"] != -100).sum())
        positions = torch.arange(batch["input_ids"].shape[1], device=device)
        edit_mask = batch["attention_mask"].bool() & (positions < batch["input_ids"].shape[1] - n_target)
        edit_x = read_layer(model, adaptor, batch["input_ids"], batch["attention_mask"])["x"]
        encoded = tokenizer(irrelevant, return_tensors="pt", padding=True).to(device)
        irrelevant_x = read_layer(model, adaptor, encoded["input_ids"], encoded["attention_mask"])["x"]
        score = self._train(model, adaptor, batch, (edit_x, edit_mask), (irrelevant_x, encoded["attention_mask"]))
        memory.edit_scores.append(score)
        memory.records.append(record)
        memory.shard_edits += 1
        memory.round_edits += 1
        if memory.round_edits == config.merge_freq:
            merged = ties_merge(adaptor.main_weight.float(), memory.shards + [memory.current], config.density,
                                config.merge_weight)
            memory.round_start, memory.current, memory.shards = merged, merged.clone(), []
            memory.mask = adaptor._new_mask(memory.shards_made)
            memory.shards_made += 1
            memory.shard_edits = memory.round_edits = 0

    def _train(self, model, adaptor: WiseAdaptor, batch, edit, irrelevant) -> float:
        """SGD on the current shard against the target loss and the routing margins; returns the edit prompt's
        activation score at the end."""
        config, memory = self.config, adaptor.memory
        main = adaptor.main_weight.float()
        weight = nn.Parameter(memory.current)  # shares storage: the steps write into the shard
        optimizer = torch.optim.SGD([weight], lr=config.lr)
        flags, was_training = requires_grad_snapshot(model), model.training
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        adaptor.training_weight = weight
        model.train()
        device = model_device(model)
        try:
            with torch.enable_grad():
                for _ in range(config.n_iter):
                    with autocast_context(device, config.precision):
                        loss = masked_target_loss(model, batch)
                    difference = weight - main
                    edit_score = activation_scores(*edit, difference)
                    irrelevant_scores = activation_scores(*irrelevant, difference)
                    loss = loss + routing_margins(edit_score, irrelevant_scores, config.alpha, config.beta,
                                                  config.gamma)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    weight.grad *= memory.mask
                    optimizer.step()
                    if config.norm_constraint is not None:
                        with torch.no_grad():
                            weight.copy_(torch.clamp(weight, main - config.norm_constraint,
                                                     main + config.norm_constraint))
        finally:
            adaptor.training_weight = None
            model.train(was_training)
            restore_requires_grad(flags)
        with torch.no_grad():
            return activation_scores(*edit, memory.current - main).item()


def _out_in_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out_features, in_features] (GPT-2's Conv1D stores it transposed)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise EditInputError(f"WISE needs a linear layer with a 2-D weight to copy; {type(module).__name__} has "
                             f"none: set WiseEditorConfig.module_name to an MLP output projection")
    return weight.T if type(module).__name__ == "Conv1D" else weight


__all__ = ["SideMemory", "WiseAdaptor", "WiseEditor", "WiseEditorConfig", "activation_scores", "routing_margins",
           "ties_merge"]
