"""ROME (Meng et al., 2022, "Locating and Editing Factual Associations in GPT"): one rank-one update of one MLP
output matrix per edit.

The MLP output matrix W of a middle layer acts as a key-value memory: the key k is its input at the subject's last
token, the value W k is what the layer writes into the residual stream there. ROME
1. takes k* = the mean key of the subject over the edit prompt behind a few short prefixes the model writes itself
   (so the edit holds whatever text precedes the subject);
2. finds v* = W k* + δ, where δ, added to the layer's MLP output at the subject's last token, makes the model
   predict the target (cross-entropy on the target tokens over all prefixes), with ROME's KL term keeping the
   distribution after "{subject} is a" close to the original (the subject's other properties), a weight decay on δ
   and a bound ‖δ‖ <= clamp_norm_factor · ‖W k*‖;
3. writes W ← W + (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*), C = E[k kᵀ] over a corpus (`t2edit.editors.keys`): the
   update that maps k* to v* exactly and, among those, changes W k least for typical keys. The formula is invariant
   to the scale of C, so MEMIT's `mom2_update_weight` plays no part here. `mom2_adjustment=False` uses C = I (no
   corpus needed), as EasyEdit's published llama-7b settings do.

Several records are edited one after the other, each on the model the previous ones produced (EasyEdit's
ROME batch mode). The δ search (`optimise_values`) is shared with MEMIT and AlphaEdit, which apply it to a decoder
layer's output instead of its MLP output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from t2edit.batching import left_pad, pad_id_of, position_ids
from t2edit.data.records import EditRecord
from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records
from t2edit.editors.keys import (
    KeyCorpus,
    UneditedModelMemo,
    accepts_argument,
    capture_at_positions,
    check_context_lengths,
    context_prefixes,
    describe_statistics,
    layer_weight,
    layers_at_depths,
    least_squares_update,
    mlp_output_names,
    subject_last_token,
)
from t2edit.editors.target_loss import (
    encode_targets,
    model_device,
    requires_grad_snapshot,
    restore_requires_grad,
)

ROME_DEPTH = 5 / 32  # EasyEdit's llama-7b layer 5 of 32
ESSENCE_PROMPT = "{} is a"  # ROME's KL prompt: what the model says about the subject in general
VALUE_ROWS = 128  # rows (edits × prefixes) optimised together


@dataclass
class ROMEEditorConfig:
    layer: int | None = None  # None: the layer at EasyEdit's llama-7b depth (5 of 32)
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3  # times ‖δ‖² / ‖W k*‖²
    v_stop_loss: float = 5e-2  # the search ends once every edit's target loss is below this
    clamp_norm_factor: float = 4.0  # ‖δ‖ <= this × ‖W k*‖
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True  # False: C = I (EasyEdit's llama-7b setting; needs no key statistics)
    # Prefixes: [tokens, count] pairs (EasyEdit's context_template_length_params), plus the bare prompt.
    context_templates: tuple = ((5, 10), (10, 10))
    key_samples: int = 1000  # key corpus: samples × tokens from the model itself (t2edit.editors.keys)
    key_sample_length: int = 64
    key_cache_dir: str | None = None  # None: the t2edit cache's key_stats/; "" keeps nothing on disk
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_value_settings(self, "rome")
        if self.layer is not None and not isinstance(self.layer, int):
            raise EditInputError(f"rome: layer={self.layer!r}; give a layer index (int) or None for the default")


def check_value_settings(config, editor: str) -> None:
    """The checks every locate-then-edit config shares (the δ search and the key corpus)."""
    rules = [("v_num_grad_steps", config.v_num_grad_steps >= 1, "at least 1"),
             ("v_lr", config.v_lr > 0, "positive"),
             ("v_weight_decay", config.v_weight_decay >= 0, "0 or more"),
             ("v_stop_loss", config.v_stop_loss >= 0, "0 or more (0 never stops early)"),
             ("clamp_norm_factor", config.clamp_norm_factor > 0, "positive"),
             ("kl_factor", config.kl_factor >= 0, "0 or more"),
             ("key_samples", config.key_samples >= 1, "at least 1"),
             ("key_sample_length", config.key_sample_length >= 1, "at least 1")]
    for name, ok, rule in rules:
        if not ok:
            raise EditInputError(f"{editor}: {name}={getattr(config, name)!r}; it must be {rule}")
    config.context_templates = tuple(check_context_lengths(config.context_templates, "context_templates", editor))


def key_corpus(config) -> KeyCorpus:
    return KeyCorpus(n_samples=config.key_samples, sample_length=config.key_sample_length, seed=config.seed)


# ------------------------------------------------------------------------------------------------ value search

@dataclass
class ValueTargets:
    """The δ search's result per edit: `base` is the edited module's output at the subject's last token (mean over
    prefixes, before the edit) and `base + delta` the value the edit should make it produce."""

    base: torch.Tensor  # [edits, width]
    delta: torch.Tensor  # [edits, width]
    nll_start: list[float] = field(default_factory=list)  # target loss before the search
    nll_end: list[float] = field(default_factory=list)  # at the last evaluation
    steps: int = 0


class _AddDelta:
    """A forward hook adding δ[owner of row] to a module's output at (row, column) positions; it also keeps the
    output found there on its first call (the unedited value)."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta
        self.rows = self.cols = self.owners = None
        self.seen: torch.Tensor | None = None

    def at(self, rows: torch.Tensor, cols: torch.Tensor, owners: torch.Tensor) -> _AddDelta:
        self.rows, self.cols, self.owners = rows, cols, owners
        return self

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        current = hidden[self.rows, self.cols]
        self.seen = current.detach().float()
        hidden = hidden.index_put((self.rows, self.cols), current + self.delta[self.owners].to(hidden.dtype))
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def _prompt_rows(tokenizer, records: list[EditRecord], prefixes: list[str]):
    """Every (edit, prefix) pair: the prompt text, the target, and the subject's last token in `prompt target`."""
    prompts, targets, positions, owners = [], [], [], []
    for owner, record in enumerate(records):
        for prefix in prefixes:
            prompt = prefix + record.prompt
            positions.append(subject_last_token(tokenizer, f"{prompt} {record.target}", record.subject,
                                                start=len(prefix), end=len(prompt)))
            prompts.append(prompt)
            targets.append(record.target)
            owners.append(owner)
    return prompts, targets, positions, owners


