"""MEMIT (Meng et al., 2023, "Mass-Editing Memory in a Transformer"): many edits at once, spread over the MLP
output matrices of a range of layers.

For each edit, z = h + δ is the hidden state the last edited layer L should output at the subject's last token
(δ found as ROME's v*, but added to layer L's output, the residual stream). Then, layer by layer from the first
edited layer l: with the model as the earlier layers of this call left it, K = the edits' keys at layer l (mean over
the prefixed prompts), R = (z − h_L) / (number of edited layers from l on), and

    Δ_l = R Kᵀ (λ·C + K Kᵀ)⁻¹,   λ = mom2_update_weight, C = E[k kᵀ] (t2edit.editors.keys)

so each layer takes its share of the change, trading the edits' fit against disturbing typical keys. With one edit,
one layer and λ → 0 this is ROME's rank-one update (`least_squares_update` computes both).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from t2edit.editors.base import EditedModel, EditInputError, Editor, check_records
from t2edit.editors.keys import (
    UneditedModelMemo,
    context_prefixes,
    decoder_layer_name,
    describe_statistics,
    layer_weight,
    layers_at_depths,
    least_squares_update,
    mlp_output_names,
)
from t2edit.editors.rome import (
    check_value_settings,
    key_corpus,
    mean_keys,
    optimise_values,
)

MEMIT_DEPTHS = (4 / 32, 5 / 32, 6 / 32, 7 / 32, 8 / 32)  # EasyEdit's llama-7b layers 4-8 of 32


@dataclass
class MEMITEditorConfig:
    layers: tuple[int, ...] | None = None  # None: the layers at EasyEdit's llama-7b depths (4-8 of 32)
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3  # times ‖δ‖² / ‖h‖²
    v_stop_loss: float = 5e-2
    clamp_norm_factor: float = 4.0  # ‖δ‖ <= this × ‖h‖ (the last edited layer's output)
    kl_factor: float = 0.0625
    mom2_update_weight: float = 15000.0  # λ
    context_templates: tuple = ((10, 5),)  # MEMIT's prefixes: the bare prompt and 5 of 10 tokens
    key_samples: int = 1000
    key_sample_length: int = 64
    key_cache_dir: str | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_value_settings(self, "memit")
        check_layer_list(self.layers, "memit")
        if self.mom2_update_weight < 0:
            raise EditInputError(f"memit: mom2_update_weight={self.mom2_update_weight!r}; it must be 0 or more")


def check_layer_list(layers, editor: str) -> None:
    if layers is None:
        return
    if isinstance(layers, int) or not all(isinstance(layer, int) for layer in layers) or not layers:
        raise EditInputError(f"{editor}: layers={layers!r}; give a non-empty list of layer indices, e.g. [4, 5, 6, 7, 8]"
                             ", or None for the default")
    if len(set(layers)) != len(layers):
        raise EditInputError(f"{editor}: layers={list(layers)!r} repeats a layer; list each layer once")


class MEMITEditor(Editor):
    """Edits the MLP output matrices of `layers` (all records in one batch); restore() copies this call's
    original matrices back. Sequential: key statistics stay those of the unedited model."""

    name = "memit"
    sequential = True
    default_depths = MEMIT_DEPTHS

    def __init__(self, config: MEMITEditorConfig | None = None):
        self.config = config or MEMITEditorConfig()
        self.memo = UneditedModelMemo(self.config.key_cache_dir)
        self.statistics_cost: dict = {}
        self.last_report: dict = {}

    def edit(self, model, tokenizer, records):
        check_records(records, self.name)
        config = self.config
        wanted = list(config.layers) if config.layers is not None else layers_at_depths(model, self.default_depths)
        names = mlp_output_names(model, wanted, self.name, "layers")
        layers = sorted(names)
        modules = {layer: model.get_submodule(names[layer]) for layer in layers}
        output_module = model.get_submodule(decoder_layer_name(names[layers[-1]]))
        fingerprint = self.memo.begin(model)
        originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}

        def put_back() -> None:
            with torch.no_grad():
                for layer, module in modules.items():
                    module.weight.copy_(originals[layer])
            self.memo.end(model)

        try:
            started = time.perf_counter()
            stats = self.memo.statistics(model, tokenizer, fingerprint, layers, key_corpus(config), config.progress)
            self.statistics_cost = describe_statistics(stats)
            prefixes = self.memo.get(("prefixes", fingerprint, config.context_templates, config.seed),
                                     lambda: context_prefixes(model, tokenizer, list(config.context_templates),
                                                              config.seed))
            width = layer_weight(modules[layers[-1]]).shape[0]
            targets = optimise_values(model, tokenizer, records, prefixes, output_module, width, config,
                                      config.progress)
            goal = targets.base + targets.delta
            keys_by_layer = {}
            for position, layer in enumerate(layers):
                found = mean_keys(model, tokenizer, records, prefixes,
                                  {"key": (modules[layer], "input"), "out": (output_module, "output")})
                residuals = (goal - found["out"]) / (len(layers) - position)
                update = self.layer_update(model, fingerprint, layer, residuals.T, found["key"].T,
                                           stats[layer].second_moment)
                with torch.no_grad():
                    layer_weight(modules[layer]).add_(update.to(modules[layer].weight.dtype))
                keys_by_layer[layer] = found["key"]
            self.last_report = {"layers": layers, "nll_start": targets.nll_start, "nll_end": targets.nll_end,
                                "steps": targets.steps, "seconds": round(time.perf_counter() - started, 2),
                                "key_statistics": self.statistics_cost}
            call = self.after_edit(model, keys_by_layer)
        except BaseException:
            put_back()
            raise

        def restore() -> None:
            put_back()
            self.after_restore(model, call)

        return EditedModel(model=model, restore=restore)

    def layer_update(self, model, fingerprint: str, layer: int, residuals: torch.Tensor, keys: torch.Tensor,
                     second_moment: torch.Tensor) -> torch.Tensor:
        """Δ of one layer from its residuals [out, edits] and keys [in, edits]."""
        return least_squares_update(residuals, keys, second_moment, self.config.mom2_update_weight)

    def after_edit(self, model, keys_by_layer: dict[int, torch.Tensor]):
        """Called once the call's updates are written; its return value is handed to `after_restore`."""

    def after_restore(self, model, call) -> None:
        pass


__all__ = ["MEMIT_DEPTHS", "MEMITEditor", "MEMITEditorConfig", "check_layer_list"]
