"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook of (key, value, deferral radius) at one MLP output.

An edit caches a key — the input of the chosen layer (the MLP output projection, as EasyEdit's
`model.layers[27].mlp.down_proj` of a 32-layer Llama) at the last token of the edit prompt — and trains a value,
a vector that replaces the layer's output at that token, until the model says the target (Adam on the masked
cross-entropy of the target tokens, `n_iter` steps, early stop below `stop_loss`). At inference the query is the
layer input at each prompt's last token; if the nearest key (Euclidean) lies within its radius, the layer's output
at that token is replaced by the key's value ("replace_last", EasyEdit's setting for Llama), else the layer runs
unchanged — so a prompt outside every radius gets exactly the unedited logits. Later tokens (the answer in
teacher forcing, each generated token) see the replaced output only through attention.

Codebook maintenance, as published: a key farther from the nearest key than that key's radius plus ε_init is
added with radius ε_init; a closer one with the same label (target) expands the nearest key's radius to cover it;
with a different label both are split — the nearest key's radius and the new key's become half their distance.

Differences from the paper and EasyEdit: the query position is each row's own prompt end (the evaluation says
where the prompt ends), where EasyEdit reuses the last edit's prompt length for every later input; among keys at
the same distance the newest wins, so a prompt edited twice answers with its latest target; only the
"replace_last" replacement is implemented; the cold value start is uniform on [0, 1).

