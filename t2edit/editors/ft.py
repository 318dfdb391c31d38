"""FT-M: fine-tune one MLP output matrix on the edits' target tokens (masked cross-entropy), as EasyEdit's FT-M.

EasyEdit trains `model.layers.21.mlp.down_proj` of a 32-layer 7B model with Adam lr 5e-4 for 25 steps, stops
early once the loss is below 1e-2, and may clamp the matrix near its original (norm_constraint). Here the
config's own defaults are those values on the middle layer; the settings each kind of model gets from the
command line (a fact world, a small real model) are in configs/editors/ft.yaml (`t2edit.editors.settings`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from t2edit.editors.target_loss import (check_precision, model_device, seeded,
                                          target_batches, train_on_targets)
from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records

# `<...>.<layer index>.mlp.<output projection>`: down_proj (Llama, Qwen2, Mistral), c_proj (GPT-2),
# dense_4h_to_h (GPT-NeoX). Other layouts name the module through FTEditorConfig.module_name.
_MLP_OUTPUT = re.compile(r"\.(\d+)\.mlp\.(down_proj|c_proj|dense_4h_to_h)$")


@dataclass
class FTEditorConfig:
    layer: int | None = None  # None: the middle layer (num_layers // 2)
    module_name: str | None = None  # a full module name overrides `layer`, e.g. "model.layers.21.mlp.down_proj"
    lr: float = 5e-4
    steps: int = 25
    batch_size: int = 32  # edits per optimisation step; a step visits every chunk of the edits
    weight_decay: float = 0.0
    # EasyEdit's early stop: a batch below this loss takes no step; training ends once a step's mean is below it.
    stop_loss: float | None = 1e-2
    # EasyEdit's norm_constraint: after each step every entry stays within +-this of its original value.
    norm_constraint: float | None = None
    precision: str = "fp32"  # "bf16": bfloat16 autocast (the matrix stays float32); "auto": bf16 where fast
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)


class FTEditor(Editor):
    """Only one weight matrix changes; restore() copies its saved original back."""

    name = "ft"
    sequential = True  # each call trains the matrix further from where the last left it, and saves that state

    def __init__(self, config: FTEditorConfig | None = None):
        self.config = config or FTEditorConfig()

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        config = self.config
        device = model_device(model)
        module_name = config.module_name or mlp_output_module_name(model, config.layer)
        weight = _weight_of(model, module_name)
        original = weight.detach().clone()
        batches = target_batches(tokenizer, records, config.batch_size, device)

        def keep_near_original() -> None:
            with torch.no_grad():
                weight.copy_(torch.clamp(weight, original - config.norm_constraint,
                                         original + config.norm_constraint))

        constrain = keep_near_original if config.norm_constraint else None
        with seeded(config.seed, device):
            train_on_targets(model, [weight], batches, config.steps, config.lr, config.weight_decay,
                             progress=config.progress, desc="FT-M edit", stop_loss=config.stop_loss,
                             precision=config.precision, after_step=constrain)

        def restore() -> None:
            with torch.no_grad():
                weight.copy_(original)

        return EditedModel(model=model, restore=restore)


def mlp_output_layers(model: torch.nn.Module) -> dict[int, str]:
    """Layer index -> name of that decoder layer's MLP output projection."""
    return {int(match.group(1)): name for name, _ in model.named_modules() if (match := _MLP_OUTPUT.search(name))}


def mlp_output_module_name(model: torch.nn.Module, layer: int | None) -> str:
    """Name of the MLP output projection of decoder layer `layer` (the middle layer when None)."""
    by_layer = mlp_output_layers(model)
    if not by_layer:
        raise EditInputError(f"FT-M found no MLP output projection (…<layer>.mlp.down_proj) in "
                             f"{type(model).__name__}; set FTEditorConfig.module_name to the matrix to train")
    if layer is None:
        layer = len(by_layer) // 2
    if layer < 0:
        layer += len(by_layer)
    if layer not in by_layer:
        raise EditInputError(f"FT-M layer {layer} does not exist: {type(model).__name__} has layers "
                             f"0..{len(by_layer) - 1}; set FTEditorConfig.layer to one of them")
    return by_layer[layer]


def _weight_of(model: torch.nn.Module, module_name: str) -> torch.nn.Parameter:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise EditInputError(f"FT-M module {module_name!r} is not in {type(model).__name__}; set "
                             "FTEditorConfig.module_name to one of its module names") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        raise EditInputError(f"FT-M module {module_name!r} has no weight matrix to train")
    return weight
