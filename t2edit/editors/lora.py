"""LoRA editing through PEFT: train a low-rank adapter on the edits' target tokens, unload it to restore.

The config's defaults are EasyEdit's KnowEdit LoRA settings (rank 8, alpha 32, dropout 0.1, Adam lr 5e-3, 70 steps,
masked cross-entropy on the target; EasyEdit runs them as AdaLoRA, here plain LoRA); the settings each kind of
model gets from the command line are in configs/editors/lora.yaml (`t2edit.editors.settings`). EasyEdit targets
q_proj/v_proj, which is also PEFT's default for Llama and Qwen2; leaving `target_modules` unset uses PEFT's default
for whatever architecture is given (c_attn for GPT-2).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from t2edit.editors.target_loss import (check_precision, model_device, requires_grad_snapshot,
                                          restore_requires_grad, seeded, target_batches, train_on_targets)
from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records


@dataclass
class LoRAEditorConfig:
    rank: int = 8
    alpha: int = 32
    dropout: float = 0.1
    # None: PEFT's default for the architecture (q_proj/v_proj for Llama and Qwen2, as EasyEdit).
    target_modules: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None  # decoder layers that get adapters (EasyEdit's `layers`); None: all
    lr: float = 5e-3
    steps: int = 70
    batch_size: int = 32  # edits per optimisation step; a step visits every chunk of the edits
    weight_decay: float = 0.0
    stop_loss: float | None = None  # as FT-M's (EasyEdit's LoRA trains all its steps: None)
    precision: str = "fp32"  # "bf16": bfloat16 autocast (the adapter stays float32); "auto": bf16 where fast
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)


class LoRAEditor(Editor):
    """Batch mode trains one adapter on all the records; restore() unloads it (no merge), which puts the base
    model's original linear layers back untouched. Called again on the model it returned (a stream), it trains the
    same adapter further on the new records; that call's restore() puts the adapter's weights back as they were."""

    name = "lora"
    sequential = True

    def __init__(self, config: LoRAEditorConfig | None = None):
        self.config = config or LoRAEditorConfig()

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        config = self.config
        device = model_device(model)
        batches = target_batches(tokenizer, records, config.batch_size, device)
        base_flags = requires_grad_snapshot(model)  # PEFT freezes the base model; we give the flags back
        lora = model.__dict__.get(_ADAPTER)  # this editor's adapter from an earlier call on this model
        attached = lora is None
        with seeded(config.seed, device):
            if attached:
                lora = _attach_adapter(model, config)
            adapter_parameters = [p for name, p in lora.named_parameters() if "lora_" in name]
            before = [p.detach().clone() for p in adapter_parameters]
            train_on_targets(model, adapter_parameters, batches, config.steps, config.lr, config.weight_decay,
                             progress=config.progress, desc="LoRA edit", stop_loss=config.stop_loss,
                             precision=config.precision)
        restore_requires_grad(base_flags)
        model.__dict__[_ADAPTER] = lora

        def restore() -> None:
            if attached:
                lora.unload()  # swaps each LoRA layer back for the original module it wrapped
                model.__dict__.pop(_ADAPTER, None)
            else:
                with torch.no_grad():
                    for parameter, value in zip(adapter_parameters, before):
                        parameter.copy_(value)
            restore_requires_grad(base_flags)

        # PEFT injects its layers into `model` itself, so the caller keeps using the same module.
        return EditedModel(model=model, restore=restore)


# Where a model keeps the adapter this editor attached to it (PEFT's wrapper; the model itself holds the layers).
_ADAPTER = "_t2edit_lora_adapter"


def _attach_adapter(model: torch.nn.Module, config: LoRAEditorConfig):
    peft_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules) if config.target_modules else None, bias="none",
        layers_to_transform=list(config.layers) if config.layers else None,
    )
    try:
        with warnings.catch_warnings():
            # PEFT 0.21 asks transformers 5 for the deprecated `is_gradient_checkpointing`; not the user's concern.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, peft_config)
    except ValueError as error:  # PEFT's message for unmatched or unknown target modules
        raise EditInputError(
            f"LoRA could not attach to {type(model).__name__} with target_modules={config.target_modules}: "
            f"{error}. Set LoRAEditorConfig.target_modules to names of the model's linear layers."
        ) from None