def _essence_rows(tokenizer, records: list[EditRecord]):
    """ROME's KL prompt "{subject} is a" per edit, with the subject's last token (the bare prompt when a record has
    no subject)."""
    texts, positions = [], []
    for record in records:
        subject = record.subject.strip()
        text = ESSENCE_PROMPT.format(subject) if subject else record.prompt
        texts.append(text)
        positions.append(subject_last_token(tokenizer, text, subject, end=len(subject) if subject else None))
    return texts, positions


def _columns(mask: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Token positions of unpadded rows -> columns of the left-padded batch."""
    lengths = mask.sum(1)
    return mask.shape[1] - lengths + torch.tensor(positions, device=mask.device)


def _target_nll_per_row(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean cross-entropy on its target tokens (the layout of `target_loss.encode_targets`)."""
    labels, mask = batch["labels"], batch["attention_mask"]
    n_keep = labels.shape[1] + 1
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": position_ids(mask)}
    if accepts_argument(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = n_keep
    logits = model(**kwargs).logits[:, -n_keep:-1].float()
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                  ignore_index=-100, reduction="none").view_as(labels)
    scored = (labels != -100).float()
    return (per_token * scored).sum(1) / scored.sum(1)


def _last_log_probs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}
    if accepts_argument(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return torch.log_softmax(model(**kwargs).logits[:, -1].float(), dim=-1)


def optimise_values(model, tokenizer, records: list[EditRecord], prefixes: list[str], module: torch.nn.Module,
                    width: int, config, progress: bool = False) -> ValueTargets:
    """δ per edit ([edits, width]), added to `module`'s output at the subject's last token, found by Adam (config.v_lr,
    config.v_num_grad_steps) on: the target's mean cross-entropy over the prefixed prompts + kl_factor ·
    KL(edited ‖ original) of the next-token distribution after "{subject} is a" + v_weight_decay · ‖δ‖²/‖base‖²,
    with ‖δ‖ clamped to clamp_norm_factor · ‖base‖ after each step. Edits are searched together (each has its own
    δ and its own loss term, so they do not interact) in groups of about VALUE_ROWS rows."""
    group = max(1, VALUE_ROWS // len(prefixes))
    parts = [_optimise_group(model, tokenizer, records[i: i + group], prefixes, module, width, config, progress)
             for i in range(0, len(records), group)]
    return ValueTargets(torch.cat([p.base for p in parts]), torch.cat([p.delta for p in parts]),
                        [x for p in parts for x in p.nll_start], [x for p in parts for x in p.nll_end],
                        max(p.steps for p in parts))


def _optimise_group(model, tokenizer, records, prefixes, module, width, config, progress) -> ValueTargets:
    device = model_device(model)
    prompts, targets, positions, owners = _prompt_rows(tokenizer, records, prefixes)
    batch = encode_targets(tokenizer, prompts, targets, device)
    edit_at = (torch.arange(len(prompts), device=device), _columns(batch["attention_mask"], positions),
               torch.tensor(owners, device=device))
    essence, essence_positions = _essence_rows(tokenizer, records)
    essence_ids, essence_mask = left_pad([tokenizer(t)["input_ids"] for t in essence], pad_id_of(tokenizer), device)
    essence_at = (torch.arange(len(records), device=device), _columns(essence_mask, essence_positions),
                  torch.arange(len(records), device=device))
    delta = torch.zeros(len(records), width, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=config.v_lr)
    hook = _AddDelta(delta)
    owner_index = torch.tensor(owners, device=device)
    flags, was_training = requires_grad_snapshot(model), model.training
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    handle = module.register_forward_hook(hook)
    base = reference = None
    nll_start, nll_end, steps = [], [], 0
    try:
        with torch.enable_grad():
            for step in tqdm(range(config.v_num_grad_steps), desc="value search", disable=not progress,
                             leave=False):
                hook.at(*edit_at)
                nll_rows = _target_nll_per_row(model, batch)
                if base is None:
                    base = _mean_by_owner(hook.seen, owner_index, len(records))
                hook.at(*essence_at)
                log_probs = _last_log_probs(model, essence_ids, essence_mask)
                if reference is None:
                    reference = log_probs.detach()
                nll = _mean_by_owner(nll_rows[:, None], owner_index, len(records))[:, 0]
                kl = (log_probs.exp() * (log_probs - reference)).sum(-1)
                base_norm = base.norm(dim=1).clamp_min(1e-8)
                decay = config.v_weight_decay * delta.norm(dim=1) ** 2 / base_norm ** 2
                nll_end = nll.tolist()
                if step == 0:
                    nll_start = list(nll_end)
                steps = step
                if nll.max().item() < config.v_stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                (nll + config.kl_factor * kl + decay).sum().backward()
                optimizer.step()
                steps = step + 1
                with torch.no_grad():
                    limit = config.clamp_norm_factor * base_norm
                    delta.mul_((limit / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None])
    finally:
        handle.remove()
        model.train(was_training)
        restore_requires_grad(flags)
    return ValueTargets(base.detach(), delta.detach().clone(), nll_start, nll_end, steps)


def _mean_by_owner(rows: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    sums = torch.zeros(n, rows.shape[1], device=rows.device, dtype=rows.dtype).index_add(0, owners, rows)
    counts = torch.bincount(owners, minlength=n).to(rows.dtype)
    return sums / counts[:, None]


def mean_keys(model, tokenizer, records: list[EditRecord], prefixes: list[str],
              modules: dict[str, tuple[torch.nn.Module, str]]) -> dict[str, torch.Tensor]:
    """The named activations at each edit's subject-last token, averaged over the prefixed prompts: [edits, width]."""
    prompts, _, positions, owners = _prompt_rows(tokenizer, records, prefixes)
    captured = capture_at_positions(model, tokenizer, modules, prompts, positions)
    owner_index = torch.tensor(owners, device=next(iter(captured.values())).device)
    return {name: _mean_by_owner(rows, owner_index, len(records)) for name, rows in captured.items()}


# ---------------------------------------------------------------------------------------------------- the editor

@dataclass
class LocatedEdit:
    """One edit as written: the key, the value it now maps to, and how the δ search went."""

    record_index: int
    layer: int
    key: torch.Tensor
    value: torch.Tensor
    nll_start: float
    nll_end: float
    steps: int
    seconds: float


class ROMEEditor(Editor):
    """Rank-one edits of one MLP output matrix; restore() copies this call's original matrix back. Sequential:
    each call edits the model as the previous calls left it, and key statistics stay those of the unedited model."""

    name = "rome"
    sequential = True

    def __init__(self, config: ROMEEditorConfig | None = None):
        self.config = config or ROMEEditorConfig()
        self.memo = UneditedModelMemo(self.config.key_cache_dir)
        self.last_edits: list[LocatedEdit] = []
        self.statistics_cost: dict = {}

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        config = self.config
        layer = config.layer if config.layer is not None else layers_at_depths(model, (ROME_DEPTH,))[0]
        ((layer, module_name),) = mlp_output_names(model, [layer], self.name, "layer").items()
        module = model.get_submodule(module_name)
        fingerprint = self.memo.begin(model)
        original = module.weight.detach().clone()
        try:
            second_moment = self._second_moment(model, tokenizer, fingerprint, layer, module)
            prefixes = self._prefixes(model, tokenizer, fingerprint)
            self.last_edits = []
            for record in tqdm(records, desc="ROME edits", disable=not config.progress or len(records) == 1):
                self.last_edits.append(self._edit_one(model, tokenizer, record, prefixes, layer, module,
                                                      second_moment))
        except BaseException:
            with torch.no_grad():
                module.weight.copy_(original)
            self.memo.end(model)
            raise

        def restore() -> None:
            with torch.no_grad():
                module.weight.copy_(original)
            self.memo.end(model)

        return EditedModel(model=model, restore=restore)

    def _second_moment(self, model, tokenizer, fingerprint, layer, module) -> torch.Tensor:
        if not self.config.mom2_adjustment:
            width = layer_weight(module).shape[1]
            return torch.eye(width)
        stats = self.memo.statistics(model, tokenizer, fingerprint, [layer], key_corpus(self.config),
                                     self.config.progress)
        self.statistics_cost = describe_statistics(stats)
        return stats[layer].second_moment

    def _prefixes(self, model, tokenizer, fingerprint) -> list[str]:
        config = self.config
        key = ("prefixes", fingerprint, config.context_templates, config.seed)
        return self.memo.get(key, lambda: context_prefixes(model, tokenizer, list(config.context_templates),
                                                           config.seed))

    def _edit_one(self, model, tokenizer, record, prefixes, layer, module, second_moment) -> LocatedEdit:
        started = time.perf_counter()
        key = mean_keys(model, tokenizer, [record], prefixes, {"key": (module, "input")})["key"][0]
        targets = optimise_values(model, tokenizer, [record], prefixes, module, layer_weight(module).shape[0],
                                  self.config)
        value = targets.base[0] + targets.delta[0]
        with torch.no_grad():
            current = module(key[None].to(module.weight.dtype))[0].float()
            update = least_squares_update((value - current)[:, None], key[:, None], second_moment, lam=0.0)
            layer_weight(module).add_(update.to(module.weight.dtype))
        return LocatedEdit(record.index, layer, key.cpu(), value.cpu(), targets.nll_start[0], targets.nll_end[0],
                           targets.steps, time.perf_counter() - started)


__all__ = ["LocatedEdit", "ROMEEditor", "ROMEEditorConfig", "ValueTargets", "check_value_settings", "key_corpus",
           "mean_keys", "optimise_values"]