This module also holds what GRACE and WISE share: a hook that knows where each row's prompt is
(`MemoryAdaptor`) and the wrapper that tells it (`MemoryModel`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from t2edit.batching import position_ids
from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records
from t2edit.editors.ft import mlp_output_layers
from t2edit.editors.target_loss import check_precision, encode_targets, model_device, seeded, train_on_targets
from t2edit.text import normalize_answer

VALUE_INITS = ("cold", "warm")


# ---------------------------------------------------------------------------------------------- shared machinery

@dataclass
class PromptSpan:
    """Where each row's prompt is: `mask` [batch, seq] True on the prompt's own tokens, `end` [batch] the index
    of each row's last prompt token (answer tokens may follow it)."""

    mask: torch.Tensor
    end: torch.Tensor

    @classmethod
    def of(cls, attention_mask: torch.Tensor, prompt_end: torch.Tensor | None = None) -> PromptSpan:
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        if prompt_end is None:  # the whole input is the prompt: it ends at the last real token
            prompt_end = (attention_mask.bool() * positions).max(-1).values
        prompt_end = prompt_end.to(attention_mask.device).long()
        return cls(attention_mask.bool() & (positions[None] <= prompt_end[:, None]), prompt_end)

    def widened(self, length: int) -> PromptSpan:
        """The same prompts inside a longer input (tokens after the prompt are not prompt tokens)."""
        extra = self.mask.new_zeros(self.mask.shape[0], length - self.mask.shape[1])
        return PromptSpan(torch.cat([self.mask, extra], 1), self.end)


class StopForward(Exception):
    """Raised by a hook that has read what it needed, so the rest of the forward pass is skipped."""


class MemoryAdaptor:
    """A forward hook on one module that acts per prompt. `MemoryModel` tells it where each row's prompt is; a
    decoding step after the prompt (one new token, the prompt in the KV cache) goes to `after_prompt`. Called
    directly on the base model, the whole input counts as the prompt."""

    def __init__(self):
        self.span: PromptSpan | None = None
        self.capture: dict | None = None  # set by `read_layer`: the next forward stores the layer's input there

    @contextlib.contextmanager
    def prompts(self, span: PromptSpan):
        previous, self.span = self.span, span
        try:
            yield
        finally:
            self.span = previous

    def __call__(self, module, inputs, output):
        x = inputs[0]
        if self.capture is not None:
            self.capture.update(x=x.detach(), output=output.detach())
            raise StopForward
        span = self.span
        if span is None or span.mask.shape[0] != x.shape[0]:
            span = PromptSpan.of(torch.ones(x.shape[:2], dtype=torch.long, device=x.device))
        if x.shape[1] < span.mask.shape[1]:
            return self.after_prompt(x, output)
        if x.shape[1] > span.mask.shape[1]:
            span = span.widened(x.shape[1])
        return self.on_prompt(x, output, span)

    def on_prompt(self, x: torch.Tensor, output: torch.Tensor, span: PromptSpan) -> torch.Tensor:
        raise NotImplementedError

    def after_prompt(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output


def read_layer(model: nn.Module, adaptor: MemoryAdaptor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> dict:
    """The hooked layer's input and output over a batch ({"x", "output"}), without running the layers above it."""
    adaptor.capture = {}
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    except StopForward:
        pass
    finally:
        captured, adaptor.capture = adaptor.capture, None
    return captured


class MemoryModel(nn.Module):
    """The base model with a side memory hooked into one layer; `forward` and `generate` work like the base
    model's. `forward(..., prompt_end=[...])` says where each row's prompt ends when the input also holds its
    answer (teacher forcing, as the evaluation does); `generate` treats the whole input as the prompt."""

    routes_on_prompt = True  # the evaluation passes prompt_end when it feeds prompt + answer

    def __init__(self, base_model: nn.Module, module_name: str, adaptor: MemoryAdaptor):
        super().__init__()
        self.base_model, self.module_name, self.adaptor = base_model, module_name, adaptor
        self._hook = base_model.get_submodule(module_name).register_forward_hook(adaptor)

    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def device(self):
        return model_device(self.base_model)

    def forward(self, input_ids=None, attention_mask=None, prompt_end=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_end is not None and getattr(self.base_model, "routes_on_prompt", False):
            kwargs["prompt_end"] = prompt_end  # another method's memory underneath reads it too
        with self.adaptor.prompts(PromptSpan.of(attention_mask, prompt_end)):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.adaptor.prompts(PromptSpan.of(attention_mask)):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def remove(self) -> None:
        """Take the hook off the base model: it is the unedited model again."""
        self._hook.remove()


def memory_layer(model: nn.Module, layer: int | None, module_name: str | None, config_name: str) -> str:
    """The module a side memory hooks: `module_name`, else the MLP output projection of decoder layer `layer`
    (the middle one when None; negative counts from the end)."""
    if module_name is not None:
        try:
            model.get_submodule(module_name)
        except AttributeError:
            raise EditInputError(f"{config_name}.module_name {module_name!r} is not a module of "
                                 f"{type(model).__name__}; name one of its modules") from None
        return module_name
    by_layer = mlp_output_layers(model)
    if not by_layer:
        raise EditInputError(f"found no MLP output projection (…<layer>.mlp.down_proj) in {type(model).__name__}; "
                             f"set {config_name}.module_name to the module to hook")
    index = len(by_layer) // 2 if layer is None else layer + len(by_layer) if layer < 0 else layer
    if index not in by_layer:
        raise EditInputError(f"{config_name}.layer={layer} does not exist: {type(model).__name__} has layers "
                             f"0..{len(by_layer) - 1}; pick one of them")
    return by_layer[index]


def memory_model_of(model: nn.Module, adaptor_type: type) -> MemoryModel | None:
    """`model` itself when an earlier call of the same method wrapped it (a sequential edit), else None."""
    return model if isinstance(model, MemoryModel) and isinstance(model.adaptor, adaptor_type) else None


# ---------------------------------------------------------------------------------------------- GRACE

@dataclass
class Codebook:
    """GRACE's keys [n, d_in], values [n, d_out], deferral radii [n] and labels (normalised targets). Writes
    replace tensors instead of changing them in place, so a shallow copy is a snapshot."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    radii: torch.Tensor | None = None
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def copy(self) -> Codebook:
        return Codebook(self.keys, self.values, self.radii, list(self.labels))

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of each query's nearest key; among equally near keys the newest."""
        distances = torch.cdist(queries.float(), self.keys)
        newest_first = distances.flip(-1).min(-1)
        return newest_first.values, len(self) - 1 - newest_first.indices

    def write(self, key: torch.Tensor, value: torch.Tensor, label: str, eps: float) -> str:
        """Add or merge one edit by the published rules; returns what happened: added / expanded / split."""
        key, value = key.detach().float().reshape(1, -1), value.detach().float().reshape(1, -1)
        if not len(self):
            self._append(key, value, eps, label)
            return "added"
        distance, index = (t.item() for t in self.nearest(key))
        radius = self.radii[index].item()
        if distance > radius + eps:
            self._append(key, value, eps, label)
            return "added"
        radii = self.radii.clone()
        if self.labels[index] == label:
            radii[index] = max(radius, distance)
            self.radii = radii
            return "expanded"
        radii[index] = distance / 2
        self.radii = radii
        self._append(key, value, distance / 2, label)
        return "split"

    def _append(self, key, value, radius: float, label: str) -> None:
        radius = torch.tensor([radius], device=key.device)
        if self.keys is None:
            self.keys, self.values, self.radii = key, value, radius
        else:
            self.keys, self.values = torch.cat([self.keys, key]), torch.cat([self.values, value])
            self.radii = torch.cat([self.radii, radius])
        self.labels.append(label)


class GraceAdaptor(MemoryAdaptor):
    """The codebook at the hooked layer; while a value trains, it replaces the output at the training key."""

    def __init__(self):
        super().__init__()
        self.codebook = Codebook()
        self.training_value: tuple[nn.Parameter, int] | None = None  # (value, key position) while one trains
        self.last_hits: torch.Tensor | None = None  # [batch] whether each row of the last prompt pass hit a key

    def on_prompt(self, x, output, span):
        if self.training_value is not None:
            value, position = self.training_value
            replaced = output.clone()
            replaced[:, position] = value.to(output.dtype)
            return replaced
        rows = torch.arange(x.shape[0], device=x.device)
        self.last_hits = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if not len(self.codebook):
            return output
        distance, index = self.codebook.nearest(x[rows, span.end])
        hits = distance <= self.codebook.radii[index]
        self.last_hits = hits
        if not hits.any():
            return output
        replaced = output.clone()
        hit_rows = rows[hits]
        replaced[hit_rows, span.end[hits]] = self.codebook.values[index[hits]].to(output.dtype)
        return replaced


@dataclass
class GraceEditorConfig:
    layer: int | None = None  # decoder layer whose MLP output holds the codebook; None: the middle one
    module_name: str | None = None  # a full module name overrides `layer`
    eps: float = 1.0  # ε_init: the deferral radius a new key starts with (Euclidean, in the layer's input space)
    lr: float = 1.0  # Adam on the value vector (EasyEdit's edit_lr)
    n_iter: int = 50  # training steps per value (EasyEdit's llama-7b n_iter)
    val_init: str = "cold"  # cold: a random vector; warm: the layer's own output at the key
    stop_loss: float | None = 1e-2  # stop training a value once the target loss is below this (early stop)
    precision: str = "fp32"
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)
        if self.eps <= 0:
            raise EditInputError(f"GraceEditorConfig.eps={self.eps}: the initial deferral radius must be > 0")
        if self.lr <= 0 or self.n_iter < 1:
            raise EditInputError(f"GraceEditorConfig needs lr > 0 and n_iter >= 1, got lr={self.lr}, "
                                 f"n_iter={self.n_iter}")
        if self.val_init not in VALUE_INITS:
            raise EditInputError(f"GraceEditorConfig.val_init={self.val_init!r}; choose one of "
                                 f"{', '.join(VALUE_INITS)}")


class GraceEditor(Editor):
    """Edits write into a codebook hooked on one layer (the model's weights never change); restore() takes the
    hook off (the first call) or puts the codebook back as it was before the call (a later sequential call)."""

    name = "grace"
    sequential = True

    def __init__(self, config: GraceEditorConfig | None = None):
        self.config = config or GraceEditorConfig()
        self.report: dict = {}

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        config = self.config
        wrapped = memory_model_of(model, GraceAdaptor)
        if wrapped is None:
            wrapped = MemoryModel(model, memory_layer(model, config.layer, config.module_name, "GraceEditorConfig"),
                                  GraceAdaptor())
        adaptor: GraceAdaptor = wrapped.adaptor
        before = adaptor.codebook.copy()
        actions = []
        try:
            for offset, record in enumerate(records):
                actions.append(self._edit_one(wrapped.base_model, tokenizer, adaptor, record,
                                              config.seed + len(before) + offset))
        except BaseException:
            self._restore(wrapped, model, before)
            raise
        self.report = {"codebook_size": len(adaptor.codebook),
                       **{action: actions.count(action) for action in ("added", "expanded", "split")}}
        return EditedModel(model=wrapped, restore=lambda: self._restore(wrapped, model, before))

    @staticmethod
    def _restore(wrapped: MemoryModel, model, before: Codebook) -> None:
        if wrapped is model:  # a later call of a sequence: only its own writes go
            wrapped.adaptor.codebook = before
        else:
            wrapped.remove()

    def _edit_one(self, model, tokenizer, adaptor: GraceAdaptor, record, seed: int) -> str:
        config = self.config
        device = model_device(model)
        batch = encode_targets(tokenizer, [record.prompt], [record.target], device)
        n_target = int((batch["labels"] != -100).sum())
        key_position = batch["input_ids"].shape[1] - n_target - 1  # the last prompt token (left-padded row)
        layer = read_layer(model, adaptor, batch["input_ids"], batch["attention_mask"])
        key = layer["x"][0, key_position].float()
        with seeded(seed, device):
            start = torch.rand(layer["output"].shape[-1], device=device) if config.val_init == "cold" \
                else layer["output"][0, key_position].float().clone()
        value = nn.Parameter(start)
        adaptor.training_value = (value, key_position)
        try:
            train_on_targets(model, [value], [batch], config.n_iter, config.lr, progress=config.progress,
                             desc="GRACE value", stop_loss=config.stop_loss, precision=config.precision)
        finally:
            adaptor.training_value = None
        return adaptor.codebook.write(key, value, normalize_answer(record.target), config.eps)


__all__ = ["Codebook", "GraceAdaptor", "GraceEditor", "GraceEditorConfig", "MemoryAdaptor", "MemoryModel",
           "PromptSpan", "StopForward", "memory_layer", "memory_model_of", "read_layer"]
